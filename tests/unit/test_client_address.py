"""The client's address from the peer, trusted networks and forwarding headers (RFC 7239)."""

from __future__ import annotations

import ipaddress
import time

from hypothesis import given
from hypothesis import strategies as st

from wsgate.edge.client_address import (
    MAX_HOPS,
    ForwardingHeader,
    TrustedNetworks,
    canonical_address,
    resolve_client,
)

BALANCERS = TrustedNetworks(["10.0.0.0/8", "fd00::/8"])
FORWARDED = ForwardingHeader.FORWARDED


class TestTrustedNetworks:
    def test_membership(self) -> None:
        assert "10.1.2.3" in BALANCERS
        assert "::ffff:10.1.2.3" in BALANCERS  # a dual-stack socket's IPv4 peer
        assert "fd00::1" in BALANCERS
        assert "192.0.2.1" not in BALANCERS
        assert "not an address" not in BALANCERS
        assert 7 not in BALANCERS

    def test_empty_trusts_no_one(self) -> None:
        assert not TrustedNetworks()
        assert "10.0.0.1" not in TrustedNetworks()


class TestXForwardedFor:
    def test_untrusted_peer_header_ignored(self) -> None:
        assert resolve_client("192.0.2.9", [b"203.0.113.5"], BALANCERS) == "192.0.2.9"

    def test_no_trusted_proxies_by_default(self) -> None:
        assert resolve_client("10.0.0.1", [b"203.0.113.5"], TrustedNetworks()) == "10.0.0.1"

    def test_right_most_untrusted_entry_is_the_client(self) -> None:
        # A client forged the left-most entry; the balancer appended the real one.
        values = [b"198.51.100.66, 203.0.113.5, 10.0.0.7"]
        assert resolve_client("10.0.0.1", values, BALANCERS) == "203.0.113.5"

    def test_several_header_lines_are_one_list_in_order(self) -> None:
        values = [b"198.51.100.66", b"203.0.113.5", b"10.0.0.7"]
        assert resolve_client("10.0.0.1", values, BALANCERS) == "203.0.113.5"

    def test_all_trusted_gives_the_left_most(self) -> None:
        assert resolve_client("10.0.0.1", [b"10.0.0.3, 10.0.0.2"], BALANCERS) == "10.0.0.3"

    def test_garbage_stops_the_walk_at_the_nearest_known_hop(self) -> None:
        assert resolve_client("10.0.0.1", [b"unknown, 10.0.0.2"], BALANCERS) == "10.0.0.2"
        assert resolve_client("10.0.0.1", [b"203.0.113.5, nonsense"], BALANCERS) == "10.0.0.1"
        assert resolve_client("10.0.0.1", [b""], BALANCERS) == "10.0.0.1"

    def test_ports_and_brackets(self) -> None:
        assert resolve_client("10.0.0.1", [b"203.0.113.5:4711"], BALANCERS) == "203.0.113.5"
        assert resolve_client("10.0.0.1", [b"[2001:db8::1]:4711"], BALANCERS) == "2001:db8::1"
        assert resolve_client("10.0.0.1", [b"2001:db8::1"], BALANCERS) == "2001:db8::1"

    def test_peer_written_one_way(self) -> None:
        assert canonical_address("::ffff:192.0.2.1") == "192.0.2.1"
        assert resolve_client("::ffff:192.0.2.1", [b"1.2.3.4"], BALANCERS) == "192.0.2.1"

    @given(
        st.one_of(
            st.ip_addresses(v=4).map(str),
            st.from_regex(r"\A[0-9.]{1,20}\Z"),
            st.text(max_size=20),
        ).filter(lambda text: ":" not in text)
    )
    def test_text_without_a_colon_is_already_written_one_way(self, text: str) -> None:
        # The short cut for colon-free text agrees with parsing it.
        try:
            parsed: str = str(ipaddress.ip_address(text))
        except ValueError:
            parsed = text
        assert canonical_address(text) == parsed

    def test_ten_thousand_entries_cost_what_sixty_four_do(self) -> None:
        trusted_hops = b", ".join(b"10.0.%d.%d" % divmod(i, 250) for i in range(10_000))
        started = time.process_time()
        for _ in range(100):
            client = resolve_client("10.0.0.1", [trusted_hops], BALANCERS)
        elapsed = time.process_time() - started
        # The walk gives up after MAX_HOPS trusted entries, at the last one it checked.
        third, fourth = divmod(10_000 - MAX_HOPS, 250)
        assert client == f"10.0.{third}.{fourth}"
        assert elapsed < 5  # generous: bounded work, not a benchmark

    @given(
        st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=8),
        st.lists(st.integers(1, 254), max_size=4),
    )
    def test_forged_prefixes_never_change_the_answer(
        self, forged: list[str], hops: list[int]
    ) -> None:
        real = "203.0.113.5"
        chain = [real, *(f"10.9.9.{h}" for h in hops)]
        honest = resolve_client("10.0.0.1", [", ".join(chain).encode()], BALANCERS)
        spoofed = resolve_client("10.0.0.1", [", ".join(forged + chain).encode()], BALANCERS)
        assert honest == spoofed == real


class TestForwarded:
    """RFC 7239 section 4: for= of each element, elements in order."""

    def test_right_most_for(self) -> None:
        values = [b'for=198.51.100.66;proto=https, for="[2001:db8:cafe::17]:4711";by=10.0.0.1']
        assert resolve_client("10.0.0.1", values, BALANCERS, FORWARDED) == "2001:db8:cafe::17"

    def test_case_and_spaces(self) -> None:
        values = [b"For = 203.0.113.5 ; proto=http", b"FOR=10.0.0.7"]
        assert resolve_client("10.0.0.1", values, BALANCERS, FORWARDED) == "203.0.113.5"

    def test_obfuscated_or_missing_for_stops_the_walk(self) -> None:
        assert resolve_client("10.0.0.1", [b"for=_hidden"], BALANCERS, FORWARDED) == "10.0.0.1"
        assert resolve_client("10.0.0.1", [b"proto=http"], BALANCERS, FORWARDED) == "10.0.0.1"
