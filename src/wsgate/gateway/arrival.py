"""A client connection served straight from its socket, before it is a transport.

The plain listener accepts each connection itself and reads what has already
arrived (:mod:`.listener`). When that is one whole WebSocket upgrade head (the
common case: a client sends its head as soon as it connects), the connection
is an :class:`Arrival`. Its exchange runs at once, and on a ``101`` from a
backend the relay dialed, its descriptor goes to the relay as it is: it never
becomes a socket object or an event-loop transport and is never duplicated;
after its head, nothing of it is read or written on the event loop. Anything
else (nothing yet, part of a head, a request that is no upgrade, a head to
refuse) is a :class:`~.downstream.Downstream` on a transport, given the bytes
already read.

An arrival that must answer the client itself (a rejection, a refused
upgrade, a 502), or whose backend is not dialed, takes a transport then: what
it writes meanwhile waits for it, in order, and holds back the backend's side
as a full write buffer would. While its exchange waits (a queued admission, a
dial) longer than :data:`WATCH_AFTER`, the socket is watched for the client
leaving, which cancels the exchange as a closed transport would: the slot, or
the backend's connection, is let go at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from wsgate.gateway.deadlines import Deadlines
from wsgate.gateway.exchange import Client, Exchange, Request
from wsgate.gateway.flow import HIGH_WATER
from wsgate.gateway.http1 import upgrade_request
from wsgate.gateway.plane import Plane

__all__ = ["WATCH_AFTER", "Arrival", "arrive", "whole_upgrade"]

log = logging.getLogger("wsgate.arrival")

# An exchange still waiting this long (seconds) starts watching for its client
# leaving: the delay of the ``watches`` given to :func:`arrive`.
WATCH_AFTER = 0.05


def arrive(
    plane: Plane,
    connections: set[Client],
    watches: Deadlines,
    fd: int,
    peername: object,
    data: bytes,
) -> bool:
    """Serve the connection ``fd`` as an :class:`Arrival` if ``data`` is one whole upgrade head.

    ``watches`` holds when each arrival starts watching for its client leaving
    (its delay: :data:`WATCH_AFTER`). Returns False, having done nothing, for
    anything else: the caller then serves the connection on a transport.
    """
    request = whole_upgrade(data, plane.config.max_head_size)
    if request is None:
        return False
    peer = peername if isinstance(peername, tuple) else None
    client_ip = plane.client_address.of_peer(peer)
    Arrival(plane, connections, watches, fd, client_ip, request).start()
    return True


def whole_upgrade(data: bytes, max_head_size: int) -> Request | None:
    """The request in ``data`` if it is a whole WebSocket upgrade head to forward."""
    found = upgrade_request(data, max_head_size)
    if found is None:
        return None  # the downstream reads on, or answers it
    head, rest = found
    request = Request(head)
    request.rest = rest
    return request


class Arrival(Client):
    """An upgrade request whose connection is still a bare descriptor (see the module)."""

    def __init__(
        self,
        plane: Plane,
        connections: set[Client],
        watches: Deadlines,
        fd: int,
        client_ip: str,
        request: Request,
    ):
        super().__init__()
        self.plane = plane
        self.connections = connections  # the gateway's: what a drain or a stop closes
        self.watches = watches
        self.fd = fd  # ours until it is closed, or the relay or a transport has it
        self.sock: socket.socket | None = None  # made only when needed (a peek, a transport)
        self.client_ip = client_ip
        self.request = request
        self.upgraded = False
        self.watching = False  # the socket is in the loop's set, for the client leaving
        self.becoming: asyncio.Task[None] | None = None  # the transport being made
        self.unsent: list[bytes] = []  # written before the transport came
        self.close_when_sent = False
        self.holding_peer = False  # the backend's side is paused for what waits here

    def start(self) -> None:
        plane = self.plane
        plane.stats.accepted_total += 1
        self.connections.add(self)
        # Most exchanges are over sooner: watching costs a registration and its
        # removal, so it begins only for one that waits (queued, a slow backend).
        self.watches.set(self, self._watch)
        self.task = plane.loop.create_task(self._serve())

    async def _serve(self) -> None:
        plane, head = self.plane, self.request.head
        client_ip = plane.client_address.of_request(self.client_ip, head)
        exchange = Exchange(plane, plane.route_for(head), self, self.request, client_ip)
        try:
            await exchange.run()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("exchange failed")
        finally:
            self.task = None
            self._unwatch()
        if not self.upgraded:
            self.close()  # an upgrade's connection serves no second request

    # -- the client leaving, while the exchange waits -------------------------------------
    def _readable(self) -> None:
        try:
            data = self._socket().recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self._unwatch()
        if data:
            return  # bytes ahead of the answer: the session decides what they are
        self._gone()

    def _watch(self) -> None:
        self.watching = True
        self.plane.loop.add_reader(self.fd, self._readable)

    def _unwatch(self) -> None:
        self.watches.cancel(self)
        if self.watching:
            self.watching = False
            self.plane.loop.remove_reader(self.fd)

    def _gone(self) -> None:
        """The client closed (or reset) before its answer: stop everything for it."""
        self._unwatch()
        self.closed = True
        self.connections.discard(self)
        if self.sock is not None:
            self.sock.close()  # safe twice: a transport that failed may have closed it
        else:
            os.close(self.fd)
        if self.task is not None:
            self.task.cancel()
        if self.peer is not None:
            self.peer.abandon()

    # -- what the exchange may do --------------------------------------------------------
    def upgrade(self) -> asyncio.Transport | int:
        self.upgraded = True
        self.connections.discard(self)
        if self.transport is not None:
            return self.transport
        self._unwatch()
        return self.sock.detach() if self.sock is not None else self.fd

    def _socket(self) -> socket.socket:
        """The connection as a socket object, made the first time it is needed."""
        if self.sock is None:
            self.sock = socket.socket(fileno=self.fd)
            self.sock.setblocking(False)
        return self.sock

    def write(self, data: bytes) -> None:
        if self.transport is not None or self.closed:
            super().write(data)
            return
        self.unsent.append(data)
        if self.peer is not None and not self.holding_peer:
            self.holding_peer = True
            self.peer.pause_reading()
        self._become_transport()

    def close(self) -> None:
        if self.transport is not None:
            if not self.closed:
                self.transport.close()
        elif self.becoming is not None:
            self.close_when_sent = True
        elif not self.closed:
            self._gone()

    def abandon(self) -> None:
        if self.transport is not None:
            super().abandon()
            return
        self.unsent.clear()  # nothing of it is owed now
        self.close()

    async def transport_ready(self) -> None:
        self._become_transport()
        becoming = self.becoming
        if becoming is not None:
            await asyncio.shield(becoming)

    # -- the transport, when one is needed ---------------------------------------------------
    def _become_transport(self) -> None:
        if self.transport is None and self.becoming is None and not self.closed:
            self._unwatch()  # the transport watches the socket from now on
            self.becoming = self.plane.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.plane.loop.connect_accepted_socket(lambda: self, self._socket())
        except OSError as error:
            log.info("cannot serve a connection from %s: %s", self.client_ip, error)
            self.unsent.clear()
            self._gone()  # closes the socket
        finally:
            self.becoming = None

    # -- asyncio.Protocol, once it is a transport ------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        # Nothing more is read, as a downstream reads nothing after an upgrade head:
        # bytes sent ahead of a 101 wait in the kernel for the session.
        self.pause_reading()
        unsent, self.unsent = self.unsent, []
        if unsent:
            self.transport.writelines(unsent)
        if self.holding_peer:
            self.holding_peer = False
            if self.peer is not None and self.transport.get_write_buffer_size() <= HIGH_WATER:
                self.peer.resume_reading()
        if self.close_when_sent:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return True  # the request is whole: keep our side open until its answer is sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.connections.discard(self)
        if self.task is not None and not self.upgraded:
            self.task.cancel()
        if self.peer is not None:
            self.peer.abandon()
