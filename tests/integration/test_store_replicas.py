"""Several RedisStore replicas sharing one real redis-server: exact caps and rate under
concurrency, leases, and what happens when Redis stops, dies or forgets everything."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from fleet import presence
from redis import Redis

from wsgate.admission import Admitted, Candidate, Limits, Reason, Rejected, Ticket
from wsgate.admission.redis import RedisStore, key_prefix
from wsgate.admission.redis.script import SCRIPT_SHA, depart_call
from wsgate.config import RateConfig
from wsgate.testbed.processes import RedisServer

NS = "replicas"
MakeReplica = Callable[..., Awaitable[RedisStore]]

pytestmark = pytest.mark.redis


@pytest.fixture
async def make_replica(redis_server: RedisServer) -> AsyncIterator[MakeReplica]:
    made: list[RedisStore] = []

    async def make(**options: object) -> RedisStore:
        settings: dict[str, object] = {
            "namespace": NS,
            "replica_id": f"replica-{len(made)}",
            "lease_ttl": 30.0,
            "timeout": 1.0,
            "on_failure": "closed",
            "limits": Limits(),
        }
        settings.update(options)
        store = RedisStore(redis_server.url, **settings)  # type: ignore[arg-type]
        await store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        if redis_server.process is not None:
            redis_server.process.signal(signal.SIGCONT)
        await store.close()


def shared_state(server: RedisServer) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """``total`` and every registered replica's ``held`` as Redis has them now."""
    prefix = key_prefix(NS)
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        total = {k: int(v) for k, v in client.hgetall(f"{prefix}:total").items()}
        held = {
            replica: {k: int(v) for k, v in client.hgetall(f"{prefix}:held:{replica}").items()}
            for replica in client.zrange(f"{prefix}:replicas", 0, -1)
        }
    finally:
        client.close()
    return total, held


def truth(*stores: RedisStore) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for store in stores:
        counts.update(store.local_counts())
    return {backend: count for backend, count in counts.items() if count}


def pods(*caps: int) -> list[Candidate]:
    return [Candidate(f"pod-{i}", cap) for i, cap in enumerate(caps)]


async def wait_until(condition: Callable[[], bool], within: float, step: float = 0.02) -> float:
    """Seconds it took for ``condition`` to hold; fails after ``within``."""
    started = time.monotonic()
    for _ in range(int(within / step) + 1):
        if condition():
            return time.monotonic() - started
        await asyncio.sleep(step)
    raise AssertionError(f"condition not met within {within}s")


async def test_caps_are_exact_under_concurrency(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    stores = [await make_replica() for _ in range(4)]
    rng = random.Random(7)
    candidates = pods(2, 2, 2, 2)

    async def attempt(i: int) -> Admitted | Rejected:
        order = candidates[:]
        rng.shuffle(order)
        return await stores[i % 4].admit(order, least_loaded=rng.random() < 0.5)

    decisions = await asyncio.gather(*(attempt(i) for i in range(400)))
    admitted = [d for d in decisions if isinstance(d, Admitted)]
    assert len(admitted) == 8
    assert Counter(d.backend_id for d in admitted) == {f"pod-{i}": 2 for i in range(4)}
    assert {d.reason for d in decisions if isinstance(d, Rejected)} == {Reason.NO_CAPACITY}
    total, held = shared_state(redis_server)
    assert total == truth(*stores) == {f"pod-{i}": 2 for i in range(4)}
    for store in stores:
        assert held[store.replica_id] == store.local_counts()


async def test_one_connect_rate_for_all_replicas(make_replica: MakeReplica) -> None:
    limits = Limits(connect_rate=RateConfig(per_second=1, burst=10))
    stores = [await make_replica(limits=limits) for _ in range(3)]
    decisions = await asyncio.gather(*(stores[i % 3].admit(pods(100)) for i in range(30)))
    assert sum(isinstance(d, Admitted) for d in decisions) == 10
    assert {d.reason for d in decisions if isinstance(d, Rejected)} == {Reason.RATE_LIMITED}


async def test_least_loaded_uses_the_global_counts(make_replica: MakeReplica) -> None:
    one, two = await make_replica(), await make_replica()
    candidates = pods(10, 10, 10)
    for i in range(12):
        decision = await (one if i % 3 else two).admit(candidates, least_loaded=True)
        assert isinstance(decision, Admitted)
    assert truth(one, two) == {"pod-0": 4, "pod-1": 4, "pod-2": 4}


async def test_a_dead_replicas_slots_come_back_within_the_lease(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    ttl = 1.2
    dead = await make_replica(lease_ttl=ttl)
    alive = await make_replica(lease_ttl=ttl)
    for _ in range(2):
        assert isinstance(await dead.admit(pods(2)), Admitted)
    assert isinstance(await alive.admit(pods(2)), Rejected)
    await dead.abandon()  # a crash: no release, no goodbye
    died = time.monotonic()

    got: list[Admitted | Rejected] = []

    async def poll() -> None:
        for _ in range(200):
            decision = await alive.admit(pods(2))
            if isinstance(decision, Admitted):
                got.append(decision)
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), 5)
    waited = time.monotonic() - died
    assert got, "the dead replica's slots never came back"
    assert waited <= ttl + ttl / 3 + 0.4
    total, held = shared_state(redis_server)
    assert dead.replica_id not in held
    assert total == {"pod-0": 1}


