"""Pure pieces of the shared store: local shares while Redis is away, the close budget,
how ``wsgate state`` reads the script's snapshot, how commands are packed. No I/O."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import AbstractConnection

from wsgate.admission import Candidate, Limits, Reason, Rejected
from wsgate.admission.inspect import describe, render
from wsgate.admission.local import LocalDecision, share_choice
from wsgate.admission.memory import take_tokens
from wsgate.admission.redis import HiredisPackingConnection, key_prefix
from wsgate.config import RateConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def decide(
    share: LocalDecision,
    candidates: list[Candidate],
    held: dict[str, int],
    limits: Limits,
    *,
    live: int,
    client_key: str | None = None,
    least_loaded: bool = False,
    preferred: str | None = None,
) -> str | Rejected:
    """A degraded replica's whole decision: its share of the caps, then the rates."""
    choice = share_choice(
        candidates, held, live, least_loaded=least_loaded, preferred=preferred, first=(), exclude=()
    )
    return share.admit(choice, limits, live=live, client_key=client_key)


def test_all_keys_of_a_namespace_share_one_hash_tag() -> None:
    assert key_prefix("blue") == "{wsgate:blue}"


# -- LocalDecision: local shares ---------------------------------------------------------


def test_local_share_divides_each_cap_and_rounds_down() -> None:
    share = LocalDecision(Clock())
    candidates = [Candidate("a", 5), Candidate("b", 4), Candidate("c", 2)]
    held: dict[str, int] = {}
    picks = []
    for _ in range(8):
        decision = decide(share, candidates, held, Limits(), live=3)
        if isinstance(decision, Rejected):
            picks.append(decision.reason)
            continue
        held[decision] = held.get(decision, 0) + 1
        picks.append(decision)
    # 5 // 3 = 1, 4 // 3 = 1, 2 // 3 = 0 (no share at all)
    assert picks[:3] == ["a", "b", Reason.NO_CAPACITY]


def test_local_share_counts_what_this_replica_already_holds() -> None:
    share = LocalDecision(Clock())
    decision = decide(share, [Candidate("a", 4)], {"a": 2}, Limits(), live=2)
    assert isinstance(decision, Rejected) and decision.reason is Reason.NO_CAPACITY
    assert decide(share, [Candidate("a", 4)], {"a": 1}, Limits(), live=2) == "a"


def test_local_share_of_the_rate() -> None:
    clock = Clock()
    share = LocalDecision(clock)
    limits = Limits(connect_rate=RateConfig(per_second=2, burst=10))
    results = [decide(share, [Candidate("a", 100)], {}, limits, live=4) for _ in range(4)]
    assert results[:2] == ["a", "a"]  # 10 // 4 = 2 tokens
    assert isinstance(results[2], Rejected) and results[2].reason is Reason.RATE_LIMITED
    assert results[2].retry_after == pytest.approx(2.0)  # refill at 2/4 per second
    clock.now += 2.0
    assert decide(share, [Candidate("a", 100)], {}, limits, live=4) == "a"


def test_local_share_with_less_burst_than_replicas_admits_nothing() -> None:
    share = LocalDecision(Clock())
    limits = Limits(connect_rate=RateConfig(per_second=1, burst=2))
    decision = decide(share, [Candidate("a", 100)], {}, limits, live=3)
    assert isinstance(decision, Rejected) and decision.reason is Reason.RATE_LIMITED


def test_local_client_rate_applies_in_full_and_spares_the_shared_tokens() -> None:
    share = LocalDecision(Clock())
    limits = Limits(
        connect_rate=RateConfig(per_second=0.01, burst=4),
        client_connect_rate=RateConfig(per_second=0.01, burst=1),
    )
    pods = [Candidate("a", 100)]
    assert decide(share, pods, {}, limits, live=2, client_key="x") == "a"
    refused = decide(share, pods, {}, limits, live=2, client_key="x")
    assert isinstance(refused, Rejected) and refused.reason is Reason.CLIENT_RATE_LIMITED
    assert decide(share, pods, {}, limits, live=2, client_key="y") == "a"


def test_local_share_keeps_the_choice_rule() -> None:
    share = LocalDecision(Clock())
    pods = [Candidate("a", 4), Candidate("b", 4)]
    assert decide(share, pods, {"a": 1}, Limits(), live=2, least_loaded=True) == "b"
    assert decide(share, pods, {}, Limits(), live=2, preferred="b") == "b"


# -- the shared close budget ------------------------------------------------------------------


def test_local_client_cap_refuses_a_full_client_before_spending_a_token() -> None:
    clock = Clock()
    share = LocalDecision(clock)
    limits = Limits(max_connections_per_client=2, connect_rate=RateConfig(per_second=1, burst=1))
    refused = share.admit("a", limits, client_key="10.0.0.1", clients={"10.0.0.1": 2})
    assert isinstance(refused, Rejected) and refused.reason is Reason.CLIENT_CONNECTION_LIMIT
    # Nothing was spent: another client still gets the one token there is.
    assert share.admit("a", limits, client_key="10.0.0.2", clients={"10.0.0.1": 2}) == "a"


