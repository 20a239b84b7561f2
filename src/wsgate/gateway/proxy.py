"""The data plane: client connections, backend connections, and the byte pump.

A client connection starts in :class:`Downstream`, which reads request heads
and runs one *exchange* at a time: admit, connect, forward, release. A plain
HTTP request is forwarded on a pooled keep-alive :class:`Upstream` and its slot
is held until the response ends. A WebSocket upgrade that the backend answers
with ``101`` becomes a :class:`Session`: both transports are handed to two tiny
relay protocols that write what they read to the other side and nothing else.

Flow control is the transports' own: each transport has write-buffer limits,
and when one side's buffer passes the high-water mark its ``pause_writing``
pauses reading on the other side, until ``resume_writing`` at the low mark.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import time
from collections import deque
from typing import TYPE_CHECKING, cast

from wsgate.admission import Admitted, Reason, Rejected, Ticket
from wsgate.gateway._relay import Link
from wsgate.gateway.frames import close_frame, masked_close_frame
from wsgate.gateway.head import (
    RequestHead,
    ResponseHead,
    error_response,
    render_request,
    render_response,
    websocket_problem,
)
from wsgate.gateway.http1 import BadMessage, Body, End, Head, RequestReader, ResponseReader, Upgrade
from wsgate.upstreams.pool import Backend

if TYPE_CHECKING:
    from wsgate.gateway.server import Gateway

__all__ = ["HIGH_WATER", "LOW_WATER", "Downstream", "OutOfResources", "Session", "Upstream"]

log = logging.getLogger("wsgate.proxy")

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# How long a gateway-initiated close waits for a frame boundary, then for the
# peers to finish the closing handshake, before it cuts the connection.
CLOSE_GRACE = 5.0


class OutOfResources(Exception):
    """The gateway has no descriptor (or memory) for one more backend connection."""


class Request:
    """One client request being received and forwarded."""

    __slots__ = ("body", "body_size", "ended", "head", "rest", "sink")

    def __init__(self, head: RequestHead):
        self.head = head
        self.body: list[bytes] = []  # received before an upstream took it
        self.body_size = 0
        self.ended = False
        self.rest = b""  # bytes after an upgrade head
        self.sink: Upstream | None = None

    def add_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.send_body(data, self.head.chunked)
        else:
            self.body.append(data)
            self.body_size += len(data)

    def end(self) -> None:
        self.ended = True
        if self.sink is not None:
            self.sink.end_body(self.head.chunked)


class Downstream(asyncio.Protocol):
    """A client connection until it becomes a WebSocket session (or closes)."""

    def __init__(self, gateway: Gateway):
        self.gw = gateway
        self.loop = gateway.loop
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.reader = RequestReader(gateway.config.max_head_size)
        self.pending: deque[Request] = deque()
        self.receiving: Request | None = None
        self.task: asyncio.Task[None] | None = None
        self.upstream: Upstream | None = None  # the exchange in progress, for flow control
        self.head_timer: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.closed = False
        self.upgraded = False

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.gw.stats.accepted_total += 1
        self.gw.downstreams.add(self)
        self._arm_head_timer()

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
                    self.task = self.loop.create_task(self._serve())
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
        if len(self.pending) > 16:
            self.pause_reading()  # pipelining is allowed, flooding is not

    def eof_received(self) -> bool | None:
        if self.task is None:
            return None  # close
        return True  # keep our side open until the exchange ends

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_head_timer()
        self.gw.downstreams.discard(self)
        if self.task is not None and not self.upgraded:
            self.task.cancel()
        if self.upstream is not None:
            self.upstream.abandon()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # -- helpers ------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _arm_head_timer(self) -> None:
        self.head_timer = self.loop.call_later(self.gw.config.timeouts.header, self._head_timed_out)

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

    def answer_bad_request(self, status: int, detail: str) -> None:
        """Answer a request we will not forward, then close: nothing was admitted."""
        self.gw.stats.bad_requests[status] += 1
        self.gw.access_log(
            kind="http", client=self.client_ip, status=status, outcome="bad_request",
            detail=detail, request_id=None,
        )  # fmt: skip
        self.write(error_response(status, "bad_request", detail=detail, close=True))
        self.close()

    # -- exchanges --------------------------------------------------------------------------
    async def _serve(self) -> None:
        try:
            while self.pending and not self.closed:
                request = self.pending[0]
                keep_alive = await self._exchange(request)
                self.pending.popleft()
                if self.upgraded:
                    return
                if not keep_alive or self.gw.draining:
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
        if not self.closed:
            self._arm_head_timer()

    async def _exchange(self, request: Request) -> bool:
        """Forward one request; return whether the client connection stays open."""
        gw = self.gw
        head = request.head
        started = time.monotonic()
        request_id = (head.get(b"x-request-id") or b"").decode("latin-1") or gw.new_request_id()
        kind = "websocket" if head.upgrade else "http"
        keep_alive = head.keep_alive and not head.upgrade

        if head.upgrade and head.is_websocket:
            problem = websocket_problem(head)
            if problem is not None:
                self.answer_bad_request(400, problem)
                return False
        elif head.upgrade:
            self.answer_bad_request(400, "only WebSocket upgrades are supported")
            return False
        if gw.draining:
            self._reject(Rejected(Reason.DRAINING, 1.0), kind, request_id, started, close=True)
            return False

        tried: set[str] = set()
        admitted: Admitted | None = None
        upstream: Upstream | None = None
        preferred: str | None = None
        while len(tried) < gw.config.connect_attempts:
            decision, preferred = await gw.admit(head, self.client_ip, exclude=tried)
            if self.closed:
                if isinstance(decision, Admitted):
                    gw.release(decision.ticket)
                return False
            if isinstance(decision, Rejected):
                if tried and decision.reason in (Reason.NO_CAPACITY, Reason.NO_HEALTHY_BACKEND):
                    decision = Rejected(Reason.BACKEND_UNREACHABLE, 1.0)
                close = not (keep_alive and request.ended)
                self._reject(decision, kind, request_id, started, close=close)
                return not close
            backend = gw.pool.get(decision.backend_id)
            if backend is None:
                gw.release(decision.ticket)
                tried.add(decision.backend_id)
                continue
            try:
                upstream = await gw.connector.acquire(backend, pooled=not head.upgrade)
            except asyncio.CancelledError:
                gw.release(decision.ticket)  # the client left while the backend connect was pending
                raise
            except OutOfResources:
                gw.release(decision.ticket)
                overloaded = Rejected(Reason.OVERLOADED, 1.0)
                self._reject(overloaded, kind, request_id, started, close=True)
                return False
            if upstream is not None:
                admitted = decision
                break
            gw.release(decision.ticket)
            tried.add(backend.id)
        if admitted is None or upstream is None:
            close = not (keep_alive and request.ended)
            self._reject(
                Rejected(Reason.BACKEND_UNREACHABLE, 1.0), kind, request_id, started, close=close
            )
            return not close

        fallback = preferred is not None and preferred != admitted.backend_id
        if fallback:
            gw.stats.affinity_fallbacks += 1
        slot = Slot(
            gw, upstream.backend, admitted.ticket, self.client_ip, request_id, started, kind,
            fallback,
        )  # fmt: skip
        return await Exchange(self, upstream, request, slot).run()

    def _reject(
        self, decision: Rejected, kind: str, request_id: str, started: float, *, close: bool
    ) -> None:
        gw = self.gw
        gw.stats.rejected[decision.reason] += 1
        retry = decision.retry_after if decision.retry_after > 0 else None
        self.write(error_response(decision.status, decision.reason, retry_after=retry, close=close))
        gw.access_log(
            kind=kind, client=self.client_ip, status=decision.status, outcome=decision.reason,
            request_id=request_id, duration=time.monotonic() - started,
        )  # fmt: skip


class Slot:
    """What one admitted connection holds and reports: its slot, released once; its log line."""

    __slots__ = (
        "backend", "bytes_in", "bytes_out", "client_ip", "fallback", "gw", "kind",
        "released", "request_id", "started", "status", "ticket",
    )  # fmt: skip

    def __init__(
        self,
        gw: Gateway,
        backend: Backend,
        ticket: Ticket,
        client_ip: str,
        request_id: str,
        started: float,
        kind: str,
        fallback: bool,
    ):
        self.gw = gw
        self.backend = backend
        self.ticket = ticket
        self.client_ip = client_ip
        self.request_id = request_id
        self.started = started
        self.kind = kind
        self.fallback = fallback
        self.status = 0
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.gw.release(self.ticket)

    def log(self, outcome: str) -> None:
        gw = self.gw
        duration = time.monotonic() - self.started
        gw.stats.observe_duration(self.kind, duration)
        gw.stats.bytes_from_clients += self.bytes_in
        gw.stats.bytes_to_clients += self.bytes_out
        if not gw.config.access_log:
            return  # the record's eleven fields would be built for nothing
        gw.access_log(
            kind=self.kind, client=self.client_ip, backend=self.backend.id,
            status=self.status, outcome=outcome, duration=duration,
            bytes_in=self.bytes_in, bytes_out=self.bytes_out, request_id=self.request_id,
            affinity="fallback" if self.fallback else None,
        )  # fmt: skip


class Exchange:
    """One admitted request on one upstream connection, until the response ends."""

    __slots__ = ("down", "request", "slot", "up")

    def __init__(self, down: Downstream, up: Upstream, request: Request, slot: Slot):
        self.down = down
        self.up = up
        self.request = request
        self.slot = slot

    async def run(self) -> bool:
        down, up, slot = self.down, self.up, self.slot
        gw = down.gw
        head = self.request.head
        backend = slot.backend
        backend.admitted_total += 1
        gw.stats.admitted_total += 1
        down.upstream = up
        up.begin(self)
        wire = render_request(head, client_ip=slot.client_ip, request_id=slot.request_id)
        if head.upgrade:
            up.write(wire + self.request.rest)
            slot.bytes_in += len(self.request.rest)
        else:
            body = b"".join(self.request.body)
            self.request.body.clear()
            self.request.body_size = 0
            if head.chunked and body:
                body = b"%x\r\n%s\r\n" % (len(body), body)
            if head.chunked and self.request.ended:
                body += b"0\r\n\r\n"
            up.write(wire + body)
            slot.bytes_in += len(body)
            self.request.sink = up
            down.resume_reading()
        try:
            outcome = await up.finished
        except asyncio.CancelledError:
            # The client went away mid-exchange: the backend counts the request until
            # the connection to it is closed.
            up.abandon()
            up.release_when_closed(slot)
            slot.log("client_closed")
            raise
        finally:
            down.upstream = None
        if outcome == "upgraded":
            gw.pool.record_success(backend)
            return True
        if outcome == "complete":
            # Passive ejection counts refused upgrades; any other answer is a success.
            if 500 <= slot.status < 600 and head.upgrade:
                gw.pool.record_failure(backend, f"{slot.status} on upgrade")
            else:
                gw.pool.record_success(backend)
            keep = head.keep_alive and not head.upgrade and self.request.ended and not gw.draining
            slot.log("ok" if slot.status < 500 else "backend_error")
            if head.upgrade:
                up.abandon()  # a refused upgrade leaves the connection in no known state
                up.release_when_closed(slot)
            else:
                slot.release()  # the backend has answered in full: it serves no request here
                gw.connector.give_back(up)
            return keep
        # The backend failed before or during the response.
        if slot.status == 0:
            backend.connect_failures_total += 1
            gw.pool.record_failure(backend, outcome)
            down.write(error_response(502, Reason.BACKEND_UNREACHABLE, retry_after=1.0, close=True))
            slot.status = 502
        up.abandon()
        up.release_when_closed(slot)
        slot.log(outcome)
        return False


class Upstream(asyncio.Protocol):
    """One connection to a backend: HTTP exchanges one after another, or one upgrade."""

    def __init__(self, gateway: Gateway, backend: Backend):
        self.gw = gateway
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.reader = ResponseReader()
        self.exchange: Exchange | None = None
        self.finished: asyncio.Future[str] = gateway.loop.create_future()
        self.chunked_out = False
        self.closed = False
        self.lost = False  # the socket is closed (connection_lost has come)
        self.release_on_lost: Slot | None = None
        self.reading_paused = False
        self.idle_since = 0.0
        self.upgrade_head: ResponseHead | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def begin(self, exchange: Exchange) -> None:
        self.exchange = exchange
        if self.finished.done():
            self.finished = self.gw.loop.create_future()
        if exchange.request.head.method == b"HEAD":
            self.reader.expect_no_body()

    def _finish(self, outcome: str) -> None:
        if not self.finished.done():
            self.finished.set_result(outcome)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes from an idle pooled connection: it is no longer trustworthy.
            self.abandon()
            return
        down = exchange.down
        try:
            events = self.reader.feed(data)
        except BadMessage as error:
            log.warning("backend %s: %s", self.backend.id, error.detail)
            self.abandon()
            self._finish("bad_response")
            return
        for event in events:
            if isinstance(event, Head):
                head = event.head
                assert isinstance(head, ResponseHead)
                exchange.slot.status = head.status
                request = exchange.request
                if head.status == 101 and request.head.upgrade:
                    self.upgrade_head = head
                    continue  # the Upgrade event follows
                chunked = head.chunked or (
                    head.content_length is None and _may_have_body(head.status, request.head)
                )
                self.chunked_out = chunked
                keep = request.head.keep_alive and not request.head.upgrade and not self.gw.draining
                wire = render_response(
                    head, keep_alive=keep, chunked=chunked, extra=self.gw.response_headers(exchange)
                )
                down.write(wire)
            elif isinstance(event, Body):
                if self.chunked_out:
                    down.write(b"%x\r\n%s\r\n" % (len(event.data), event.data))
                else:
                    down.write(event.data)
                exchange.slot.bytes_out += len(event.data)
            elif isinstance(event, End):
                if exchange.slot.status == 101:
                    continue
                if self.chunked_out:
                    down.write(b"0\r\n\r\n")
                self.exchange = None
                self._finish("complete")
            elif isinstance(event, Upgrade):
                self.exchange = None
                if self.upgrade_head is None:
                    self.abandon()
                    self._finish("bad_response")
                    return
                extra = self.gw.response_headers(exchange)
                down.write(
                    render_response(self.upgrade_head, keep_alive=False, chunked=False, extra=extra)
                )
                self._finish("upgraded")
                self.gw.start_session(exchange, event.rest)
                return

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True  # uvloop closes the socket as this returns
        self.gw.connector.forget(self)
        slot = self.release_on_lost
        if slot is not None:
            self.release_on_lost = None
            slot.release()
        exchange = self.exchange
        if exchange is None:
            return
        for event in self.reader.feed_eof():
            if isinstance(event, End):
                if self.chunked_out:
                    exchange.down.write(b"0\r\n\r\n")
                self.exchange = None
                self._finish("complete_at_eof")
                return
        self.exchange = None
        self._finish("backend_closed" if exchange.slot.status else "backend_failed")

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.pause_reading()

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.down.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_body(self, data: bytes, chunked: bool) -> None:
        if self.exchange is not None:
            self.exchange.slot.bytes_in += len(data)
        self.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)

    def end_body(self, chunked: bool) -> None:
        if chunked:
            self.write(b"0\r\n\r\n")

    def release_when_closed(self, slot: Slot) -> None:
        """Release ``slot`` once this connection is closed (at once if it is already)."""
        if self.lost or self.transport is None:
            slot.release()
        else:
            self.release_on_lost = slot

    def abandon(self) -> None:
        """Close without reuse (the exchange was cut short)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
        self.gw.connector.forget(self)


