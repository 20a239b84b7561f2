"""The admission contract, run against both stores: memory and Redis (a real redis-server).

Every test here must pass unchanged for both; that is what makes the Redis store a
drop-in for the embedded one.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from wsgate.admission import (
    AdmissionStore,
    Admitted,
    Candidate,
    Limits,
    Reason,
    Rejected,
    choose_backend,
)
from wsgate.admission.memory import MemoryStore
from wsgate.admission.redis import RedisStore, key_prefix
from wsgate.config import RateConfig
from wsgate.testbed.processes import RedisServer

MakeStore = Callable[..., Awaitable[AdmissionStore]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Build started stores of the parametrized kind; all are closed after the test."""
    made: list[AdmissionStore] = []
    server: RedisServer | None = None
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")

    async def make(limits: Limits | None = None) -> AdmissionStore:
        store: AdmissionStore
        if server is None:
            store = MemoryStore(limits or Limits())
        else:
            store = RedisStore(
                server.url,
                namespace=f"t{uuid.uuid4().hex[:8]}",
                replica_id=f"r{len(made)}",
                lease_ttl=30.0,
                timeout=2.0,  # a shared, busy test machine: never mistake load for an outage
                on_failure="closed",
                limits=limits or Limits(),
            )
        await store.start()
        made.append(store)
        assert store.mode == "ok"
        return store

    yield make
    for store in made:
        await store.close()


def pods(*caps: int) -> list[Candidate]:
    return [Candidate(f"pod-{i}", cap) for i, cap in enumerate(caps)]


async def admit_many(
    store: AdmissionStore,
    count: int,
    candidates: Sequence[Candidate],
    *,
    client_key: str | None = None,
    least_loaded: bool = False,
    preferred: str | None = None,
) -> list[Admitted | Rejected]:
    return [
        await store.admit(
            candidates, client_key=client_key, least_loaded=least_loaded, preferred=preferred
        )
        for _ in range(count)
    ]


def backends_of(decisions: Sequence[Admitted | Rejected]) -> list[str | None]:
    return [d.backend_id if isinstance(d, Admitted) else None for d in decisions]


async def test_caps_hold_and_the_rest_is_no_capacity(make_store: MakeStore) -> None:
    store = await make_store(Limits(no_capacity_retry_after=7.0))
    decisions = await admit_many(store, 6, pods(2, 2))
    assert backends_of(decisions) == ["pod-0", "pod-0", "pod-1", "pod-1", None, None]
    rejected = decisions[-1]
    assert isinstance(rejected, Rejected)
    assert rejected.reason is Reason.NO_CAPACITY and rejected.status == 503
    assert rejected.retry_after == 7.0
    assert store.global_counts() == {"pod-0": 2, "pod-1": 2}
    assert store.local_counts() == {"pod-0": 2, "pod-1": 2}


async def test_a_released_slot_is_reused(make_store: MakeStore) -> None:
    store = await make_store()
    first, second = await admit_many(store, 2, pods(2))
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    assert isinstance(await store.admit(pods(2)), Rejected)
    await store.release(first.ticket)
    again = await store.admit(pods(2))
    assert isinstance(again, Admitted) and again.backend_id == "pod-0"


async def test_release_is_idempotent(make_store: MakeStore) -> None:
    store = await make_store()
    one, two = await admit_many(store, 2, pods(3))
    assert isinstance(one, Admitted) and isinstance(two, Admitted)
    await store.release(one.ticket)
    await store.release(one.ticket)
    assert store.local_counts() == {"pod-0": 1}
    assert store.global_counts() == {"pod-0": 1}
    await store.release(two.ticket)
    assert store.local_counts() == {}
    assert store.global_counts() == {}


async def test_no_candidates_is_no_healthy_backend(make_store: MakeStore) -> None:
    store = await make_store(Limits(connect_rate=RateConfig(per_second=1, burst=1)))
    decision = await store.admit([])
    assert isinstance(decision, Rejected)
    assert decision.reason is Reason.NO_HEALTHY_BACKEND and decision.status == 503
    assert store.tokens_available() == pytest.approx(1.0)


async def test_connect_rate_admits_exactly_the_burst(make_store: MakeStore) -> None:
    store = await make_store(Limits(connect_rate=RateConfig(per_second=1, burst=10)))
    decisions = await admit_many(store, 20, pods(100))
    admitted = [d for d in decisions if isinstance(d, Admitted)]
    rejected = [d for d in decisions if isinstance(d, Rejected)]
    assert len(admitted) == 10
    assert decisions[:10] == admitted
    assert {d.reason for d in rejected} == {Reason.RATE_LIMITED}
    assert all(d.status == 429 for d in rejected)
    # The next token is about a second away (less what the 20 calls took).
    assert all(0.7 <= d.retry_after <= 1.0 for d in rejected)
    tokens = store.tokens_available()
    assert tokens is not None and tokens < 0.5


