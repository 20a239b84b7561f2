"""The listening socket: where client connections begin.

A :class:`Listener` binds ``address`` itself, or takes a socket already bound
(tests, ``serve --workers``), and accepts in batches on the event loop: a
burst of connections costs one wake-up per batch, not one per connection.
When the process is out of descriptors (or memory) the socket stays readable
with nothing to accept, so accepting pauses briefly instead of spinning.
What becomes of each connection is its subclass's:

- :class:`PlainListener` (neither TLS nor PROXY protocol) accepts each batch
  with one call into C (:mod:`._accept`), which reads what each connection
  has sent. One whole WebSocket upgrade head is served straight from its
  descriptor (:mod:`.arrival`); anything else becomes a
  :class:`~.downstream.Downstream` on a transport, given the bytes read.
- :class:`~wsgate.gateway.edge_listener.EdgeListener` reads a PROXY header
  and makes the TLS handshake first.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from wsgate.config import parse_address
from wsgate.gateway._accept import accept_batch

__all__ = ["ACCEPT_BATCH", "ACCEPT_PAUSE", "BACKLOG", "Listener", "PlainListener"]

log = logging.getLogger("wsgate.listener")

BACKLOG = 4096
ACCEPT_BATCH = 128
# After EMFILE the listening socket stays readable: wait this long before accepting again.
ACCEPT_PAUSE = 0.1
# What a plain connection's first read takes: an upgrade head is a few hundred bytes;
# a longer one is read on by the downstream.
FIRST_READ = 8192
# Seconds the kernel holds a connection that has sent nothing before it may be accepted.
DEFER_ACCEPT = 1
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Listener(abc.ABC):
    """Accepts on ``address`` (or ``sock``, already bound), a batch at a time
    (:meth:`accept_some`)."""

    def __init__(
        self, address: str, *, sock: socket.socket | None = None, reuse_port: bool = False
    ):
        self.address = address
        self.sock = sock
        self.reuse_port = reuse_port  # several worker processes share the port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._setting_up: set[asyncio.Task[None]] = set()
        self._accepting = False

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if self.sock is None or self.sock.fileno() < 0:
            return []
        return [self.sock.getsockname()[:2]]

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sock is None:
            self.sock = self._bind()
        self._loop = loop
        self.sock.setblocking(False)
        # Accepted sockets inherit it: one call here, none per connection.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._accepting = True
        loop.add_reader(self.sock.fileno(), self._accept_ready)

    def _bind(self) -> socket.socket:
        host, port = parse_address(self.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Take no more connections; those still being set up are closed (the rest go on)."""
        if self._loop is not None and self._accepting and self.sock is not None:
            self._accepting = False
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
        for task in list(self._setting_up):
            task.cancel()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a connection's set-up, cancelled if the listener closes first."""
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._setting_up.add(task)
        task.add_done_callback(self._setting_up.discard)

    def _accept_ready(self) -> None:
        assert self._loop is not None and self.sock is not None
        try:
            self.accept_some(self.sock)
        except OSError as error:
            if error.errno in _OUT_OF_RESOURCES:
                log.warning("cannot accept: %s; pausing accepts briefly", error.strerror)
                self._loop.remove_reader(self.sock.fileno())
                self._loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
            # ECONNABORTED and the like concern one connection only

    def _resume_accepting(self) -> None:
        if self._accepting and self._loop is not None and self.sock is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    @abc.abstractmethod
    def accept_some(self, listening: socket.socket) -> None:
        """Accept and set up up to :data:`ACCEPT_BATCH` waiting connections.

        Raises:
            OSError: accepting the first one failed (out of descriptors, say).
        """


class PlainListener(Listener):
    """A listener of plain HTTP: each connection to ``take`` or to a transport.

    ``take(fd, peername, data)`` is offered the connection's descriptor with its
    first bytes and returns whether it serves it; a connection it does not take
    becomes a transport whose protocol is ``protocol_factory(data)``. The
    kernel is asked to queue a connection for accept only once its first bytes
    are in (``TCP_DEFER_ACCEPT``), so the first read finds the head rather than
    a wait; a client that sends nothing is queued after :data:`DEFER_ACCEPT`
    seconds anyway, and goes to a transport (whose head timer starts then).
    """

    def __init__(
        self,
        take: Callable[[int, Any, bytes], bool],
        protocol_factory: Callable[[bytes], asyncio.Protocol],
        address: str,
        *,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
    ):
        super().__init__(address, sock=sock, reuse_port=reuse_port)
        self.take = take
        self.protocol_factory = protocol_factory

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        await super().start(loop)
        assert self.sock is not None
        with contextlib.suppress(OSError, AttributeError):  # Linux's; elsewhere, a transport
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, DEFER_ACCEPT)

    def accept_some(self, listening: socket.socket) -> None:
        take = self.take
        for fd, peername, data in accept_batch(listening.fileno(), ACCEPT_BATCH, FIRST_READ):
            if not (data and take(fd, peername, data)):
                # Nothing yet, or not a whole upgrade: the transport reads on.
                conn = socket.socket(fileno=fd)
                conn.setblocking(False)
                self.spawn(self._serve_on_transport(conn, data))

    async def _serve_on_transport(self, conn: socket.socket, data: bytes) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: self.protocol_factory(data), conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as error:
            with contextlib.suppress(OSError):
                conn.close()
            log.warning("cannot serve a connection: %s", error)