def _may_have_body(status: int, request: RequestHead) -> bool:
    return not (request.method == b"HEAD" or status < 200 or status in (204, 304))


class _Handoff(asyncio.Protocol):
    """A new session's two transports, until uvloop has written what it holds for them.

    Their sockets then go to the relay (:mod:`wsgate.gateway._relay`): the session's
    bytes never pass through Python again. Usually nothing is waiting and
    :func:`hand_over` does it at once; otherwise this protocol holds both
    transports, and a write-buffer limit of zero makes uvloop call
    ``resume_writing`` when the last byte has left.
    """

    __slots__ = ("backend_transport", "client_transport", "rest", "session")

    def __init__(
        self,
        session: Session,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport,
        rest: bytes,
    ):
        self.session: Session | None = session
        self.client_transport = client_transport
        self.backend_transport = backend_transport
        self.rest = rest
        for transport in (client_transport, backend_transport):
            transport.set_protocol(self)
            transport.pause_reading()  # the relay reads from here on
            transport.set_write_buffer_limits(0, 0)

    def hand_over_when_written(self) -> None:
        session = self.session
        if session is None or any(
            transport.get_write_buffer_size()
            for transport in (self.client_transport, self.backend_transport)
        ):
            return
        self.session = None
        session.handoff = None
        hand_over(session, self.client_transport, self.backend_transport, self.rest)

    def abort(self) -> None:
        self.session = None
        _abort(self.client_transport, self.backend_transport)

    def resume_writing(self) -> None:
        self.hand_over_when_written()

    def connection_lost(self, exc: Exception | None) -> None:
        session = self.session
        if session is not None:
            self.abort()
            session.finish("handoff_failed")