async def test_tokens_are_spent_only_by_admitted_connections(make_store: MakeStore) -> None:
    store = await make_store(Limits(connect_rate=RateConfig(per_second=0.01, burst=2)))
    first = await store.admit(pods(1))
    assert isinstance(first, Admitted)
    for decision in await admit_many(store, 5, pods(1)):
        assert isinstance(decision, Rejected) and decision.reason is Reason.NO_CAPACITY
    await store.release(first.ticket)
    assert isinstance(await store.admit(pods(1)), Admitted)  # the second token
    last = await store.admit(pods(2))
    assert isinstance(last, Rejected) and last.reason is Reason.RATE_LIMITED


async def test_client_rate_is_per_client_and_spares_the_global_bucket(
    make_store: MakeStore,
) -> None:
    store = await make_store(
        Limits(
            connect_rate=RateConfig(per_second=0.01, burst=3),
            client_connect_rate=RateConfig(per_second=0.01, burst=2),
        )
    )
    a = await admit_many(store, 3, pods(10), client_key="127.0.0.2")
    assert backends_of(a) == ["pod-0", "pod-0", None]
    limited = a[2]
    assert isinstance(limited, Rejected)
    assert limited.reason is Reason.CLIENT_RATE_LIMITED and limited.status == 429
    assert limited.retry_after > 50
    # The client's refusal spent no global token: another client gets the third.
    assert isinstance(await store.admit(pods(10), client_key="127.0.0.3"), Admitted)
    last = await store.admit(pods(10), client_key="127.0.0.4")
    assert isinstance(last, Rejected) and last.reason is Reason.RATE_LIMITED


async def test_least_loaded_picks_the_lowest_share_of_cap(make_store: MakeStore) -> None:
    store = await make_store()
    candidates = [Candidate("small", 2), Candidate("big", 4)]
    decisions = await admit_many(store, 7, candidates, least_loaded=True)
    # Equal shares go to the smallest id ("big" < "small").
    assert backends_of(decisions) == ["big", "small", "big", "big", "small", "big", None]


async def test_preferred_wins_while_it_has_room(make_store: MakeStore) -> None:
    store = await make_store()
    candidates = pods(1, 2, 2)
    first_fit = await admit_many(store, 3, candidates, preferred="pod-2")
    assert backends_of(first_fit) == ["pod-2", "pod-2", "pod-0"]
    least = await admit_many(store, 3, candidates, preferred="pod-2", least_loaded=True)
    assert backends_of(least) == ["pod-1", "pod-1", None]


async def test_preferred_outside_the_candidates_changes_nothing(make_store: MakeStore) -> None:
    store = await make_store()
    decisions = await admit_many(store, 3, pods(1, 1), preferred="gone")
    assert backends_of(decisions) == ["pod-0", "pod-1", None]


async def test_close_tokens_share_one_budget(make_store: MakeStore) -> None:
    store = await make_store()
    assert await store.acquire_close_tokens(2.5, 10) == 3  # burst: ceil(2.5)
    assert await store.acquire_close_tokens(2.5, 10) == 0
    assert await store.acquire_close_tokens(2.5, 0) == 0
    slow = await make_store()
    assert await slow.acquire_close_tokens(0.5, 5) == 1  # the burst is at least one


async def test_snapshot_tells_kind_mode_and_counts(make_store: MakeStore) -> None:
    store = await make_store()
    decision = await store.admit(pods(2))
    assert isinstance(decision, Admitted)
    snapshot = await store.snapshot()
    assert snapshot["kind"] == store.kind
    assert snapshot["mode"] == "ok"
    assert snapshot["global"] == {"pod-0": 1}
    assert snapshot["local"] == {"pod-0": 1}
    assert store.live_replicas() == 1


# -- the script's choice is contract.choose_backend's, for any counts -----------------

candidate_lists = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(1, 4), st.integers(0, 5)),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)


@pytest.mark.redis
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    entries=candidate_lists,
    least_loaded=st.booleans(),
    preferred=st.sampled_from([None, "a", "c", "z"]),
)
def test_script_chooses_like_choose_backend(
    redis_server: RedisServer,
    entries: list[tuple[str, int, int]],
    least_loaded: bool,
    preferred: str | None,
) -> None:
    """Other replicas' counts are written straight into ``total``; the script must pick
    exactly what the Python rule picks from the same counts."""
    import asyncio

    candidates = [Candidate(name, cap) for name, cap, _ in entries]
    used = {name: count for name, _, count in entries}
    expected = choose_backend(
        candidates, lambda b: used[b], least_loaded=least_loaded, preferred=preferred
    )

    async def decide() -> Admitted | Rejected:
        store = RedisStore(redis_server.url, namespace="parity", replica_id="p", timeout=2.0)
        await store.start()
        try:
            return await store.admit(candidates, least_loaded=least_loaded, preferred=preferred)
        finally:
            await store.close()

    plain = Redis.from_url(redis_server.url)
    try:
        plain.flushall()
        for name, count in used.items():
            if count:
                plain.hset(key_prefix("parity") + ":total", name, count)
        decision = asyncio.run(decide())
    finally:
        plain.close()
    assert (decision.backend_id if isinstance(decision, Admitted) else None) == expected
