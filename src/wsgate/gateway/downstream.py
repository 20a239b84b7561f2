"""The client's side: one connection, its request heads, one exchange at a time.

A :class:`Downstream` reads request heads with
:class:`~wsgate.gateway.http1.RequestReader`, answers what it will not forward
(a malformed head, a head too slow to arrive, an upgrade other than
WebSocket), and runs an :class:`~wsgate.gateway.exchange.Exchange` per request,
in order: pipelined requests wait their turn, and reading stops while too
many wait. When an exchange is upgraded, its session takes the connection
over and the downstream is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable

from wsgate.gateway.exchange import Client, Exchange, Request
from wsgate.gateway.flow import HIGH_WATER
from wsgate.gateway.head import (
    UNSUPPORTED_VERSION,
    WEBSOCKET_VERSION,
    Header,
    RequestHead,
    error_response,
    upgrade_problem,
)
from wsgate.gateway.http1 import BadMessage, Body, End, Head, RequestReader, Upgrade
from wsgate.gateway.outcomes import Kind, Outcome
from wsgate.gateway.plane import Plane

__all__ = ["PIPELINE_LIMIT", "Downstream"]

log = logging.getLogger("wsgate.downstream")

# Requests a client may send ahead of their answers before reading stops.
PIPELINE_LIMIT = 16


class Downstream(Client):
    """A client connection until it becomes a WebSocket session (or closes)."""

    def __init__(self, plane: Plane, connections: set[Client], *, early: bytes = b""):
        super().__init__()
        self.plane = plane
        self.connections = connections  # the gateway's: what a drain or a stop closes
        self.early = early  # read from the socket before it was a transport
        self.client_ip = ""
        self.reader = RequestReader(plane.config.max_head_size)
        self.pending: deque[Request] = deque()
        self.receiving: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.head_timer: asyncio.TimerHandle | None = None
        self.upgraded = False
        self.client_done = False  # the client ended its side: no request follows these

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.client_ip = self.plane.client_address.of_connection(self.transport)
        self.plane.stats.accepted_total += 1
        self.connections.add(self)
        self._arm_head_timer()
        if self.early:
            early, self.early = self.early, b""
            self.data_received(early)  # before anything the transport reads

    def data_received(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except BadMessage as error:
            self.answer_bad_request(error.status, error.detail)
            return
        for event in events:
            if isinstance(event, Head):
                assert isinstance(event.head, RequestHead)
                self._cancel_head_timer()
                request = Request(event.head)
                self.receiving = request
                self.pending.append(request)
                if self.task is None:
                    self.task = self.plane.loop.create_task(self._serve())
            elif isinstance(event, Body):
                assert self.receiving is not None
                self.receiving.add_body(event.data)
                if self.receiving.body_size > HIGH_WATER:
                    self.pause_reading()
            elif isinstance(event, End):
                assert self.receiving is not None
                if not self.receiving.head.upgrade:
                    self.receiving.end()
                    self.receiving = None
            elif isinstance(event, Upgrade):
                assert self.receiving is not None
                self.receiving.rest = event.rest
                self.receiving = None
                self.pause_reading()  # the session decides what these bytes are
        if len(self.pending) > PIPELINE_LIMIT:
            self.pause_reading()  # pipelining is allowed, flooding is not

    def eof_received(self) -> bool | None:
        if self.task is None:
            return None  # close
        if self.receiving is not None:
            # The client ended its side inside a request's body: that request can
            # never be complete, and its backend would wait for the rest as long
            # as we did. Closing ends the exchange as a client that left would
            # (connection_lost follows), so the slot is freed once the backend's
            # connection is closed.
            return None
        self.client_done = True
        return True  # a whole request: keep our side open until its answer is sent

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_head_timer()
        self.connections.discard(self)
        if self.task is not None and not self.upgraded:
            self.task.cancel()
        if self.peer is not None:
            self.peer.abandon()  # the backend connection of the exchange in progress

    # -- what the exchange may do --------------------------------------------------------
    def upgrade(self) -> asyncio.Transport:
        """Give the connection up to a session; its transport, from now on the session's."""
        assert self.transport is not None
        self.upgraded = True
        self.connections.discard(self)
        self.reader.detach()  # frees the parser by reference counting, not by the collector
        return self.transport

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    # -- requests -----------------------------------------------------------------------
    def _arm_head_timer(self) -> None:
        self.head_timer = self.plane.loop.call_later(
            self.plane.config.timeouts.header, self._head_timed_out
        )

    def _cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.task is None and not self.upgraded:
            if self.reader.idle:
                self.close()  # an idle keep-alive connection: nothing to answer
            else:
                self.answer_bad_request(408, "request head not complete in time")

    def answer_bad_request(self, status: int, detail: str, *, extra: Iterable[Header] = ()) -> None:
        """Answer a request we will not forward, then close: nothing was admitted."""
        self.plane.stats.bad_requests[status] += 1
        self.plane.log.write(
            kind=Kind.HTTP, client=self.client_ip, status=status, outcome=Outcome.BAD_REQUEST,
            detail=detail, request_id=None,
        )  # fmt: skip
        self.write(error_response(status, "bad_request", detail=detail, close=True, extra=extra))
        self.close()

    async def _serve(self) -> None:
        try:
            while self.pending and not self.closed:
                request = self.pending[0]
                keep_alive = await self._exchange(request)
                self.pending.popleft()
                if self.upgraded:
                    return
                if not keep_alive or self.plane.draining:
                    self.close()
                    return
                self.resume_reading()
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("exchange failed")
            self.close()
            return
        finally:
            self.task = None
        failed = self.reader.failed
        if failed is not None and not self.closed:
            self.answer_bad_request(failed.status, failed.detail)  # the request after these
        elif self.client_done:
            self.close()  # every request it sent is answered, and no other can come
        elif not self.closed:
            self._arm_head_timer()

    async def _exchange(self, request: Request) -> bool:
        """Forward one request; return whether the client connection stays open."""
        head = request.head
        problem = upgrade_problem(head)
        if problem == UNSUPPORTED_VERSION:
            self.answer_bad_request(
                426, problem, extra=[(b"Sec-WebSocket-Version", WEBSOCKET_VERSION)]
            )
            return False
        if problem is not None:
            self.answer_bad_request(400, problem)
            return False
        plane = self.plane
        client_ip = plane.client_address.of_request(self.client_ip, head)
        exchange = Exchange(plane, plane.route_for(head), self, request, client_ip)
        return await exchange.run()