def hand_over(
    session: Session,
    client_transport: asyncio.Transport,
    backend_transport: asyncio.Transport,
    rest: bytes,
) -> None:
    """Give the relay a descriptor of each socket, then let the transports go.

    Aborting a transport closes only its own descriptor (libuv takes it out of
    its epoll set first): the sockets stay open through the duplicates. uvloop
    closes its descriptors one loop iteration later, so for that moment the
    session holds two more; at the open-files limit the gateway's spare
    descriptors make room (:meth:`Gateway.spare_descriptor`).
    """
    gw = session.gw
    try:
        client_fd = _duplicate(gw, client_transport)
    except OSError:
        _abort(client_transport, backend_transport)
        session.finish("client_error")
        return
    try:
        backend_fd = _duplicate(gw, backend_transport)
    except OSError:
        os.close(client_fd)
        _abort(client_transport, backend_transport)
        session.finish("backend_error")
        return
    _abort(client_transport, backend_transport)
    session.relay(client_fd, backend_fd, rest)


def _duplicate(gw: Gateway, transport: asyncio.Transport) -> int:
    fd = transport.get_extra_info("socket").fileno()
    try:
        return os.dup(fd)
    except OSError as error:
        if error.errno != errno.EMFILE or not gw.spare_descriptor():
            raise
        return os.dup(fd)


