"""Rebalancing long-lived connections onto new capacity, and max_connection_duration.

The scale-up of seed 004, end to end (see :mod:`scaleup`): ``wsgate load`` holds
30 sessions on one backend; two backends join through file discovery; the
gateway closes sessions on the crowded backend with 1012, the clients
reconnect, and least-connections placement fills the new backends. The same
with DNS discovery is in ``test_gateway_rebalance_dns.py``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from gwtools import access_log_written, close_all, open_many, wait_until
from lifecycle import close_seen, start_discovering
from scaleup import REBALANCE, backends_file, check_closes, counts, scale_up

from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import start_backends


@pytest.mark.slow
async def test_scale_up_with_file_discovery(procs: ProcessGroup, tmp_path: Path) -> None:
    backends = start_backends(procs, 3)
    path = tmp_path / "backends.yaml"
    backends_file(path, backends[:1])
    gateway = start_discovering(
        procs, {"file": {"path": str(path), "refresh": "100ms"}}, **REBALANCE
    )

    async def add() -> None:
        backends_file(path, backends)

    closes = await scale_up(procs, [gateway], backends, add)
    check_closes(closes, moved_at_least=19)
    await access_log_written()
    output = gateway.process.output()
    assert output.count('"outcome":"closed_rebalance"') == len(closes)


@pytest.mark.slow
async def test_scale_up_with_two_replicas_shares_one_close_budget(
    procs: ProcessGroup, redis_server: RedisServer, tmp_path: Path
) -> None:
    backends = start_backends(procs, 3)
    path = tmp_path / "backends.yaml"
    backends_file(path, backends[:1])
    discovery = {"file": {"path": str(path), "refresh": "100ms"}}
    state = {"store": redis_server.url, "namespace": "rebalance", "lease_ttl": "3s"}
    gateways = [
        start_discovering(procs, discovery, name=f"gateway-{n}", state=state, **REBALANCE)
        for n in (1, 2)
    ]

    async def add() -> None:
        backends_file(path, backends)

    closes = await scale_up(procs, gateways, backends, add)
    check_closes(closes, moved_at_least=19)
    # Both replicas took part, and between them closed no faster than the budget.
    await access_log_written()
    by_replica = [g.process.output().count('"outcome":"closed_rebalance"') for g in gateways]
    assert sum(by_replica) == len(closes) and all(by_replica), by_replica


@pytest.mark.slow
async def test_max_connection_duration_closes_each_session_once_with_jitter(
    procs: ProcessGroup,
) -> None:
    backends = start_backends(procs, 1)
    path = procs.log_dir / "one.yaml"
    backends_file(path, backends)
    gateway = start_discovering(
        procs,
        {"file": str(path)},
        max_connection_duration="2s",
        rebalance={"rate": "20/s", "interval": "100ms"},
        limits={"max_connections_per_backend": 10},
    )
    opened = time.monotonic()
    sessions = (await open_many(gateway.ws_url, 6)).open
    try:
        results = await asyncio.gather(*(close_seen(ws, within=10) for ws in sessions))
    finally:
        await close_all(sessions)
    ages = sorted(when - opened for when, _, _ in results)
    assert [(code, reason) for _, code, reason in results] == [(1012, "max_duration")] * 6
    # 2s with ±10% jitter, seen through a 100ms round.
    assert ages[0] >= 1.75 and ages[-1] <= 2.6, ages
    assert ages[-1] - ages[0] > 0.02  # not all at the same instant
    await wait_until(lambda: counts(backends) == [0])
    await access_log_written()
    assert gateway.process.output().count('"outcome":"closed_max_duration"') == 6
