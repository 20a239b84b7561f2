"""Several ``wsgate serve`` replicas on one real Redis behave as one gateway.

Every count is taken at the far side: the backends' own ``/stats`` (live sessions,
peak, and the sessions their ``--max-connections`` tripwire refused) and what the
clients got. Redis is frozen (SIGSTOP), killed and restarted empty; a replica is
SIGKILLed, and another is frozen for longer than its lease.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter

import pytest
from fleet import (
    DEPARTED_WITHIN,
    DEPARTURE_CHECK,
    all_in_sync,
    live,
    never_over,
    presence,
    redis_total,
    replicas,
    spread_over,
    truth,
)
from gwtools import close_all, open_many, open_one, open_until, wait_until
from lifecycle import close_seen
from websockets.asyncio.client import ClientConnection

from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def test_four_replicas_hold_four_backends_to_exactly_two_each(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 4, tripwire=2)
    gateways = replicas(
        procs, backends, 4, redis_server, "caps", limits={"max_connections_per_backend": 2}
    )
    outcome = await spread_over(gateways, 200)
    try:
        assert outcome.statuses == Counter({101: 8, 503: 192})
        assert {body["error"] for body in outcome.bodies} == {"no_capacity"}
        assert live(backends) == [2, 2, 2, 2]
        never_over(backends, 2)
        assert redis_total(redis_server, "caps") == {b.pod_id: 2 for b in backends}
    finally:
        await close_all(outcome.open)
    await wait_until(lambda: sum(live(backends)) == 0)
    await wait_until(lambda: redis_total(redis_server, "caps") == {})


async def test_three_replicas_share_one_connect_rate(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2)
    gateways = replicas(
        procs,
        backends,
        3,
        redis_server,
        "rate",
        limits={"max_connections_per_backend": 100, "connect_rate": {"per_second": 1, "burst": 10}},
    )
    outcome = await spread_over(gateways, 30)
    try:
        assert outcome.statuses == Counter({101: 10, 429: 20})
        assert {body["error"] for body in outcome.bodies} == {"rate_limited"}
        assert min(outcome.retry_after) >= 1
        assert sum(live(backends)) == 10
    finally:
        await close_all(outcome.open)


async def test_least_conn_spreads_by_the_global_counts(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 3)
    gateways = replicas(
        procs,
        backends,
        2,
        redis_server,
        "spread",
        balance="least_conn",
        limits={"max_connections_per_backend": 50},
    )
    opened: list[ClientConnection] = []
    try:
        for i in range(13):
            opened.append(await open_one(gateways[i % 2].ws_url))
            counts = live(backends)
            assert max(counts) - min(counts) <= 1, counts
        # Now unevenly from one replica only: it still fills the least loaded.
        await close_all(opened[:4])
        del opened[:4]
        await wait_until(lambda: sum(live(backends)) == 9)
        for _ in range(6):
            opened.append(await open_one(gateways[1].ws_url))
        counts = live(backends)
        assert max(counts) - min(counts) <= 1, counts
    finally:
        await close_all(opened)


async def test_a_killed_replicas_slots_come_back_within_the_lease(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2, tripwire=1)
    victim, survivor = replicas(
        procs, backends, 2, redis_server, "kill", limits={"max_connections_per_backend": 1}
    )
    held = await open_many(victim.ws_url, 2)
    assert held.statuses == Counter({101: 2})
    refused = await open_many(survivor.ws_url, 1)
    assert refused.statuses == Counter({503: 1})

    victim.process.kill()
    killed = time.monotonic()
    await wait_until(lambda: sum(live(backends)) == 0, within=5)
    admitted = await open_until(survivor.ws_url, 2)
    took = time.monotonic() - killed
    try:
        assert len(admitted) == 2
        assert took <= 1.5 + 0.5 + 0.6  # lease_ttl + one renewal period + slack
        never_over(backends, 1)
        assert redis_total(redis_server, "kill") == {b.pod_id: 1 for b in backends}
    finally:
        await close_all(admitted)
        await close_all(held.open)


async def test_redis_frozen_fails_closed_and_live_sessions_go_on(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2, tripwire=2)
    gateways = replicas(
        procs,
        backends,
        2,
        redis_server,
        "closed",
        state={"timeout": "100ms", "lease_ttl": "3s"},
        limits={"max_connections_per_backend": 2},
    )
    before = await spread_over(gateways, 2)
    assert before.statuses == Counter({101: 2})
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    try:
        during = await spread_over(gateways, 6)
        assert during.statuses == Counter({503: 6})
        assert {body["error"] for body in during.bodies} == {"state_unavailable"}
        assert min(during.retry_after) >= 1
        for ws in before.open:  # live sessions are untouched
            await ws.send("still there?")
            assert json.loads(await asyncio.wait_for(ws.recv(), 5))["echo"] == "still there?"
        modes = [g.admin("/clusters")["state"]["mode"] for g in gateways]
        assert modes == ["degraded", "degraded"]
    finally:
        redis_server.process.signal(signal.SIGCONT)
    await close_all(before.open[:1])
    await wait_until(
        lambda: all(g.admin("/clusters")["state"]["mode"] == "ok" for g in gateways), within=3
    )
    await wait_until(lambda: redis_total(redis_server, "closed") == truth(backends), within=3)
    after = await spread_over(gateways, 6)
    try:
        assert after.statuses == Counter({101: 3, 503: 3})
        never_over(backends, 2)
    finally:
        await close_all(after.open + before.open)
    for gateway in gateways:
        assert gateway.process.output().count("shared state unavailable") == 1


async def test_redis_frozen_with_local_shares_then_reconciled(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2, tripwire=2)
    gateways = replicas(
        procs,
        backends,
        2,
        redis_server,
        "local",
        state={"timeout": "100ms", "lease_ttl": "3s", "on_failure": "local"},
        limits={"max_connections_per_backend": 2},
    )
    # Shares divide by the live replicas each one last saw: let both see both.
    await wait_until(
        lambda: all(g.admin("/snapshot")["state"]["live_replicas"] == 2 for g in gateways),
        within=3,
    )
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    try:
        # Each replica may hold cap // 2 = 1 per backend on its own: 2 each, 4 in all.
        during = await spread_over(gateways, 10)
        assert during.statuses == Counter({101: 4, 503: 6})
        assert live(backends) == [2, 2]
        never_over(backends, 2)
    finally:
        redis_server.process.signal(signal.SIGCONT)
    started = time.monotonic()
    await wait_until(lambda: redis_total(redis_server, "local") == truth(backends), within=3)
    assert time.monotonic() - started <= 1.0 + 0.5  # one retry period, and slack
    after = await spread_over(gateways, 4)
    try:
        assert after.statuses == Counter({503: 4})
        never_over(backends, 2)
    finally:
        await close_all(during.open + after.open)
    await wait_until(lambda: redis_total(redis_server, "local") == {})


async def test_redis_restarted_empty_counts_the_real_sessions_again(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 3, tripwire=2)
    gateways = replicas(
        procs, backends, 3, redis_server, "restart", limits={"max_connections_per_backend": 2}
    )
    before = await spread_over(gateways, 4)
    assert before.statuses == Counter({101: 4})
    redis_server.restart()
    restarted = time.monotonic()
    await wait_until(
        lambda: (
            sum(live(backends)) == 4 and redis_total(redis_server, "restart") == truth(backends)
        ),
        within=3,
    )
    assert time.monotonic() - restarted <= 0.5 + 1.0  # one renewal period, and slack
    # Redis lost its data: they admit through it again one lease (1.5 s) after that was seen.
    await wait_until(lambda: all_in_sync(gateways), within=3)
    after = await spread_over(gateways, 6)
    try:
        assert after.statuses == Counter({101: 2, 503: 4})  # 6 slots, 4 still held
        assert live(backends) == [2, 2, 2]
        never_over(backends, 2)
    finally:
        await close_all(before.open + after.open)
    await wait_until(lambda: redis_total(redis_server, "restart") == {})


async def test_a_replica_frozen_past_its_lease_sheds_its_excess(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 1)  # no tripwire: the excess must be seen, then shed
    frozen, other = replicas(
        procs, backends, 2, redis_server, "frozen", limits={"max_connections_per_backend": 2}
    )
    old = await open_many(frozen.ws_url, 2)
    assert old.statuses == Counter({101: 2})

    frozen.process.signal(signal.SIGSTOP)
    try:
        # Its lease runs out; the other replica reaps it and fills the slots again.
        newer = await open_until(other.ws_url, 2, tries=80)
        assert len(newer) == 2
        assert live(backends) == [4]
    finally:
        frozen.process.signal(signal.SIGCONT)
    thawed = time.monotonic()
    # It re-registers, learns it is 2 over the cap, and closes its newest sessions: 1013.
    closes = await asyncio.gather(*(close_seen(ws, within=5) for ws in old.open))
    assert [code for _, code, _ in closes] == [1013, 1013]
    assert max(when for when, _, _ in closes) - thawed <= 0.5 + 1.0
    await wait_until(lambda: live(backends) == [2], within=3)
    await wait_until(lambda: redis_total(redis_server, "frozen") == truth(backends), within=3)
    for ws in newer:
        await ws.send("fine")
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["echo"] == "fine"
    await close_all(newer)


async def watched_pair(
    procs: ProcessGroup,
    redis_server: RedisServer,
    backends: list[BackendProcess],
    namespace: str,
    *,
    lease_ttl: str,
    cap: int,
) -> list[GatewayProcess]:
    """Two replicas that look for departures, once each has named its connection."""
    gateways = replicas(
        procs, backends, 2, redis_server, namespace,
        state={"lease_ttl": lease_ttl, "departure_check": f"{DEPARTURE_CHECK}s"},
        limits={"max_connections_per_backend": cap},
    )  # fmt: skip
    await wait_until(lambda: len(presence(redis_server, namespace)) == 2, within=5)
    return gateways


async def test_a_killed_replicas_slots_come_back_long_before_its_lease(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    # A lease of 30 s: only the closing of the killed process's connections can
    # explain the slots coming back within a couple of departure checks.
    backends = start_backends(procs, 2, tripwire=1)
    victim, survivor = await watched_pair(
        procs, redis_server, backends, "depart", lease_ttl="30s", cap=1
    )
    held = await open_many(victim.ws_url, 2)
    assert held.statuses == Counter({101: 2})
    refused = await open_many(survivor.ws_url, 1)
    assert refused.statuses == Counter({503: 1})

    victim.process.kill()
    killed = time.monotonic()
    await wait_until(lambda: sum(live(backends)) == 0, within=5)
    admitted = await open_until(survivor.ws_url, 2)
    took = time.monotonic() - killed
    try:
        assert len(admitted) == 2
        assert took <= DEPARTED_WITHIN  # against a 30 s lease
        never_over(backends, 1)
        assert live(backends) == [1, 1]
        assert redis_total(redis_server, "depart") == {b.pod_id: 1 for b in backends}
        assert survivor.admin("/snapshot")["state"]["departures_total"] == 1
    finally:
        await close_all(admitted)
        await close_all(held.open)


async def test_a_frozen_replica_is_not_taken_for_a_departed_one(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    # A frozen process (or one cut off by the network) keeps its connections open
    # on the server's side: its slots stay counted until its lease runs out.
    backends = start_backends(procs, 1, tripwire=2)
    frozen, other = await watched_pair(
        procs, redis_server, backends, "asleep", lease_ttl="6s", cap=2
    )
    old = await open_many(frozen.ws_url, 2)
    assert old.statuses == Counter({101: 2})

    frozen.process.signal(signal.SIGSTOP)
    try:
        refusals: Counter[int] = Counter()
        until = time.monotonic() + 3.0  # twelve departure checks, half the lease
        while time.monotonic() < until:
            outcome = await open_many(other.ws_url, 1)
            refusals.update(outcome.statuses)
            await close_all(outcome.open)
            await asyncio.sleep(0.1)
        assert set(refusals) == {503}, refusals
        assert live(backends) == [2]
        assert other.admin("/snapshot")["state"]["departures_total"] == 0
    finally:
        frozen.process.signal(signal.SIGCONT)
    for ws in old.open:  # its sessions went on through the freeze
        await ws.send("still here")
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["echo"] == "still here"
    never_over(backends, 2)
    await close_all(old.open)
