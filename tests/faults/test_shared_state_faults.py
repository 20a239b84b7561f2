"""Faults of the shared state while clients keep coming: Redis frozen, Redis lost, a replica lost.

Traffic runs through the fault: clients open sessions, exchange a message and
close, in a loop. The backends' own high-water marks show that none ever held
more than its cap; after the traffic stops, every slot is free again in Redis
and in every gateway, and the backends counted exactly the sessions the
clients saw open. Recovery times are printed (``pytest -m faults -s``).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import pytest
from faultkit import Traffic, all_free, served_by_backends
from fleet import all_in_sync, live, never_over, redis_total, replicas, spread_over, truth
from gwtools import close_all, wait_until
from redis import Redis

from wsgate.admission.redis import key_prefix
from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends

pytestmark = [pytest.mark.faults, pytest.mark.redis, pytest.mark.slow]


def capped_fleet(
    procs: ProcessGroup,
    redis_server: RedisServer,
    namespace: str,
    *,
    pods: int,
    gateways: int,
    cap: int,
    **config: Any,
) -> tuple[list[BackendProcess], list[GatewayProcess]]:
    """Backends whose tripwire is the cap, and replicas on one Redis that hold them to it."""
    backends = start_backends(procs, pods, tripwire=cap)
    limits = {"max_connections_per_backend": cap}
    return backends, replicas(
        procs, backends, gateways, redis_server, namespace, limits=limits, **config
    )


async def test_redis_frozen_during_traffic(procs: ProcessGroup, redis_server: RedisServer) -> None:
    cap = 3
    backends, gateways = capped_fleet(
        procs, redis_server, "freeze", pods=2, gateways=2, cap=cap,
        state={"timeout": "100ms", "lease_ttl": "5s"},
    )  # fmt: skip
    traffic = Traffic([g.ws_url for g in gateways], clients=8).start()
    await asyncio.sleep(1.5)
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        await asyncio.sleep(2.0)
    finally:
        redis_server.process.signal(signal.SIGCONT)
    thawed = time.monotonic()
    await asyncio.sleep(2.0)
    await traffic.stop()
    recovery = traffic.first_opened_after(thawed)
    assert recovery is not None, "nothing admitted after the thaw"
    freed = await all_free(gateways, backends, (redis_server, "freeze"))
    sessions, messages = served_by_backends(backends)
    print(
        f"\nredis frozen 2.0s: {traffic.opened_between(0, frozen)} sessions before, "
        f"{traffic.opened_between(frozen + 0.3, thawed)} while frozen, first after thaw in "
        f"{recovery:.2f}s; refused {dict(traffic.refused)}; all free {freed:.2f}s after the traffic"
    )
    never_over(backends, cap)
    # Fail closed: a frozen Redis admits nothing (after the admissions already under way).
    assert traffic.opened_between(frozen + 0.3, thawed) == 0
    assert traffic.refused["state_unavailable"] > 0
    assert recovery < 2.0
    assert (sessions, messages) == (len(traffic.opened), len(traffic.answered))
    assert not traffic.failed, traffic.failed


async def test_redis_killed_and_restarted_empty_during_traffic(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    cap, lease_ttl = 2, 1.5  # the lease is fleet.replicas' default
    backends, gateways = capped_fleet(procs, redis_server, "restart", pods=3, gateways=2, cap=cap)
    held = await spread_over(gateways, 2)  # sessions that live through the loss of Redis
    assert held.statuses == Counter({101: 2})
    traffic = Traffic([g.ws_url for g in gateways], clients=6).start()
    await asyncio.sleep(1.0)
    assert redis_server.process is not None
    redis_server.process.signal(signal.SIGKILL)
    killed = time.monotonic()
    await asyncio.sleep(0.5)
    restarting = time.monotonic()  # the replicas may be back before restart() returns
    redis_server.restart()  # same port, no data
    restarted = time.monotonic()
    client = Redis.from_url(redis_server.url)
    try:  # both replicas registered again (their truths are in Redis)
        replicas_key = f"{key_prefix('restart')}:replicas"
        await wait_until(lambda: client.zcard(replicas_key) == 2, within=3, interval=0.02)
    finally:
        client.close()
    reregistered = time.monotonic() - restarted
    # Redis lost its data: no replica admits through it until a lease (1.5 s) after one saw
    # the loss, when every replica has registered its truth again; then traffic flows.
    await wait_until(lambda: all_in_sync(gateways), within=lease_ttl + 2, interval=0.02)
    await asyncio.sleep(1.0)
    await traffic.stop()
    recovery = traffic.first_opened_after(restarted)
    assert recovery is not None, "nothing admitted after the restart"
    # The replicas re-registered what they hold: Redis counts the two held sessions again.
    await wait_until(lambda: redis_total(redis_server, "restart") == truth(backends), within=3)
    again = await spread_over(gateways, 3 * cap)  # exactly the slots not held
    try:
        assert again.statuses == Counter({101: 3 * cap - 2, 503: 2}), again.statuses
        assert live(backends) == [cap] * 3
    finally:
        await close_all(again.open + held.open)
    freed = await all_free(gateways, backends, (redis_server, "restart"))
    sessions, messages = served_by_backends(backends)
    print(
        f"\nredis killed, restarted empty 0.5s later: first session after restart in "
        f"{recovery:.2f}s; both replicas registered again {reregistered:.2f}s after it; "
        f"{traffic.opened_between(killed + 0.3, restarted)} admitted while down; "
        f"refused {dict(traffic.refused)}; all free {freed:.2f}s after the last close"
    )
    # What the backends saw: none ever held more than its cap, through the loss and after.
    never_over(backends, cap)
    # Fail closed while Redis was down and while its totals could still be incomplete.
    assert traffic.opened_between(killed + 0.3, restarting + lease_ttl) == 0
    assert recovery < lease_ttl + 2.0
    assert sessions == len(traffic.opened) + len(held.open) + len(again.open)
    assert messages == len(traffic.answered)
    assert not traffic.failed, traffic.failed


async def test_a_replica_killed_during_a_connect_storm(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    cap = 4
    backends, gateways = capped_fleet(procs, redis_server, "storm", pods=3, gateways=3, cap=cap)
    victim = gateways[0]
    victim_id = victim.admin("/clusters")["replica"]
    prefix = key_prefix("storm")
    client = Redis.from_url(redis_server.url, decode_responses=True)
    # Many more clients than slots, on all three replicas; each client moves on to the
    # next replica after every try, so the victim's clients carry on at the others.
    traffic = Traffic([g.ws_url for g in gateways], clients=30, hold=0.2).start()
    try:
        await asyncio.sleep(1.5)
        victim.process.kill()
        killed = time.monotonic()
        await wait_until(lambda: client.zscore(f"{prefix}:replicas", victim_id) is None, within=5)
        reaped = time.monotonic() - killed
        assert not client.exists(f"{prefix}:held:{victim_id}")
        await asyncio.sleep(1.5)
    finally:
        await traffic.stop()
        client.close()
    survivors = gateways[1:]
    freed = await all_free(survivors, backends, (redis_server, "storm"))
    sessions, messages = served_by_backends(backends)
    print(
        f"\nreplica SIGKILLed in a storm of 30 clients over 3 replicas: lease reaped "
        f"{reaped:.2f}s after the kill (lease_ttl 1.5s); {len(traffic.opened)} sessions, "
        f"refused {dict(traffic.refused)}, broken {dict(traffic.failed)}; all free {freed:.2f}s"
    )
    never_over(backends, cap)
    assert reaped < 1.5 + 0.5 + 1.0  # lease, one renewal period, and slack
    assert traffic.opened_between(killed + reaped, killed + reaped + 1.5) > 0
    # Only the victim's sessions under way at the kill may have reached a backend
    # without their client seeing the 101.
    assert 0 <= sessions - len(traffic.opened) <= traffic.clients
    assert messages <= len(traffic.opened)
