"""The PROXY protocol header reader (haproxy's proxy-protocol.txt, v1 section 2.1, v2 2.2)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.edge.proxy_protocol import (
    MAX_V1_SIZE,
    MAX_V2_SIZE,
    V2_SIGNATURE,
    ProxyError,
    ProxyErrorKind,
    ProxyHeader,
    ProxyHeaderReader,
    encode_v1,
    encode_v2,
    starts_like_proxy_header,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


def endpoints(addresses: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, int]]:
    return st.tuples(addresses, ports)


def pairs() -> st.SearchStrategy[tuple[tuple[str, int], tuple[str, int]]]:
    return st.tuples(endpoints(ipv4), endpoints(ipv4)) | st.tuples(endpoints(ipv6), endpoints(ipv6))


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[ProxyHeader | None, ProxyHeaderReader]:
    reader = ProxyHeaderReader()
    header = None
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if header is not None:
            break
        header = reader.feed(data[start:cut])
        start = cut
    return header, reader


def canonical(endpoint: tuple[str, int]) -> tuple[str, int]:
    return str(ipaddress.ip_address(endpoint[0])), endpoint[1]


class TestVersion1:
    """Section 2.1: the human-readable header."""

    def test_tcp4(self) -> None:
        reader = ProxyHeaderReader()
        header = reader.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n" + REQUEST)
        assert header == ProxyHeader(1, ("192.0.2.1", 56324), ("198.51.100.2", 443))
        assert reader.rest == REQUEST

    def test_unknown_uses_the_peer_and_ignores_the_rest_of_its_line(self) -> None:
        reader = ProxyHeaderReader()
        assert reader.feed(b"PROXY UNKNOWN ffff:: 1.2.3.4 1 2\r\nGET") == ProxyHeader(1, None)
        assert reader.rest == b"GET"

    @given(pairs(), st.lists(st.integers(0, MAX_V1_SIZE), max_size=8))
    def test_any_split_across_reads(self, pair: tuple, cuts: list[int]) -> None:  # type: ignore[type-arg]
        source, destination = pair
        data = encode_v1(source, destination) + REQUEST
        header, reader = feed_in_pieces(data, cuts)
        assert header == ProxyHeader(1, canonical(source), canonical(destination))
        assert REQUEST.startswith(reader.rest)

    @pytest.mark.parametrize(
        "line",
        [
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",  # a port missing
            b"PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",  # two spaces
            b"PROXY TCP4 192.0.2.1 2001:db8::1 1 2\r\n",  # families mixed
            b"PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 65536\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 2\r\n",
            b"PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
            b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",  # LF alone
            b"PROXY TCP4 192.0.2.1\r198.51.100.2 1 2\r\n",
            b"PROXY \r\n",
        ],
    )
    def test_malformed_refused(self, line: bytes) -> None:
        with pytest.raises(ProxyError) as caught:
            ProxyHeaderReader().feed(line)
        assert caught.value.kind is ProxyErrorKind.MALFORMED

    def test_a_line_longer_than_107_bytes_is_refused_without_waiting_for_its_end(self) -> None:
        reader = ProxyHeaderReader()
        assert reader.feed(b"PROXY TCP6 " + b"f" * 50) is None
        with pytest.raises(ProxyError) as caught:
            reader.feed(b"f" * (MAX_V1_SIZE - 61))
        assert caught.value.kind is ProxyErrorKind.TOO_LONG

    def test_cr_at_the_end_of_a_read_waits_for_its_lf(self) -> None:
        reader = ProxyHeaderReader()
        assert reader.feed(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r") is None
        assert reader.feed(b"\n") == ProxyHeader(1, ("192.0.2.1", 1), ("198.51.100.2", 2))


class TestVersion2:
    """Section 2.2: the binary header."""

    @given(pairs(), st.binary(max_size=64), st.lists(st.integers(0, 120), max_size=8))
    def test_any_split_across_reads_with_tlvs_skipped(
        self,
        pair: tuple,  # type: ignore[type-arg]
        tlvs: bytes,
        cuts: list[int],
    ) -> None:
        source, destination = pair
        header_bytes = encode_v2(source, destination, tlvs=tlvs)
        header, reader = feed_in_pieces(header_bytes + REQUEST, cuts)
        assert header == ProxyHeader(2, canonical(source), canonical(destination))
        # Whatever was fed past the header is kept for the request, byte for byte.
        assert REQUEST.startswith(reader.rest)

    def test_local_command_uses_the_peer(self) -> None:
        reader = ProxyHeaderReader()
        # A LOCAL header may still carry an address block: it is ignored.
        block = ipaddress.ip_address("10.0.0.1").packed * 2 + struct.pack("!HH", 1, 2)
        data = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x11, len(block)) + block
        assert reader.feed(data + REQUEST) == ProxyHeader(2, None)
        assert reader.rest == REQUEST

    def test_unspec_and_unix_families_use_the_peer(self) -> None:
        unspec = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x00, 0)
        assert ProxyHeaderReader().feed(unspec) == ProxyHeader(2, None)
        unix = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + b"\0" * 216
        assert ProxyHeaderReader().feed(unix) == ProxyHeader(2, None)

    @pytest.mark.parametrize(
        ("version_command", "family_transport", "length"),
        [
            (0x11, 0x11, 12),  # version 1 in a v2 header
            (0x22, 0x11, 12),  # command 2
            (0x21, 0x11, 11),  # too short for IPv4 addresses
            (0x21, 0x21, 35),  # too short for IPv6 addresses
            (0x21, 0x41, 12),  # family 4
            (0x21, 0x13, 12),  # transport 3
        ],
    )
    def test_malformed_refused(
        self, version_command: int, family_transport: int, length: int
    ) -> None:
        data = V2_SIGNATURE + struct.pack("!BBH", version_command, family_transport, length)
        with pytest.raises(ProxyError) as caught:
            ProxyHeaderReader().feed(data + b"\0" * length)
        assert caught.value.kind is ProxyErrorKind.MALFORMED

    def test_datagram_refused_on_a_stream(self) -> None:
        data = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2))
        data = data[:13] + bytes([0x12]) + data[14:]
        with pytest.raises(ProxyError):
            ProxyHeaderReader().feed(data)

    def test_too_long_refused_from_its_length_field_alone(self) -> None:
        data = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, MAX_V2_SIZE)
        with pytest.raises(ProxyError) as caught:
            ProxyHeaderReader().feed(data)
        assert caught.value.kind is ProxyErrorKind.TOO_LONG


class TestDetection:
    @pytest.mark.parametrize(
        "start", [REQUEST, b"\x16\x03\x01\x02\x00", b"\r\n\r\n\x00\r\nQUIT\x00", b"PROXY-"]
    )
    def test_anything_else_first_is_not_a_header(self, start: bytes) -> None:
        with pytest.raises(ProxyError) as caught:
            ProxyHeaderReader().feed(start)
        assert caught.value.kind is ProxyErrorKind.NOT_PROXY
        assert not starts_like_proxy_header(start)

    def test_whole_signatures_are_recognised(self) -> None:
        assert starts_like_proxy_header(encode_v1(("1.2.3.4", 1), ("1.2.3.4", 2)))
        assert starts_like_proxy_header(encode_v2(None))
        assert not starts_like_proxy_header(b"P")  # PUT, POST, PATCH begin so too
        assert not starts_like_proxy_header(b"")

    @given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
    def test_arbitrary_bytes_give_a_header_more_please_or_a_proxy_error(
        self, data: bytes, cuts: list[int]
    ) -> None:
        try:
            header, _ = feed_in_pieces(data, cuts)
        except ProxyError as error:
            assert error.kind in ProxyErrorKind
            return
        if header is None:
            assert len(data) < MAX_V2_SIZE

    def test_feeding_after_the_header_is_a_mistake(self) -> None:
        reader = ProxyHeaderReader()
        reader.feed(encode_v2(None))
        with pytest.raises(RuntimeError):
            reader.feed(b"x")
