"""Helpers for tests of several ``wsgate serve`` replicas on one Redis, counted at the backends."""

from __future__ import annotations

import asyncio
from typing import Any

from gwtools import Outcomes, open_many
from redis import Redis
from redis.cluster import RedisCluster

from wsgate.admission.redis import key_prefix
from wsgate.testbed.processes import ProcessGroup, RedisServer, wait_for_port
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_gateway

__all__ = [
    "CLIENT_IPS",
    "DEPARTED_WITHIN",
    "DEPARTURE_CHECK",
    "all_in_sync",
    "live",
    "never_over",
    "presence",
    "redis_total",
    "replicas",
    "spread_over",
    "truth",
]

CLIENT_IPS = [f"127.0.0.{i}" for i in range(2, 10)]


def replicas(
    procs: ProcessGroup,
    backends: list[BackendProcess],
    count: int,
    redis_server: RedisServer,
    namespace: str,
    **config: Any,
) -> list[GatewayProcess]:
    state = {
        "store": redis_server.url,
        "namespace": namespace,
        "lease_ttl": "1500ms",
        "timeout": "250ms",
    } | config.pop("state", {})
    started = [
        start_gateway(procs, backends, name=f"{namespace}-{i}", state=state, **config)
        for i in range(count)
    ]
    for gateway in started:
        wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    return started


def live(backends: list[BackendProcess]) -> list[int]:
    return [b.stats()["active_connections"] for b in backends]


def all_in_sync(gateways: list[GatewayProcess]) -> bool:
    """Every replica admits through Redis again (none degraded or settling)."""
    return all(g.admin("/clusters")["state"]["mode"] == "ok" for g in gateways)


def never_over(backends: list[BackendProcess], cap: int) -> None:
    """The tripwire never fired and no backend ever held more than ``cap``."""
    stats = [b.stats() for b in backends]
    assert max(s["peak_connections"] for s in stats) <= cap, stats
    assert sum(s["refused"] for s in stats) == 0, stats


def redis_total(server: RedisServer | RedisCluster, namespace: str) -> dict[str, int]:
    """The namespace's per-backend totals as Redis holds them (one server or a Cluster)."""
    client = server if isinstance(server, RedisCluster) else Redis.from_url(server.url)
    try:
        raw = client.hgetall(f"{key_prefix(namespace)}:total")
        return {k.decode(): int(v) for k, v in raw.items()}
    finally:
        if client is not server:
            client.close()


#: How often the replicas of the departure tests look for ended ones (seconds).
DEPARTURE_CHECK = 0.25
#: Within how long of a kill its slots are taken back: silent for two checks and
#: a quarter of a second, two checks to see it, and a second of slack.
DEPARTED_WITHIN = (2 * DEPARTURE_CHECK + 0.25) + 2 * DEPARTURE_CHECK + 1.0


def presence(server: RedisServer, namespace: str) -> dict[str, str]:
    """Which connection each replica has named for the others to watch it by."""
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        return dict(client.hgetall(f"{key_prefix(namespace)}:presence"))
    finally:
        client.close()


def truth(backends: list[BackendProcess]) -> dict[str, int]:
    return {b.pod_id: n for b, n in zip(backends, live(backends), strict=True) if n}


async def spread_over(gateways: list[GatewayProcess], count: int, **kw: Any) -> Outcomes:
    """``count`` connects at once, dealt round-robin over the gateways, from several IPs."""
    shares = [count // len(gateways) + (i < count % len(gateways)) for i in range(len(gateways))]
    results = await asyncio.gather(
        *(
            open_many(g.ws_url, n, local_ips=CLIENT_IPS, **kw)
            for g, n in zip(gateways, shares, strict=True)
        )
    )
    merged = results[0]
    for other in results[1:]:
        merged.open += other.open
        merged.statuses += other.statuses
        merged.retry_after += other.retry_after
        merged.bodies += other.bodies
    return merged
