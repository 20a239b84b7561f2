"""Two replicas on one Redis: each one's admin API tells the same global story."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from wsgate.testbed.processes import ProcessGroup, RedisServer, wait_for_port
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway

pytestmark = [pytest.mark.redis, pytest.mark.slow]


async def open_session(gateway: GatewayProcess) -> ClientConnection:
    return await connect(gateway.ws_url, open_timeout=5, ping_interval=None)


def agreement(
    replicas: list[GatewayProcess], backends: list[BackendProcess]
) -> tuple[bool, list[Any]]:
    """Whether both /clusters agree with each other and with the backends' own counts."""
    views = [g.admin("/clusters") for g in replicas]
    truth = {b.pod_id: b.stats()["active_connections"] for b in backends}
    rows = [{row["id"]: row for row in view["backends"]} for view in views]
    agreed = all(
        all(r[pod]["active"] == truth[pod] for r in rows)
        and sum(r[pod]["active_here"] for r in rows) == truth[pod]
        for pod in truth
    )
    return agreed, [truth, *views]


async def wait_for_agreement(
    replicas: list[GatewayProcess], backends: list[BackendProcess], within: float = 6.0
) -> list[Any]:
    deadline = time.monotonic() + within
    while True:
        agreed, seen = await asyncio.to_thread(agreement, replicas, backends)
        if agreed:
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas did not agree within {within}s: {seen}")
        await asyncio.sleep(0.2)


async def test_two_replicas_report_one_global_count_and_their_own_shares(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2)
    state = {"store": redis_server.url, "namespace": "admin-two", "lease_ttl": "3s"}
    replicas = [
        start_gateway(
            procs, backends, name=name, state=state, limits={"max_connections_per_backend": 2}
        )
        for name in ("replica-1", "replica-2")
    ]
    for gateway in replicas:
        wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)

    sessions = [await open_session(replicas[0]) for _ in range(2)]
    sessions.append(await open_session(replicas[1]))
    try:
        truth, first, second = await wait_for_agreement(replicas, backends)
        assert sum(truth.values()) == 3
        assert first["replica"] != second["replica"]
        assert [r["active"] for r in first["backends"]] == [r["active"] for r in second["backends"]]
        assert sum(r["active_here"] for r in first["backends"]) == 2
        assert sum(r["active_here"] for r in second["backends"]) == 1
        assert first["state"] == second["state"] == {"store": "redis", "mode": "ok"}
        snapshot = replicas[1].admin("/snapshot")
        assert snapshot["state"]["live_replicas"] == 2

        # A close through one replica shows up in the other's global count.
        await sessions.pop(0).close()
        truth, first, second = await wait_for_agreement(replicas, backends)
        assert sum(truth.values()) == 2
    finally:
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
