"""The scale-up scenario shared by the rebalancing tests: load, backends joining, checks.

``wsgate load`` holds 30 sessions on one backend; more backends join; the
gateway closes sessions on the crowded backend and the clients reconnect. The
checks read the backends' own counts and the close frames the load's clients
logged (when, on which session, which code).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import yaml
from gwtools import wait_until
from lifecycle import write

from wsgate.testbed.processes import Process, ProcessGroup, wsgate_argv
from wsgate.testbed.topology import BackendProcess, GatewayProcess

__all__ = [
    "REBALANCE",
    "SESSIONS",
    "backends_file",
    "check_closes",
    "client_closes",
    "counts",
    "scale_up",
]

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
    """Wait until every backend holds SESSIONS/len ± MAX_SKEW, the total is whole, and the
    spread is within MAX_SKEW (where the rebalancer stops: 11/10/9 is within 10 ± 1 but
    still one move away); return how long it took."""
    started = time.monotonic()
    share = SESSIONS // len(backends)

    def done() -> bool:
        now = counts(backends)
        return (
            sum(now) == SESSIONS
            and all(abs(n - share) <= MAX_SKEW for n in now)
            and max(now) - min(now) <= MAX_SKEW
        )

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
