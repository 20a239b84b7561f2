"""The floor of an asyncio proxy: the least a Python set-up path on uvloop pays.

It does what any WebSocket proxy must and nothing more: accept, read the head
up to its blank line, connect to the one backend, write the head on, read the
answer's head, write it back, then move bytes both ways in Python. No
validation, no admission, no slot, no timers, no metrics, no log: a gateway
cannot be cheaper per upgrade than this while it keeps a transport and a
protocol object per socket. The bench runs it as the ``asyncio-floor`` path,
beside wsgate and HAProxy, so the set-up figure shows how much of wsgate's
cost is its own work and how much is the event loop's.

Not a proxy to run: it trusts every byte it is sent.

    python -m bench.floor --listen 127.0.0.1:PORT --backend 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import cast

import uvloop

from bench.wire import HEAD_END
from wsgate.config import parse_address
from wsgate.runtime import raise_open_files_limit

__all__ = ["main"]


class _Backend(asyncio.Protocol):
    """The backend side: its answer's head, then its bytes, go to the client."""

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        client = self.client.transport
        if client is not None:
            client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    """The client side: its head opens the backend connection, then its bytes go there."""

    def __init__(self, backend: tuple[str, int]) -> None:
        self.backend_address = backend
        self.transport: asyncio.Transport | None = None
        self.backend: _Backend | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        backend = self.backend
        if backend is not None:
            if backend.transport is not None:
                backend.transport.write(data)
            else:
                self.head += data  # still connecting: goes out with the head
            return
        self.head += data
        if HEAD_END in self.head:
            self.backend = _Backend(self)
            asyncio.get_running_loop().create_task(self._connect(self.backend))

    async def _connect(self, backend: _Backend) -> None:
        host, port = self.backend_address
        try:
            await asyncio.get_running_loop().create_connection(lambda: backend, host, port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        assert backend.transport is not None
        backend.transport.write(self.head)
        self.head = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.close()


async def serve(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(backend), *listen, backlog=4096)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--backend", required=True, help="HOST:PORT of the one backend")
    args = parser.parse_args(argv)
    try:
        listen, backend = parse_address(args.listen), parse_address(args.backend)
    except ValueError as error:
        parser.exit(2, f"python -m bench.floor: {error}\n")
    raise_open_files_limit()
    uvloop.run(serve(listen, backend))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
