"""GCRA (the token bucket as one timestamp), and the memory store's use of it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wsgate.admission import Candidate, Limits, Reason, Rejected
from wsgate.admission.memory import MemoryStore
from wsgate.admission.rate import gcra, tokens_left
from wsgate.config import RateConfig

ONE_PER_SECOND_BURST_10 = RateConfig(per_second=1, burst=10)


def spend(
    n: int, now: float, rate: RateConfig, tat: float | None = None
) -> tuple[int, float | None]:
    allowed = 0
    for _ in range(n):
        decision = gcra(tat, now, rate)
        if decision.allowed:
            allowed += 1
            tat = decision.tat
    return allowed, tat


def test_burst_then_refill() -> None:
    allowed, tat = spend(20, 100.0, ONE_PER_SECOND_BURST_10)
    assert allowed == 10
    refused = gcra(tat, 100.0, ONE_PER_SECOND_BURST_10)
    assert not refused.allowed and abs(refused.retry_after - 1.0) < 1e-6
    assert not gcra(tat, 100.9, ONE_PER_SECOND_BURST_10).allowed
    assert gcra(tat, 101.0, ONE_PER_SECOND_BURST_10).allowed


def test_tokens_left_counts_down_and_refills() -> None:
    rate = ONE_PER_SECOND_BURST_10
    assert tokens_left(None, 0.0, rate) == 10
    _, tat = spend(4, 0.0, rate)
    assert tokens_left(tat, 0.0, rate) == 6
    assert tokens_left(tat, 2.5, rate) == 8.5
    assert tokens_left(tat, 1000.0, rate) == 10


@given(
    st.floats(0.1, 100),
    st.integers(1, 50),
    st.lists(st.floats(0, 5), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_rate_times_elapsed(
    per_second: float, burst: int, gaps: list[float]
) -> None:
    rate = RateConfig(per_second=per_second, burst=burst)
    now, tat, allowed = 0.0, None, 0
    for gap in gaps:
        now += gap
        decision = gcra(tat, now, rate)
        if decision.allowed:
            allowed += 1
            tat = decision.tat
        else:
            assert decision.retry_after > 0
    assert allowed <= burst + per_second * now + 1e-6


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_tokens_are_spent_only_by_admitted_connections() -> None:
    clock = FakeClock()
    store = MemoryStore(Limits(connect_rate=RateConfig(per_second=1, burst=2)), clock=clock)
    full = [Candidate("a", 1)]
    assert not isinstance(store.admit_now(full), Rejected)
    # No capacity: refused with 503, and the token stays in the bucket.
    for _ in range(5):
        refused = store.admit_now(full)
        assert isinstance(refused, Rejected) and refused.reason == Reason.NO_CAPACITY
    assert store.tokens_available() == 1
    assert not isinstance(store.admit_now([Candidate("b", 1)]), Rejected)
    limited = store.admit_now([Candidate("c", 1)])
    assert isinstance(limited, Rejected) and limited.reason == Reason.RATE_LIMITED


def test_client_bucket_is_per_key_and_spares_the_global_bucket() -> None:
    clock = FakeClock()
    store = MemoryStore(
        Limits(
            connect_rate=RateConfig(per_second=1, burst=5),
            client_connect_rate=RateConfig(per_second=1, burst=1),
        ),
        clock=clock,
    )
    wide = [Candidate("a", 100)]
    assert not isinstance(store.admit_now(wide, client_key="1.1.1.1"), Rejected)
    refused = store.admit_now(wide, client_key="1.1.1.1")
    assert isinstance(refused, Rejected) and refused.reason == Reason.CLIENT_RATE_LIMITED
    assert store.tokens_available() == 4  # the refused client spent no global token
    assert not isinstance(store.admit_now(wide, client_key="2.2.2.2"), Rejected)


def test_release_is_idempotent() -> None:
    store = MemoryStore()
    admitted = store.admit_now([Candidate("a", 1)])
    assert not isinstance(admitted, Rejected)
    store.release_now(admitted.ticket)
    store.release_now(admitted.ticket)
    assert store.global_counts() == {}
    assert not isinstance(store.admit_now([Candidate("a", 1)]), Rejected)
