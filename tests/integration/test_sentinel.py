"""Two ``wsgate serve`` replicas on a Sentinel-managed Redis follow a failover.

A real master, its replica (``--replicaof``) and three ``redis-sentinel``
processes; the master is SIGKILLed while clients keep connecting. Counted at the
far side: the backends' own peaks and tripwire refusals, and the counts in the
promoted Redis against the sessions the backends hold.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter

import pytest
from fleet import DEPARTED_WITHIN, DEPARTURE_CHECK, live, never_over, presence, redis_total, truth
from gwtools import Churn, close_all, open_many, open_until, wait_until
from redis import Redis

from wsgate.testbed.processes import ProcessGroup, RedisSentinel, RedisServer, wait_for_port
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SERVICE = "wsgate"
LEASE_TTL = 1.5
HEARTBEAT = LEASE_TTL / 3


def master_port(sentinel: RedisSentinel) -> int | None:
    client = Redis(host="127.0.0.1", port=sentinel.port, socket_timeout=1)
    try:
        address = client.sentinel_get_master_addr_by_name(SERVICE)
    finally:
        client.close()
    return int(address[1]) if address else None


def replication_up(replica: RedisServer) -> bool:
    client = Redis.from_url(replica.url, socket_timeout=1)
    try:
        return bool(client.info("replication")["master_link_status"] == "up")
    finally:
        client.close()


async def sentinel_watched(
    procs: ProcessGroup, master: RedisServer
) -> tuple[RedisServer, list[RedisSentinel]]:
    """A replica of ``master`` and three sentinels watching it, once it replicates."""
    if shutil.which("redis-sentinel") is None:
        pytest.skip("redis-sentinel is not installed; ./scripts/setup.sh installs it")
    replica = RedisServer(
        procs, "redis-replica", args=["--replicaof", "127.0.0.1", str(master.port)]
    ).start()
    sentinels = [RedisSentinel(procs, f"sentinel-{i}", master, SERVICE).start() for i in range(3)]
    await wait_until(lambda: replication_up(replica), within=15)
    return replica, sentinels


def gateways_on(
    procs: ProcessGroup,
    backends: list[BackendProcess],
    sentinels: list[RedisSentinel],
    *,
    cap: int,
    **state: str,
) -> list[GatewayProcess]:
    """Two gateways finding their master through ``sentinels``, listening."""
    found = {"sentinels": [s.address for s in sentinels], "service": SERVICE, "timeout": "250ms"}
    gateways = [
        start_gateway(
            procs,
            backends,
            name=f"gw-{i}",
            state=found | state,
            limits={"max_connections_per_backend": cap},
        )
        for i in range(2)
    ]
    for gateway in gateways:
        wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    return gateways


async def test_gateways_follow_a_sentinel_failover_with_caps_held(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    master = redis_server
    replica, sentinels = await sentinel_watched(procs, master)
    backends = start_backends(procs, 3, tripwire=2)
    gateways = gateways_on(
        procs, backends, sentinels, cap=2, namespace="ha", lease_ttl=f"{LEASE_TTL}s"
    )

    churn = Churn([g.ws_url for g in gateways], clients=12)
    traffic = asyncio.create_task(churn.run(within=60))
    try:
        await wait_until(lambda: churn.statuses[101] >= 20, within=15)
        assert master_port(sentinels[0]) == master.port
        master.kill()
        killed = time.monotonic()
        await wait_until(
            lambda: master_port(sentinels[0]) == replica.port, within=20, interval=0.05
        )
        promoted = time.monotonic()
        # Clients hold still: the promoted Redis must count exactly what the backends hold
        # within one heartbeat (it may have missed the master's last writes).
        churn.holding = True
        await wait_until(
            lambda: redis_total(replica, "ha") == truth(backends), within=HEARTBEAT + 1.0
        )
        exact = time.monotonic()
        assert exact - promoted <= HEARTBEAT + 0.5
        # Traffic again: admission through the new master goes on, caps held.
        churn.holding = False
        await wait_until(lambda: churn.admitted_at[-1] > exact, within=10)
        resumed = time.monotonic()
        await asyncio.sleep(1.0)
        churn.holding = True
        await asyncio.sleep(churn.hold + 0.2)
        await wait_until(
            lambda: redis_total(replica, "ha") == truth(backends), within=HEARTBEAT + 1.0
        )
        print(
            f"sentinel failover: promoted {promoted - killed:.2f}s after the kill; counts exact "
            f"{exact - promoted:.2f}s after the promotion; admitting {resumed - exact:.2f}s after "
            f"that; statuses {dict(churn.statuses)}"
        )
        never_over(backends, 2)
        assert sum(live(backends)) > 0
    finally:
        churn.stopped = True
        await traffic
    never_over(backends, 2)
    await wait_until(lambda: redis_total(replica, "ha") == {}, within=5)


async def test_after_a_failover_a_killed_replica_departs_from_the_new_master(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    # Names of the old master's clients are not judged on the new one; once each
    # replica names its connection there, a killed replica departs within checks,
    # against a lease of 30 s.
    master = redis_server
    replica, sentinels = await sentinel_watched(procs, master)
    backends = start_backends(procs, 2, tripwire=1)
    victim, survivor = gateways_on(
        procs, backends, sentinels, cap=1, namespace="gone", lease_ttl="30s",
        departure_check=f"{DEPARTURE_CHECK}s",
    )  # fmt: skip
    held = await open_many(victim.ws_url, 2)
    assert held.statuses == Counter({101: 2})

    master.kill()
    await wait_until(lambda: master_port(sentinels[0]) == replica.port, within=20, interval=0.05)
    new_run_id = str(Redis.from_url(replica.url).info("server")["run_id"])

    def named_on_the_new_master() -> bool:
        names = presence(replica, "gone").values()
        return len(names) == 2 and all(name.startswith(new_run_id + ":") for name in names)

    await wait_until(named_on_the_new_master, within=10)
    assert live(backends) == [1, 1]  # the failover reaped nobody
    assert survivor.admin("/snapshot")["state"]["departures_total"] == 0

    victim.process.kill()
    killed = time.monotonic()
    admitted = await open_until(survivor.ws_url, 2)
    took = time.monotonic() - killed
    try:
        assert len(admitted) == 2
        assert took <= DEPARTED_WITHIN  # against a 30 s lease
        never_over(backends, 1)
        assert redis_total(replica, "gone") == {b.pod_id: 1 for b in backends}
        assert survivor.admin("/snapshot")["state"]["departures_total"] == 1
    finally:
        await close_all(admitted)
        await close_all(held.open)
