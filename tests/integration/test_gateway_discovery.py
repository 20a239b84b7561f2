"""Backends that come and go: file discovery, and passive outlier ejection.

A backend that appears gets connections once its health checks pass; one that
disappears gets no new connections and its sessions receive 1001; a backend
that refuses connections or answers upgrades with 5xx is ejected for
``ejection`` and then comes back. Counted at the backends and at the clients.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from gwtools import access_log_written, close_all, open_many, open_one, pod_of, wait_until
from lifecycle import close_seen, logged, start_discovering, started, write

from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway


def listing(backends: list[BackendProcess]) -> str:
    return yaml.safe_dump([{"address": b.address, "id": b.pod_id} for b in backends])


def healthy_ids(gateway: GatewayProcess) -> set[str]:
    return {b["id"] for b in gateway.admin("/clusters")["backends"] if b["healthy"]}


@pytest.mark.slow
async def test_file_discovery_adds_when_healthy_and_drains_removed(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    a, b = start_backends(procs, 2)
    path = tmp_path / "backends.yaml"
    write(path, listing([a]))
    gateway = start_discovering(
        procs,
        {"file": {"path": str(path), "refresh": "100ms"}},
        health={"interval": "100ms", "timeout": "500ms", "healthy_threshold": 3},
        limits={"max_connections_per_backend": 4},
    )
    on_a = (await open_many(gateway.ws_url, 2)).open
    try:
        assert [a.stats()["active_connections"], b.stats()["active_connections"]] == [2, 0]

        write(path, listing([a, b]))
        await logged(gateway, "backend pod-b (127.0.0.1:")
        assert "waiting for its health checks" in gateway.process.output()
        await wait_until(lambda: healthy_ids(gateway) == {"pod-a", "pod-b"})
        # Least connections sends the next two to the newcomer.
        on_b = (await open_many(gateway.ws_url, 2)).open
        assert [await pod_of(ws) for ws in on_b] == ["pod-b", "pod-b"]

        closes = [asyncio.create_task(close_seen(ws)) for ws in on_a]
        write(path, listing([b]))
        results = await asyncio.gather(*closes)
        assert [(code, reason) for _, code, reason in results] == [(1001, "backend_removed")] * 2
        await wait_until(lambda: a.stats()["active_connections"] == 0)
        # pod-a is gone from the pool once drained; pod-b kept its id and its sessions.
        await wait_until(
            lambda: [x["id"] for x in gateway.admin("/clusters")["backends"]] == ["pod-b"]
        )
        assert b.stats()["active_connections"] == 2
        for ws in on_b:
            assert await pod_of(ws) == "pod-b"
        more = await open_many(gateway.ws_url, 3)
        assert more.statuses[101] == 2 and more.statuses[503] == 1
        assert [a.stats()["active_connections"], b.stats()["active_connections"]] == [0, 4]
        await close_all(more.open + on_b)
    finally:
        await close_all(on_a)
    await access_log_written()
    output = gateway.process.output()
    assert "backend pod-a (127.0.0.1:" in output and "removed: no new connections" in output
    assert output.count('"outcome":"closed_backend_removed"') == 2


def metric_lines(gateway: GatewayProcess, backend: str) -> list[str]:
    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if f'backend="{backend}"' in line]


async def attempt(url: str) -> int:
    """Open one session and close it; the status the client got."""
    outcomes = await open_many(url, 1)
    await close_all(outcomes.open)
    return next(iter(outcomes.statuses))


def ejection_config(**extra: Any) -> dict[str, Any]:
    return {
        "balance": "round_robin",
        "health": {
            "interval": "100ms",
            "timeout": "500ms",
            "passive": {"consecutive_failures": 2, "ejection": "2s"},
            **extra,
        },
        "limits": {"max_connections_per_backend": 10},
    }


@pytest.mark.slow
async def test_backend_answering_5xx_on_upgrade_is_ejected_then_returns(
    procs: ProcessGroup,
) -> None:
    good = start_backends(procs, 1)[0]
    # A tripwire of 1, taken by a client of its own: pod-x answers every upgrade with 503,
    # while its /health stays fine, so only passive ejection can see the problem.
    bad = start_backends(procs, 1, tripwire=1, prefix="bad")[0]
    gateway = started(start_gateway(procs, [good, bad], **ejection_config()))
    hog = await open_one(f"ws://{bad.address}/")
    try:
        statuses = [await attempt(gateway.ws_url) for _ in range(4)]
        assert statuses == [101, 503, 101, 503]
        await logged(gateway, "backend bad-a ejected for 2s after 2 consecutive failures")
        ejected_at = time.monotonic()
        assert bad.stats()["refused"] == 2
        # While ejected, everything goes to pod-a, and pod-x sees nobody.
        assert [await attempt(gateway.ws_url) for _ in range(4)] == [101] * 4
        assert bad.stats()["refused"] == 2 and bad.stats()["total_connections"] == 1
        metrics = metric_lines(gateway, "bad-a")
        assert 'wsgate_backend_ejected{backend="bad-a",route="default"} 1.0' in metrics
        assert 'wsgate_backend_ejections_total{backend="bad-a",route="default"} 1.0' in metrics
    finally:
        await hog.close()
    await wait_until(lambda: bad.stats()["active_connections"] == 0)
    await logged(gateway, "backend bad-a is back after its ejection", within=4)
    assert time.monotonic() - ejected_at >= 1.5
    statuses = [await attempt(gateway.ws_url) for _ in range(2)]
    assert statuses == [101, 101]
    assert bad.stats()["total_connections"] == 2  # the hog, then one through the gateway


@pytest.mark.slow
async def test_backend_refusing_connections_is_ejected_then_returns(procs: ProcessGroup) -> None:
    good = start_backends(procs, 1)[0]
    port = free_port()
    dead = BackendProcess("pod-late", "127.0.0.1", port, None)  # type: ignore[arg-type]
    # Active checks off: passive ejection alone must take the dead backend out.
    gateway = started(start_gateway(procs, [good, dead], **ejection_config(enabled=False)))
    # Every client gets in: a failed connect is retried on the other backend.
    assert [await attempt(gateway.ws_url) for _ in range(4)] == [101] * 4
    await logged(gateway, "backend pod-late ejected for 2s after 2 consecutive failures")
    ejected_at = time.monotonic()
    argv = wsgate_argv("backend", "--port", str(port), "--pod-id", "pod-late")
    late = BackendProcess(
        "pod-late", "127.0.0.1", port, procs.start("pod-late", argv, port=("127.0.0.1", port))
    )
    # Up now, but still ejected: nothing reaches it until the ejection ends.
    assert [await attempt(gateway.ws_url) for _ in range(2)] == [101, 101]
    if time.monotonic() - ejected_at < 1.8:
        assert late.stats()["total_connections"] == 0
    await logged(gateway, "backend pod-late is back after its ejection", within=4)
    # (On a slow machine the two attempts above may outlast the ejection and reach it.)
    reached = late.stats()["total_connections"]
    assert [await attempt(gateway.ws_url) for _ in range(2)] == [101, 101]
    assert late.stats()["total_connections"] == reached + 1  # in turn with the other
