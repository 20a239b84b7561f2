"""Rebalancing long-lived connections onto new capacity, and max_connection_duration.

The scale-up of seed 004, end to end: ``wsgate load`` holds 30 sessions on one
backend; two backends join through discovery (a file, or DNS from a real DNS
server on loopback); the gateway closes sessions on the crowded backend with
1012, the clients reconnect, and least-connections placement fills the new
backends. Checked where it happens: the backends' own counts, and the close
frames the clients received (when, and on which session).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from gwtools import close_all, open_many, wait_until
from lifecycle import close_seen, start_discovering, write
from tinydns import TinyDns

from wsgate.testbed.processes import Process, ProcessGroup, RedisServer, free_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends

RATE = 5.0  # rebalance closes per second, all replicas together
BURST = 5  # ceil(RATE): what the shared budget lets through at once
MAX_SKEW = 1
SESSIONS = 30
SETTLE_WITHIN = 40.0  # seconds for 20 moves at 5/s, reconnect pauses included

REBALANCE = {
    "rebalance": {
        "enabled": True,
        "max_skew": MAX_SKEW,
        "rate": f"{RATE:g}/s",
        "interval": "500ms",
    },
    "health": {"interval": "100ms", "timeout": "500ms", "healthy_threshold": 2},
    "limits": {"max_connections_per_backend": 40},
}

_CLOSE_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO wsgate\.load: "
    r"Session (\d+) closed by the server \((\d+)\)"
)


def client_closes(load: Process) -> list[tuple[float, int, int]]:
    """(time, session number, close code) of every close the load's clients received."""
    closes = []
    for line in load.output().splitlines():
        match = _CLOSE_LINE.match(line)
        if match:
            when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            closes.append((when, int(match.group(2)), int(match.group(3))))
    return closes


def start_load(procs: ProcessGroup, urls: list[str], clients: int, per_client: int) -> Process:
    argv = wsgate_argv(
        "load", *urls,
        "--clients", str(clients), "--connections", str(per_client),
        "--message-interval", "off", "--reconnect-delay", "500ms",
        "--view", "none", "--log-level", "info", "--seed", "4",
    )  # fmt: skip
    return procs.start("load", argv)


def counts(backends: list[BackendProcess]) -> list[int]:
    return [b.stats()["active_connections"] for b in backends]


async def balanced(backends: list[BackendProcess], within: float) -> float:
    """Wait until every backend holds SESSIONS/len ± MAX_SKEW and the total is whole;
    return how long it took."""
    started = time.monotonic()
    share = SESSIONS // len(backends)

    def done() -> bool:
        now = counts(backends)
        return sum(now) == SESSIONS and all(abs(n - share) <= MAX_SKEW for n in now)

    await wait_until(done, within=within, interval=0.25)
    return time.monotonic() - started


def check_closes(closes: list[tuple[float, int, int]], moved_at_least: int) -> None:
    assert all(code == 1012 for _, _, code in closes), closes
    sessions = Counter(number for _, number, _ in closes)
    twice = [number for number, n in sessions.items() if n > 1]
    assert not twice, f"sessions closed more than once: {twice}"
    assert len(closes) >= moved_at_least
    # No stretch of closes went faster than the budget: k closes within t seconds
    # need k <= BURST + RATE * t (one more for the log's millisecond stamps).
    times = sorted(when for when, _, _ in closes)
    for i, j in itertools.combinations(range(len(times)), 2):
        allowed = BURST + RATE * (times[j] - times[i]) + 1
        assert j - i + 1 <= allowed, f"{j - i + 1} closes in {times[j] - times[i]:.3f}s"


async def scale_up(
    procs: ProcessGroup,
    gateways: list[GatewayProcess],
    backends: list[BackendProcess],
    add_backends: Callable[[], Awaitable[None]],
) -> list[tuple[float, int, int]]:
    """30 sessions on the first backend, then the others join; returns the clients' closes."""
    per_client = SESSIONS // len(gateways)
    load = start_load(procs, [g.ws_url for g in gateways], len(gateways), per_client)
    await wait_until(lambda: counts(backends)[0] == SESSIONS, within=15, interval=0.2)
    # Steady: nothing moves while there is nowhere to move to.
    await asyncio.sleep(1.0)
    assert client_closes(load) == []
    await add_backends()
    took = await balanced(backends, SETTLE_WITHIN)
    # Settled for good: a few more rounds of the rebalancer change nothing.
    before = len(client_closes(load))
    await asyncio.sleep(2.0)
    assert len(client_closes(load)) == before
    share = SESSIONS // len(backends)
    assert all(abs(n - share) <= MAX_SKEW for n in counts(backends))
    closes = client_closes(load)
    print(f"balanced in {took:.1f}s with {len(closes)} closes")
    load.stop()
    return closes


def backends_file(path: Path, backends: list[BackendProcess]) -> None:
    write(path, yaml.safe_dump([{"address": b.address, "id": b.pod_id} for b in backends]))


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
    output = gateway.process.output()
    assert output.count('"outcome":"closed_rebalance"') == len(closes)


@pytest.fixture
async def dns() -> AsyncIterator[TinyDns]:
    server = TinyDns()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.mark.slow
async def test_scale_up_with_dns_discovery(procs: ProcessGroup, dns: TinyDns) -> None:
    # A headless Service: one name, one port, one address per pod.
    port = free_port()
    backends = []
    for index, ip in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.4"]):
        pod = f"pod-{'abc'[index]}"
        argv = wsgate_argv("backend", "--host", ip, "--port", str(port), "--pod-id", pod)
        process = procs.start(pod, argv, port=(ip, port))
        backends.append(BackendProcess(pod, ip, port, process))
    name = "ws-backend-headless.default.svc.cluster.local"
    dns.records[name] = ["127.0.0.2"]
    discovery = {
        "dns": {"name": name, "port": port, "refresh": "200ms", "server": f"127.0.0.1:{dns.port}"}
    }
    gateway = start_discovering(procs, discovery, **REBALANCE)

    async def add() -> None:
        dns.records[name] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

    closes = await scale_up(procs, [gateway], backends, add)
    check_closes(closes, moved_at_least=19)
    ids = sorted(b["id"] for b in gateway.admin("/clusters")["backends"])
    assert ids == [f"127.0.0.{n}:{port}" for n in (2, 3, 4)]


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
    assert gateway.process.output().count('"outcome":"closed_max_duration"') == 6
