"""The listening socket: where client connections begin.

A :class:`Listener` accepts connections and gives each a new protocol from
``protocol_factory`` (a :class:`~wsgate.gateway.downstream.Downstream`). It
binds ``address`` itself, or takes a socket already bound (tests, ``serve
--workers``); with an ``ssl`` context the connections are TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as _ssl
from collections.abc import Callable

from wsgate.config import parse_address

__all__ = ["BACKLOG", "Listener"]

BACKLOG = 4096


class Listener:
    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        address: str,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        ssl: _ssl.SSLContext | None = None,
    ):
        self.protocol_factory = protocol_factory
        self.address = address
        self.sock = sock
        self.reuse_port = reuse_port  # several worker processes share the port
        self.ssl = ssl
        self._server: asyncio.Server | None = None

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is not None:
            self._server = await loop.create_server(
                self.protocol_factory, sock=self.sock, backlog=BACKLOG, ssl=self.ssl
            )
            return
        host, port = parse_address(self.address)
        self._server = await loop.create_server(
            self.protocol_factory,
            host,
            port,
            backlog=BACKLOG,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            ssl=self.ssl,
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def close(self) -> None:
        """Take no more connections (those accepted go on)."""
        if self._server is not None:
            self._server.close()
