"""What the fault scenarios share: traffic that keeps trying, and the checks after a fault.

:class:`Traffic` is a bounded number of clients, each opening a session, sending
one message, reading the backend's answer, holding the session a moment and
closing it, again and again until told to stop. It records when sessions were
opened and answered, so a scenario can tell when service came back after a
fault. :func:`all_free` is how every scenario ends: the backends' own counts at
zero and every slot free, as the gateways and Redis report them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from fleet import CLIENT_IPS, live, redis_total
from gwtools import open_one, wait_until
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from wsgate.testbed.processes import Process, RedisServer
from wsgate.testbed.topology import BackendProcess, GatewayProcess

__all__ = [
    "Traffic",
    "all_free",
    "open_files",
    "rss_kib",
    "served_by_backends",
]


def open_files(process: Process) -> int:
    """How many descriptors the process holds, as the kernel counts them."""
    return len(os.listdir(f"/proc/{process.pid}/fd"))


def rss_kib(process: Process) -> int:
    """The process's resident set, in KiB."""
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {process.name}")


@dataclass
class Traffic:
    """Clients opening, using and closing sessions in a loop, bounded in count and time."""

    urls: list[str]
    clients: int
    hold: float = 0.1
    within: float = 60.0  # no run lasts longer, whatever the test does
    opened: list[float] = field(default_factory=list)  # when a 101 arrived
    answered: list[float] = field(default_factory=list)  # when the backend's echo arrived
    refused: Counter[str] = field(default_factory=Counter)  # error names of 4xx/5xx answers
    failed: Counter[str] = field(default_factory=Counter)  # connections that broke
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def opened_between(self, start: float, end: float) -> int:
        return sum(start <= t < end for t in self.opened)

    def first_opened_after(self, moment: float) -> float | None:
        later = [t for t in self.opened if t >= moment]
        return min(later) - moment if later else None

    async def _client(self, index: int) -> None:
        deadline = time.monotonic() + self.within
        turn = index
        while not self._stop.is_set() and time.monotonic() < deadline:
            url = self.urls[turn % len(self.urls)]
            turn += 1
            try:
                ws = await open_one(url, CLIENT_IPS[index % len(CLIENT_IPS)])
            except InvalidStatus as rejected:
                body = json.loads(rejected.response.body or b"{}")
                self.refused[str(body.get("error", rejected.response.status_code))] += 1
                await asyncio.sleep(0.05)
                continue
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake) as error:
                # A gateway that dies mid-handshake leaves an unfinished answer.
                self.failed[type(error).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            self.opened.append(time.monotonic())
            try:
                await ws.send(f"client {index}")
                async with asyncio.timeout(10):
                    answer = json.loads(await ws.recv())
                assert answer["echo"] == f"client {index}", answer
                self.answered.append(time.monotonic())
                await asyncio.sleep(self.hold)
            except (OSError, TimeoutError, ConnectionClosed) as error:
                self.failed[type(error).__name__] += 1
            finally:
                await ws.close()


def served_by_backends(backends: list[BackendProcess]) -> tuple[int, int]:
    """(sessions, messages) the backends say they served since they started."""
    stats = [b.stats() for b in backends]
    return sum(s["total_connections"] for s in stats), sum(s["messages"] for s in stats)


async def all_free(
    gateways: list[GatewayProcess],
    backends: list[BackendProcess],
    redis: tuple[RedisServer, str] | None = None,
    within: float = 10.0,
) -> float:
    """Wait until no backend counts a session and no slot is held anywhere; return how long.

    The backends' own counts come first; then every gateway's ``/clusters`` (its
    view of the shared counts and of its own) and, with Redis, the shared totals.
    """
    started = time.monotonic()

    def free() -> bool:
        if any(live(backends)):
            return False
        for gateway in gateways:
            for backend in gateway.admin("/clusters")["backends"]:
                if backend["active"] or backend["active_here"]:
                    return False
        return redis is None or redis_total(*redis) == {}

    await wait_until(free, within=within, interval=0.1)
    return time.monotonic() - started