def test_take_tokens_grants_the_burst_then_the_rate() -> None:
    granted, tat = take_tokens(None, 10.0, per_second=2, burst=2, want=5)
    assert granted == 2
    assert take_tokens(tat, 10.0, 2, 2, 5)[0] == 0
    assert take_tokens(tat, 10.5, 2, 2, 5)[0] == 1
    assert take_tokens(tat, 20.0, 2, 2, 1)[0] == 1
    assert take_tokens(tat, 10.0, 2, 2, 0) == (0, tat)


# -- wsgate state's reading of the snapshot ----------------------------------------------------


def snapshot_reply() -> list[object]:
    now_ms = 1_000_000.0
    return [
        str(now_ms * 1000).encode(),
        [b"gw-a", str(now_ms + 9000).encode(), b"gw-b", str(now_ms - 500).encode()],
        [b"gw-a", str(now_ms - 1000).encode()],
        [b"pod-1", b"3", b"pod-2", b"1"],
        [b"pod-1", b"2"],
        [b"rate_per_second", b"1.0", b"rate_burst", b"10", b"client_per_second", b"0"],
        b"4000000",
        [b"gw-a", [b"pod-1", b"2"], b"gw-b", [b"pod-1", b"1", b"pod-2", b"1"]],
    ]


def test_describe_turns_the_reply_into_plain_data() -> None:
    state = describe(snapshot_reply(), store="redis://x", namespace="ns", client_buckets=7)
    gw_a, gw_b = state["replicas"]
    assert gw_a == {
        "id": "gw-a",
        "lease_age": 1.0,
        "expires_in": 9.0,
        "held": {"pod-1": 2},
        "slots": 2,
        "connection": None,  # no departures watched in this reply
    }
    assert gw_b["lease_age"] is None and gw_b["expires_in"] == -0.5
    pod_1, pod_2 = state["backends"]
    assert pod_1 == {
        "id": "pod-1",
        "live": 3,
        "cap": 2,
        "over_cap": True,
        "held_by": {"gw-a": 2, "gw-b": 1},
    }
    assert pod_2["cap"] is None and not pod_2["over_cap"]
    assert state["rate"] == {"per_second": 1.0, "burst": 10.0, "tokens": 6.0}
    assert state["client_rate"] is None
    assert state["totals"] == {
        "replicas": 2,
        "backends": 2,
        "live": 4,
        "capacity": None,
        "held": 4,
        "clients": 0,
    }


def test_describe_says_whether_each_watched_connection_is_open() -> None:
    now_ms = 1_000_000.0
    leases = [b"gw-a", b"gw-b", b"gw-c"]
    reply = [
        *snapshot_reply(),
        b"0",  # clients
        [b"gw-a", b"run1:7", b"gw-b", b"run1:8", b"gw-c", b"run0:3"],  # who is watched by what
        [b"gw-a", str(now_ms + 800).encode(), b"gw-b", str(now_ms - 5).encode()],  # alive until
    ]
    reply[1] = [x for replica in leases for x in (replica, str(now_ms + 9000).encode())]
    open_names = {"run1:7": True, "run1:8": False}  # gw-c's is another server's: not asked
    state = describe(reply, store="redis://x", namespace="ns", open_names=open_names)
    connections = {r["id"]: r["connection"] for r in state["replicas"]}
    assert connections == {
        "gw-a": {"name": "run1:7", "open": True, "quiet_for": 0.8},
        "gw-b": {"name": "run1:8", "open": False, "quiet_for": 0.0},
        "gw-c": {"name": "run0:3", "open": None, "quiet_for": 0.0},
    }
    from rich.console import Console

    console = Console(width=140, record=True, color_system=None)
    console.print(render(state))
    text = console.export_text()
    assert "open" in text and "closed" in text and "?" in text


def test_render_marks_expired_leases_and_backends_over_cap() -> None:
    from rich.console import Console

    state = describe(snapshot_reply(), store="redis://x", namespace="ns")
    console = Console(width=120, record=True, color_system=None)
    console.print(render(state))
    text = console.export_text()
    assert "expired" in text
    assert "3 / 2" in text and "1 / ?" in text
    assert "6.0 of 10 tokens" in text


@pytest.mark.parametrize(
    "command",
    [
        ("EVALSHA", "f" * 40, 1, "{wsgate:default}:replicas", "admit", 0, "r-1", 2.5, b"\x00raw"),
        ("SCRIPT LOAD", "return 1"),
        (b"SCRIPT EXISTS", "abc"),
        ("PING",),
    ],
)
def test_hiredis_packing_matches_redis_py(command: tuple[object, ...]) -> None:
    connection = HiredisPackingConnection()
    python_packed = b"".join(AbstractConnection.pack_command(connection, *command))
    assert b"".join(connection.pack_command(*command)) == python_packed
