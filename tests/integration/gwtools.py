"""Client-side helpers for gateway tests: connect, count outcomes, read rejections."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from wsgate.gateway.access_log import FLUSH_INTERVAL
from wsgate.testbed.topology import BackendProcess, GatewayProcess

__all__ = [
    "Churn",
    "Outcomes",
    "access_log_written",
    "assert_capacity_free",
    "close_all",
    "open_many",
    "open_until",
    "pod_of",
    "raw_request",
]


@dataclass
class Outcomes:
    open: list[ClientConnection] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: list[int] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)


async def open_one(url: str, local_ip: str | None = None, **kwargs: Any) -> ClientConnection:
    if local_ip is not None:
        kwargs["local_addr"] = (local_ip, 0)
    return await connect(url, open_timeout=10, max_size=None, ping_interval=None, **kwargs)


async def open_many(
    url: str, count: int, *, local_ips: list[str] | None = None, **kwargs: Any
) -> Outcomes:
    """Open ``count`` WebSocket connections at once; sort out who got in."""

    async def attempt(index: int) -> ClientConnection | InvalidStatus:
        ip = local_ips[index % len(local_ips)] if local_ips else None
        try:
            return await open_one(url, ip, **kwargs)
        except InvalidStatus as rejected:
            return rejected

    outcomes = Outcomes()
    for result in await asyncio.gather(*(attempt(i) for i in range(count))):
        if isinstance(result, InvalidStatus):
            response = result.response
            outcomes.statuses[response.status_code] += 1
            if "Retry-After" in response.headers:
                outcomes.retry_after.append(int(response.headers["Retry-After"]))
            outcomes.bodies.append(json.loads(response.body or b"{}"))
        else:
            outcomes.statuses[101] += 1
            outcomes.open.append(result)
    return outcomes


async def open_until(
    url: str, count: int, *, tries: int = 100, pause: float = 0.05
) -> list[ClientConnection]:
    """Connect again and again until ``count`` sessions are open (refusals are
    retried ``pause`` apart), or ``tries`` run out: what got through."""
    opened: list[ClientConnection] = []
    for _ in range(tries):
        opened += (await open_many(url, count - len(opened))).open
        if len(opened) >= count:
            break
        await asyncio.sleep(pause)
    return opened


async def close_all(connections: list[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)


async def pod_of(ws: ClientConnection) -> str:
    """Ask the backend behind a connection who it is."""
    await ws.send("who")
    answer = json.loads(await ws.recv())
    return str(answer["pod"])


async def access_log_written() -> None:
    """Let the gateway write its buffered access-log lines (it does within FLUSH_INTERVAL)."""
    await asyncio.sleep(FLUSH_INTERVAL * 3)


async def wait_until(predicate: Any, within: float = 5.0, interval: float = 0.05) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


async def assert_capacity_free(
    gateway: GatewayProcess, backends: list[BackendProcess], cap: int
) -> None:
    """No slot leaked: the whole capacity can be taken again, and not one more.

    Observed at the far side: the backends must each hold exactly ``cap``.
    """
    total = cap * len(backends)
    await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in backends))
    outcomes = await open_many(gateway.ws_url, total + 1)
    try:
        assert outcomes.statuses[101] == total, outcomes.statuses
        assert outcomes.statuses[503] == 1, outcomes.statuses
        assert [b.stats()["active_connections"] for b in backends] == [cap] * len(backends)
    finally:
        await close_all(outcomes.open)
    await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in backends))


async def raw_request(
    host: str, port: int, data: bytes, *, read_timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes; return the first response's status, headers and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(read_timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        return status, headers, body
    finally:
        writer.close()


@dataclass
class Churn:
    """Clients that keep connecting, holding a moment and leaving, over several gateways.

    Bounded in time and in attempts; ``holding`` pauses the leaving so the set of
    live sessions stands still (to compare counts), ``stop`` ends it.
    """

    urls: list[str]
    clients: int = 12
    hold: float = 0.2
    statuses: Counter[int] = field(default_factory=Counter)
    admitted_at: list[float] = field(default_factory=list)  # monotonic time of each 101
    holding: bool = False
    stopped: bool = False
    _held: list[ClientConnection] = field(default_factory=list)

    async def run(self, within: float, attempts: int = 20_000) -> None:
        deadline = time.monotonic() + within
        budget = [attempts]

        async def client(index: int) -> None:
            url = self.urls[index % len(self.urls)]
            ip = f"127.0.0.{2 + index % 8}"
            while not self.stopped and time.monotonic() < deadline and budget[0] > 0:
                if self.holding:
                    await asyncio.sleep(0.05)
                    continue
                budget[0] -= 1
                try:
                    ws = await open_one(url, ip)
                except InvalidStatus as rejected:
                    self.statuses[rejected.response.status_code] += 1
                    await asyncio.sleep(0.05)
                    continue
                except OSError:
                    self.statuses[0] += 1
                    await asyncio.sleep(0.05)
                    continue
                self.statuses[101] += 1
                self.admitted_at.append(time.monotonic())
                self._held.append(ws)
                await asyncio.sleep(self.hold)
                # Polled, not an Event: the deadline bounds this wait too.
                while self.holding and not self.stopped and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                self._held.remove(ws)
                await ws.close()

        try:
            await asyncio.gather(*(client(i) for i in range(self.clients)))
        finally:
            await close_all(self._held)
