"""Scripted backends: servers on loopback that answer as a test says, and remember.

A test that must judge the gateway by what a backend saw, for answers no real
backend gives on purpose (a refusal in pieces, a head that is no HTTP, a slow
switch), puts one of these behind a real ``wsgate serve``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import GatewayProcess, start_gateway

__all__ = [
    "SWITCHED",
    "UPGRADE",
    "Script",
    "ScriptedBackend",
    "active",
    "gateway_for",
    "says",
    "scripted",
]

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCHED = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class ScriptedBackend:
    """A backend that answers each connection as its script says, and remembers."""

    script: Script
    port: int = 0
    requests: list[bytes] = field(default_factory=list)  # each connection's request head
    closed: int = 0  # connections whose far side (the gateway) closed them
    server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.requests.append(await reader.readuntil(b"\r\n\r\n"))
            await self.script(reader, writer)
            while await reader.read(65536):
                pass
            self.closed += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed += 1
        finally:
            writer.close()

    @property
    def entry(self) -> dict[str, str]:
        return {"address": f"127.0.0.1:{self.port}", "id": f"scripted-{self.port}"}


def says(answer: bytes) -> Script:
    """A script that answers the request with ``answer``."""

    async def say(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()

    return say


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[ScriptedBackend]:
    backend = ScriptedBackend(script)
    backend.server = await asyncio.start_server(backend._serve, "127.0.0.1", 0)
    backend.port = backend.server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        backend.server.close()


def gateway_for(
    procs: ProcessGroup, *backends: dict[str, str], limits: dict[str, Any] | None = None
) -> GatewayProcess:
    """A gateway in front of ``backends``, one session each (or ``limits``), unchecked."""
    return start_gateway(
        procs,
        list(backends),
        limits=limits or {"max_connections_per_backend": 1},
        health={"enabled": False},
    )


def active(gateway: GatewayProcess) -> dict[str, int]:
    """Each backend's sessions, as the gateway counts them."""
    return {b["id"]: b["active"] for b in gateway.admin("/snapshot")["backends"]}
