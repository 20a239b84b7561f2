"""A fast raw echo backend: the one every benchmarked path fronts.

It answers the WebSocket opening handshake itself (it computes
``Sec-WebSocket-Accept``) and from then on writes back every byte it reads,
unchanged. Frames from a client are masked, so the frames it sends back are
masked too; that is not what a conforming server sends, but the driver counts
bytes rather than decoding frames, and a byte-echo keeps the backend far
cheaper than any proxy in front of it. Plain requests (``GET /health`` from a
gateway's health checks) get ``200 ok`` on a keep-alive connection.

Run it as ``python -m bench.echo --listen 127.0.0.1:PORT [--processes N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import cast

from bench.wire import HEAD_END, parse_request_head
from wsgate.config import parse_address
from wsgate.runtime import raise_open_files_limit
from wsgate.wire import upgrade_response

__all__ = ["EchoProtocol", "main", "serve"]

_MAX_HEAD = 16 * 1024
_HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class EchoProtocol(asyncio.Protocol):
    """Handshake, then echo; reading pauses while the peer does not keep up."""

    __slots__ = ("head", "transport", "upgraded")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self.upgraded:
            transport.write(data)
            return
        self.head += data
        while not self.upgraded:
            end = self.head.find(HEAD_END)
            if end < 0:
                if len(self.head) > _MAX_HEAD:
                    transport.write(_BAD_REQUEST)
                    transport.close()
                return
            head = bytes(self.head[:end])
            del self.head[: end + len(HEAD_END)]
            self._answer(transport, head)
        if self.head:
            transport.write(bytes(self.head))
            self.head.clear()

    def _answer(self, transport: asyncio.Transport, head: bytes) -> None:
        _, headers = parse_request_head(head)
        key = headers.get(b"sec-websocket-key")
        if headers.get(b"upgrade", b"").lower() == b"websocket" and key:
            transport.write(upgrade_response(key.decode("latin-1")))
            self.upgraded = True
        else:
            transport.write(_HEALTH_OK)

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False


async def serve(host: str, port: int, *, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(
        EchoProtocol, host, port, backlog=4096, reuse_port=reuse_port, reuse_address=True
    )
    async with server:
        await stop.wait()


def _serve_in_this_process(host: str, port: int, reuse_port: bool) -> None:
    import uvloop

    uvloop.run(serve(host, port, reuse_port=reuse_port))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9001", help="HOST:PORT to listen on")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)"
    )
    args = parser.parse_args(argv)
    try:
        host, port = parse_address(args.listen)
    except ValueError as error:
        parser.exit(2, f"python -m bench.echo: error: {error}\n")
    if args.processes < 1:
        parser.exit(2, "python -m bench.echo: error: --processes must be at least 1\n")
    raise_open_files_limit()
    reuse_port = args.processes > 1 and hasattr(socket, "SO_REUSEPORT")
    children: list[int] = []
    for _ in range(args.processes - 1):
        pid = os.fork()
        if pid == 0:
            _serve_in_this_process(host, port, reuse_port)
            os._exit(0)
        children.append(pid)
    print(f"echo: listening on {host}:{port} ({args.processes} process(es))", flush=True)
    try:
        _serve_in_this_process(host, port, reuse_port)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ChildProcessError, ProcessLookupError):
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