class _Gone(asyncio.Protocol):
    """The protocol of a transport given up: its connection_lost concerns no one."""


_GONE = _Gone()


def _abort(*transports: asyncio.Transport) -> None:
    for transport in transports:
        transport.set_protocol(_GONE)
        transport.abort()


class Session:
    """A live WebSocket session: two sockets relayed in C, one slot held.

    It keeps only what the close and the reports need: the HTTP machinery that
    set it up (parsers, heads, the exchange) is left behind for the collector.
    """

    __slots__ = (
        "backend", "close_timer", "closing_code", "closing_reason", "done",
        "duration_factor", "gw", "handoff", "link", "slot", "started",
    )  # fmt: skip

    def __init__(self, slot: Slot):
        self.slot = slot
        self.gw = slot.gw
        self.backend = slot.backend
        self.started = time.monotonic()
        # max_connection_duration is stretched or shrunk by up to 10% per session, so
        # sessions opened together do not all end together.
        self.duration_factor = random.uniform(0.9, 1.1)
        self.closing_code = 0
        self.closing_reason = ""
        self.close_timer: asyncio.TimerHandle | None = None
        self.done = False
        self.handoff: _Handoff | None = None
        self.link: Link | None = None

    def start(
        self, client_transport: asyncio.Transport, backend_transport: asyncio.Transport, rest: bytes
    ) -> None:
        """Take over both transports; ``rest`` is what the backend sent after its 101."""
        self.backend.connections.add(self)
        self.gw.sessions.add(self)
        if client_transport.get_write_buffer_size() or backend_transport.get_write_buffer_size():
            self.handoff = _Handoff(self, client_transport, backend_transport, rest)
        else:
            hand_over(self, client_transport, backend_transport, rest)

    def relay(self, client_fd: int, backend_fd: int, rest: bytes) -> None:
        """The sockets are ours alone now: the relay moves their bytes from here on."""
        try:
            self.link = self.gw.relay.add(client_fd, backend_fd, rest, self)
        except OSError as error:
            log.warning("relay refused a session: %s", error)
            self.finish("relay_failed")
            return
        if self.closing_code:  # asked for while uvloop was still writing
            self._send_close()

    @property
    def bytes_in(self) -> int:
        link = self.link
        return self.slot.bytes_in + (link.bytes_in if link is not None else 0)

    @property
    def bytes_out(self) -> int:
        link = self.link
        return self.slot.bytes_out + (link.bytes_out if link is not None else 0)

    @property
    def age(self) -> float:
        return time.monotonic() - self.started

    def close_gracefully(self, code: int, reason: str) -> bool:
        """Send the client a close frame at the next frame boundary; then wind down.

        Returns False when the session is already closing or closed.
        """
        if self.done or self.closing_code:
            return False
        self.closing_code = code
        self.closing_reason = reason
        self.gw.stats.closed_by_gateway[reason] += 1
        if self.link is not None:
            self._send_close()
        self.close_timer = self.gw.loop.call_later(CLOSE_GRACE, self.finish, f"closed_{reason}")
        return True

    def _send_close(self) -> None:
        # The relay writes the client's close frame between two frames (unless the
        # backend's own close is already passing), then tells the backend we are
        # going away as a client would, and relays nothing more either way.
        assert self.link is not None
        self.link.close_gracefully(
            close_frame(self.closing_code, self.closing_reason),
            masked_close_frame(1001, "gateway closing"),
        )

    def finish(self, outcome: str) -> None:
        """Close both sides, exactly once; the slot is released when the backend's is closed.

        The relay calls this too (``on_end``) when either side closes or fails.
        Bytes still owed to the backend are flushed for up to the relay's linger,
        and until its socket is closed the backend still counts the session: the
        relay says when (``on_backend_closed``, :meth:`backend_closed`).
        """
        if self.done:
            return
        self.done = True
        if self.close_timer is not None:
            self.close_timer.cancel()
        if self.handoff is not None:
            self.handoff.abort()
            self.handoff = None
        slot = self.slot
        link = self.link
        if link is not None:
            link.finish()  # what is still waiting for a peer is flushed, then closed
            slot.bytes_in += link.bytes_in
            slot.bytes_out += link.bytes_out
            self.link = None  # the link refers to us until its backend socket is closed
        else:
            slot.release()  # never relayed: the transports' sockets are closed already
        self.backend.connections.discard(self)
        self.gw.sessions.discard(self)
        slot.log(f"closed_{self.closing_reason}" if self.closing_code else outcome)

    def backend_closed(self) -> None:
        """The relay closed the socket toward the backend: its slot is free now."""
        self.slot.release()