async def test_a_replica_whose_connections_closed_is_reaped_before_its_lease(
    make_replica: MakeReplica, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "wsgate.state")
    check = 0.1
    dead = await make_replica(departure_check=check)  # both leases: 30 s
    alive = await make_replica(departure_check=check)
    await wait_until(lambda: len(presence(redis_server, NS)) == 2, within=3)
    for _ in range(2):
        assert isinstance(await dead.admit(pods(2)), Admitted)
    assert isinstance(await alive.admit(pods(2)), Rejected)
    await dead.abandon()  # its connections close, as a process's do when it ends

    async def admitted() -> bool:
        return isinstance(await alive.admit(pods(2)), Admitted)

    started = time.monotonic()
    for _ in range(100):
        if await admitted():
            break
        await asyncio.sleep(0.02)
    waited = time.monotonic() - started
    quiet = 2 * check + 0.25  # silent for this long, beside its connection closing
    assert waited <= quiet + 2 * check + 0.5
    total, held = shared_state(redis_server)
    assert dead.replica_id not in held and dead.replica_id not in presence(redis_server, NS)
    assert total == {"pod-0": 1}
    assert alive.departures_total == 1
    assert f"replica {dead.replica_id} closed its connection to Redis" in caplog.text


async def test_refusals_while_a_departure_is_due_say_to_retry_once_it_is(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    check = 1.0
    configured = Limits().no_capacity_retry_after
    dead = await make_replica(departure_check=check)  # both leases: 30 s
    alive = await make_replica(departure_check=check)
    await wait_until(lambda: len(presence(redis_server, NS)) == 2, within=3)
    for _ in range(2):
        assert isinstance(await dead.admit(pods(2)), Admitted)
    full = await alive.admit(pods(2))
    assert isinstance(full, Rejected) and full.retry_after == configured  # nobody leaving
    # End the replica just after the survivor's watcher has looked, as the
    # server saw it (each look starts by saying it lives): its next look on
    # its own would come a whole ``check`` later, so a hint sooner than that
    # shows the refusals made it look at once.
    client = Redis.from_url(redis_server.url, decode_responses=True)
    seen = f"{key_prefix(NS)}:seen"
    try:
        before = client.hget(seen, alive.replica_id)
        await wait_until(lambda: client.hget(seen, alive.replica_id) != before, within=2 * check)
    finally:
        client.close()
    await asyncio.sleep(check / 10)  # that look is over: it saw both replicas
    await dead.abandon()  # its connections close, as a process's do when it ends
    killed = time.monotonic()
    quiet = 2 * check + 0.25
    refusals: list[tuple[float, float]] = []  # (when, Retry-After)
    decision: Admitted | Rejected = full
    while time.monotonic() - killed < quiet + 2 * check + 1.0:
        decision = await alive.admit(pods(2))
        if isinstance(decision, Admitted):
            break
        assert decision.reason is Reason.NO_CAPACITY
        refusals.append((time.monotonic(), decision.retry_after))
        await asyncio.sleep(0.02)
    admitted_at = time.monotonic()
    assert isinstance(decision, Admitted)
    # The first refusal makes the watcher look (a fifth of ``check`` after its
    # last); from then on every refusal says to come back once the slots are
    # due, and they were back by then.
    hinted = [i for i, (_, retry) in enumerate(refusals) if retry < configured]
    assert hinted, refusals
    first = hinted[0]
    assert refusals[first][0] - killed < 0.75 * check, refusals
    assert hinted == list(range(first, len(refusals))), refusals
    for at, retry in refusals[first:]:
        assert retry <= quiet + check + 0.05
        assert at + retry >= admitted_at - 0.05  # not sent back before the slots were
    # Departed: a refusal for a pool that is full again says what is configured.
    assert isinstance(await alive.admit(pods(2)), Admitted)
    await asyncio.sleep(check)
    again = await alive.admit(pods(2))
    assert isinstance(again, Rejected) and again.retry_after == configured


async def test_a_departure_is_void_if_the_replica_named_another_connection_or_lives(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    store = await make_replica(departure_check=0.1)
    await wait_until(lambda: store.replica_id in presence(redis_server, NS), within=3)
    named = presence(redis_server, NS)[store.replica_id]
    assert isinstance(await store.admit(pods(2)), Admitted)
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = f"{key_prefix(NS)}:replicas"

        def depart(name: str) -> int:
            return int(client.evalsha(SCRIPT_SHA, 1, key, *depart_call(store.replica_id, name)))

        run_id, _, client_id = named.partition(":")
        stale = f"{run_id}:{int(client_id) + 1000}"  # a connection it no longer holds
        await wait_until(lambda: client.hexists(f"{key_prefix(NS)}:seen", store.replica_id), 3)
        assert depart(stale) == 0
        assert depart(named) == 0  # it said it lives, for 0.45 s from then
        assert shared_state(redis_server)[0] == {"pod-0": 1}
        await store.abandon()  # silent from now on
        client.hset(f"{key_prefix(NS)}:presence", store.replica_id, named)  # as it was
        await asyncio.sleep(2 * 0.1 + 0.5)
        assert depart(named) == 1
        assert shared_state(redis_server)[0] == {}
        assert store.replica_id not in presence(redis_server, NS)
    finally:
        client.close()


async def test_a_living_replica_whose_watched_connection_was_reset_is_not_departed(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    # Its holder notices the reset within a second; the other looks ten times a second.
    reset = await make_replica(departure_check=1.0)
    watcher = await make_replica(departure_check=0.1)
    await wait_until(lambda: len(presence(redis_server, NS)) == 2, within=3)
    assert isinstance(await reset.admit(pods(2)), Admitted)
    named = presence(redis_server, NS)[reset.replica_id]
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.execute_command("CLIENT", "KILL", "ID", named.partition(":")[2])
    finally:
        client.close()
    # It names the connection it holds now; meanwhile it kept saying it lives.
    await wait_until(lambda: presence(redis_server, NS).get(reset.replica_id, named) != named, 3)
    await asyncio.sleep(0.5)  # five more looks
    assert watcher.departures_total == 0
    total, held = shared_state(redis_server)
    assert total == {"pod-0": 1} and held[reset.replica_id] == {"pod-0": 1}
    assert reset.mode == "ok"


async def test_nobody_is_departed_for_connections_of_another_server(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    # A name from before a restart or a failover names another server's client ids.
    watcher = await make_replica(departure_check=0.05)
    other = await make_replica(departure_check=0)  # watches nobody, named nothing
    assert isinstance(await other.admit(pods(5)), Admitted)
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        client.hset(f"{key_prefix(NS)}:presence", other.replica_id, "another-server:1")
        await asyncio.sleep(0.5)  # ten checks
        assert client.hget(f"{key_prefix(NS)}:presence", other.replica_id) == "another-server:1"
    finally:
        client.close()
    assert shared_state(redis_server)[0] == {"pod-0": 1}
    assert watcher.departures_total == 0


async def test_a_clean_close_gives_slots_back_at_once(make_replica: MakeReplica) -> None:
    leaving = await make_replica()
    staying = await make_replica()
    for _ in range(2):
        assert isinstance(await leaving.admit(pods(2)), Admitted)
    await leaving.close()
    assert isinstance(await staying.admit(pods(2)), Admitted)


async def test_script_is_reloaded_after_a_script_flush(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    store = await make_replica()
    Redis.from_url(redis_server.url).script_flush()
    assert isinstance(await store.admit(pods(2)), Admitted)
    assert store.mode == "ok"


async def test_redis_stopped_with_on_failure_closed(
    make_replica: MakeReplica, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsgate.state")
    store = await make_replica(timeout=0.1, lease_ttl=3.0)
    held = await store.admit(pods(2))
    assert isinstance(held, Admitted)
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)

    decisions = [await store.admit(pods(2)) for _ in range(20)]
    assert all(isinstance(d, Rejected) and d.reason is Reason.STATE_UNAVAILABLE for d in decisions)
    assert all(d.retry_after >= 1 for d in decisions if isinstance(d, Rejected))
    assert store.mode == "degraded"
    await store.release(held.ticket)  # live connections end normally meanwhile
    assert store.local_counts() == {}

    redis_server.process.signal(signal.SIGCONT)
    await wait_until(lambda: store.mode == "ok", within=2.5)
    assert shared_state(redis_server)[0] == {}
    assert isinstance(await store.admit(pods(2)), Admitted)
    messages = [r.getMessage() for r in caplog.records if r.name == "wsgate.state"]
    assert sum("shared state unavailable" in m for m in messages) == 1
    assert sum(m.startswith("registered as") for m in messages) == 2  # start, return


async def test_redis_stopped_with_on_failure_local(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    limits = Limits(connect_rate=RateConfig(per_second=0.01, burst=10))
    here = await make_replica(timeout=0.1, lease_ttl=3.0, on_failure="local", limits=limits)
    there = await make_replica(timeout=0.1, lease_ttl=3.0, on_failure="local", limits=limits)
    await here.refresh()
    assert here.live_replicas() == 2
    assert isinstance(await here.admit(pods(4, 4)), Admitted)
    assert isinstance(await there.admit(pods(4, 4)), Admitted)
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)

    # Its share: 4 // 2 = 2 per backend on its own counts, and 10 // 2 = 5 tokens.
    local = [await here.admit(pods(4, 4)) for _ in range(5)]
    assert [d.backend_id if isinstance(d, Admitted) else d.reason for d in local] == [
        "pod-0",  # the one that failed over to local
        "pod-1",
        "pod-1",
        Reason.NO_CAPACITY,
        Reason.NO_CAPACITY,
    ]
    assert here.mode == "degraded"
    rate = [await here.admit([Candidate("wide", 100)]) for _ in range(4)]
    assert [isinstance(d, Admitted) for d in rate] == [True, True, False, False]
    assert isinstance(rate[2], Rejected) and rate[2].reason is Reason.RATE_LIMITED

    redis_server.process.signal(signal.SIGCONT)
    await wait_until(lambda: here.mode == "ok", within=2.5)
    await there.refresh()
    total, held = shared_state(redis_server)
    assert total == truth(here, there) == {"pod-0": 3, "pod-1": 2, "wide": 2}
    assert held[here.replica_id] == here.local_counts()
    assert held[there.replica_id] == there.local_counts()


async def test_redis_frozen_longer_than_the_lease_reaps_nobody(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    ttl = 1.0
    first = await make_replica(timeout=0.1, lease_ttl=ttl)
    second = await make_replica(timeout=0.1, lease_ttl=ttl)
    assert isinstance(await first.admit(pods(2)), Admitted)
    assert isinstance(await second.admit(pods(2)), Admitted)
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    await asyncio.sleep(ttl * 1.6)
    redis_server.process.signal(signal.SIGCONT)
    await first.refresh()
    # The first to come back must not take the second's slots for a dead replica's.
    total, held = shared_state(redis_server)
    assert second.replica_id in held and held[second.replica_id] == {"pod-0": 1}
    assert total == {"pod-0": 2}
    assert isinstance(await first.admit(pods(2)), Rejected)


async def test_redis_restarted_empty_reconciles_within_a_renewal(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    ttl = 1.5
    stores = [await make_replica(timeout=0.2, lease_ttl=ttl) for _ in range(3)]
    for i in range(7):
        assert isinstance(await stores[i % 3].admit(pods(3, 3, 3), least_loaded=True), Admitted)
    expected = truth(*stores)
    redis_server.restart()
    restarted = time.monotonic()

    def reconciled() -> bool:
        total, held = shared_state(redis_server)
        return total == expected and all(held.get(s.replica_id) == s.local_counts() for s in stores)

    await wait_until(reconciled, within=ttl / 3 + 1.5)
    assert time.monotonic() - restarted <= ttl / 3 + 1.0
    # Redis lost its data: they admit through it again one lease after that was seen.
    await wait_until(lambda: all(s.mode == "ok" for s in stores), within=ttl + 1.5)
    decisions = [await stores[0].admit(pods(3, 3, 3)) for _ in range(4)]
    assert sum(isinstance(d, Admitted) for d in decisions) == 2  # 9 - 7
    assert shared_state(redis_server)[0] == {f"pod-{i}": 3 for i in range(3)}


async def test_lease_lost_while_alive_sheds_the_excess(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    lost = await make_replica()
    other = await make_replica()
    tickets: list[Ticket] = []
    for _ in range(2):
        decision = await lost.admit(pods(2))
        assert isinstance(decision, Admitted)
        tickets.append(decision.ticket)
    excess: list[tuple[str, int]] = []
    lost.on_excess = lambda backend, count: excess.append((backend, count))

    # Its lease runs out (as if it could not renew for a whole TTL) and is reaped.
    Redis.from_url(redis_server.url).zadd(f"{key_prefix(NS)}:replicas", {lost.replica_id: 0})
    await other.refresh()
    assert shared_state(redis_server)[0] == {}
    for _ in range(2):
        assert isinstance(await other.admit(pods(2)), Admitted)

    # It must not admit with a lost lease, and on its next renewal it registers
    # what it still holds and learns it is 2 over the cap.
    refused = await lost.admit(pods(2))
    assert isinstance(refused, Rejected) and refused.reason is Reason.STATE_UNAVAILABLE
    await lost.refresh()
    assert lost.mode == "ok"
    assert excess == [("pod-0", 2)]
    assert shared_state(redis_server)[0] == {"pod-0": 4}
    for ticket in tickets[::-1]:  # the gateway closes its newest connections there
        await lost.release(ticket)
    total, held = shared_state(redis_server)
    assert total == truth(lost, other) == {"pod-0": 2}
    assert held[lost.replica_id] == {}


async def test_a_cancelled_admission_gives_its_slot_back(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    store = await make_replica(timeout=5.0)
    plain = Redis.from_url(redis_server.url)

    def script_runs() -> int:
        return int(plain.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))

    before = script_runs()
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    try:
        pending = asyncio.create_task(store.admit(pods(2)))
        await asyncio.sleep(0.1)  # the call is on its way to a Redis that cannot answer
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
    finally:
        redis_server.process.signal(signal.SIGCONT)
    # Redis ran the admission after all; the store must take the slot back itself.
    await wait_until(lambda: script_runs() >= before + 2, within=3)  # admit, then release
    assert shared_state(redis_server)[0] == {}
    plain.close()
    assert store.local_counts() == {}
    assert store.mode == "ok"
    for _ in range(2):
        assert isinstance(await store.admit(pods(2)), Admitted)


async def test_admissions_given_up_on_do_not_take_effect_later(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    gave_up = await make_replica(timeout=0.1, lease_ttl=3.0)
    other = await make_replica(timeout=0.1, lease_ttl=3.0)
    await gave_up.refresh()  # a quick round trip: it knows Redis's clock
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    try:
        decisions = await asyncio.gather(*(gave_up.admit(pods(2, 2)) for _ in range(5)))
        assert {d.reason for d in decisions if isinstance(d, Rejected)} == {
            Reason.STATE_UNAVAILABLE
        }
        await asyncio.sleep(0.2)
    finally:
        redis_server.process.signal(signal.SIGCONT)
    # Redis now runs what was sent before it froze; those calls are past their
    # deadline and change nothing, so the other replica sees every slot free.
    await asyncio.sleep(0.2)
    total, held = shared_state(redis_server)
    assert total == {}
    assert not held.get(gave_up.replica_id)
    for _ in range(4):
        assert isinstance(await other.admit(pods(2, 2)), Admitted)
