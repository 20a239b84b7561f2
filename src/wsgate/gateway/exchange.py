"""One admitted request: admit, connect, forward, answer, and commit or release.

An :class:`Exchange` is made by the client's downstream for each request. It
asks its route's admission for a slot, connects to the chosen backend (the
next candidate when one cannot be reached), writes the request, and rewrites
the response the backend's :class:`~wsgate.gateway.upstream.Upstream` reports
to it (as a :class:`~wsgate.gateway.upstream.ResponseSink`). Its
:class:`~wsgate.gateway.reservation.Reservation` is released when the
exchange ends, however it ends, unless it was committed: to a session by a
``101``, or to an upstream connection cut short, which releases it once its
socket is closed (until then the backend still counts the request).
"""

from __future__ import annotations

import abc
import asyncio
import socket
import time

from wsgate.admission import Reason, Rejected
from wsgate.gateway.access_log import Record
from wsgate.gateway.admit import Admission
from wsgate.gateway.connector import ConnectFailed, Dialed, OutOfResources
from wsgate.gateway.flow import Endpoint
from wsgate.gateway.head import (
    RequestHead,
    ResponseHead,
    error_response,
    render_request,
    render_response,
)
from wsgate.gateway.http1 import switching_response
from wsgate.gateway.outcomes import Ending, Kind, Outcome
from wsgate.gateway.plane import Plane, Route
from wsgate.gateway.reservation import Reservation
from wsgate.gateway.upstream import Upstream
from wsgate.upstreams.pool import Backend

__all__ = ["Client", "Exchange", "Request"]


class Client(Endpoint, abc.ABC):
    """The client's connection as an exchange sees it: an endpoint that can be upgraded.

    ``task`` is its exchanges' while one is in flight (what a drain waits for).
    """

    proto = "http"  # what the backend is told the client speaks (X-Forwarded-Proto)
    task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    def upgrade(self) -> asyncio.Transport | int:
        """Give the connection up to a session: its transport, or its descriptor if it has none."""

    async def transport_ready(self) -> None:
        """Until the connection has a transport (one accepted as a bare socket gets one)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close once what was written is sent."""


class Request:
    """One client request being received and forwarded."""

    __slots__ = ("body", "body_size", "ended", "head", "rest", "sink")

    def __init__(self, head: RequestHead):
        self.head = head
        self.body: list[bytes] = []  # received before an exchange took it
        self.body_size = 0
        self.ended = False
        self.rest = b""  # bytes after an upgrade head
        self.sink: Exchange | None = None

    def add_body(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.request_body(data)
        else:
            self.body.append(data)
            self.body_size += len(data)

    def end(self) -> None:
        self.ended = True
        if self.sink is not None:
            self.sink.request_end()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _may_have_body(status: int, request: RequestHead) -> bool:
    return not (request.method == b"HEAD" or status < 200 or status in (204, 304))


class Exchange:
    """One request from admission to the end of its response (or to its session)."""

    __slots__ = (
        "backend", "chunked_out", "client", "client_ip", "finished", "kind", "plane",
        "record", "request", "request_id", "reservation", "route", "started", "upstream",
    )  # fmt: skip

    def __init__(
        self, plane: Plane, route: Route | None, client: Client, request: Request, client_ip: str
    ):
        self.plane = plane
        self.route = route
        self.client = client
        self.request = request
        self.client_ip = client_ip
        head = request.head
        self.started = time.monotonic()
        self.request_id = (head.get(b"x-request-id") or b"").decode(
            "latin-1"
        ) or plane.log.new_request_id()
        self.kind = Kind.WEBSOCKET if head.upgrade else Kind.HTTP
        self.chunked_out = False
        # Set once a backend is connected:
        self.backend: Backend | None = None
        self.upstream: Upstream | None = None
        self.reservation: Reservation | None = None
        self.record: Record | None = None
        self.finished: asyncio.Future[Ending] | None = None

    async def run(self) -> bool:
        """Forward the request; return whether the client connection stays open."""
        plane, route, request = self.plane, self.route, self.request
        head = request.head
        keep_alive = head.keep_alive and not head.upgrade
        if plane.draining:
            self._reject(Rejected(Reason.DRAINING, 1.0), close=True)
            return False
        if route is None:
            # No backend is asked and no slot or token spent: a 404 without Retry-After.
            close = not (keep_alive and request.ended)
            self._reject(Rejected(Reason.NO_ROUTE, 0.0), close=close)
            return not close
        tried: set[str] = set()
        while len(tried) < plane.config.connect_attempts:
            decision, preferred = await route.admission.admit(head, self.client_ip, exclude=tried)
            if isinstance(decision, Rejected):
                if self.client.closed:
                    return False
                if tried and decision.reason in (Reason.NO_CAPACITY, Reason.NO_HEALTHY_BACKEND):
                    decision = Rejected(Reason.BACKEND_UNREACHABLE, 1.0)
                close = not (keep_alive and request.ended)
                self._reject(decision, close=close)
                return not close
            # However this block ends, the slot is given back then, unless a session took it.
            with decision as reservation:
                if self.client.closed:
                    return False
                backend = route.pool.get(reservation.backend_id)
                if backend is None:
                    tried.add(reservation.backend_id)
                    continue
                connector = plane.connector
                # An upgrade to a plain-TCP backend is dialed by the relay (in C).
                dialing = head.upgrade and self.client.proto == "http" and connector.dials(backend)
                if not dialing and self.client.transport is None:
                    await self.client.transport_ready()  # the session will need it
                    if self.client.closed:
                        return False
                try:
                    if dialing:
                        dialed = await connector.dial(backend, self._request_bytes(backend))
                    else:
                        upstream = await connector.acquire(backend, pooled=not head.upgrade)
                except ConnectFailed as failure:
                    backend.connect_failures_total += 1
                    route.pool.record_failure(backend, failure.reason)
                    tried.add(backend.id)
                    continue
                except OutOfResources:
                    self._reject(Rejected(Reason.OVERLOADED, 1.0), close=True)
                    return False
                fallback = preferred is not None and preferred != backend.id
                if fallback:
                    plane.stats.affinity_fallbacks += 1
                if dialing:
                    return await self._answered(reservation, backend, dialed, fallback)
                return await self._forward(reservation, backend, upstream, fallback)
        close = not (keep_alive and request.ended)
        self._reject(Rejected(Reason.BACKEND_UNREACHABLE, 1.0), close=close)
        return not close

    def _request_bytes(self, backend: Backend) -> bytes:
        """The request's head as the backend is sent it (with an upgrade's early bytes)."""
        head = self.request.head
        wire = render_request(
            head,
            client_ip=self.client_ip,
            request_id=self.request_id,
            host=backend.address,
            proto=self.client.proto,
        )
        return wire + self.request.rest if head.upgrade else wire

    def _admitted(self, reservation: Reservation, backend: Backend, fallback: bool) -> Record:
        """Count the admission and start its record: a backend took the connection."""
        record = Record(
            self.kind, self.client_ip, self.request_id, self.started, backend.id, fallback=fallback
        )
        self.reservation, self.backend, self.record = reservation, backend, record
        backend.admitted_total += 1
        self.plane.stats.admitted_total += 1
        assert self.route is not None
        self.route.admitted_total += 1
        if self.request.head.upgrade:
            record.bytes_in += len(self.request.rest)
        return record

    async def _answered(
        self, reservation: Reservation, backend: Backend, dialed: Dialed, fallback: bool
    ) -> bool:
        """An upgrade the relay dialed: a session on a 101, else the answer read here."""
        link, answer, failure = dialed
        if failure:
            # The backend took the connection and failed before answering; the relay
            # has closed its socket.
            self._admitted(reservation, backend, fallback)
            return self._backend_failed(Ending.BACKEND_FAILED)
        switched = switching_response(answer)
        if switched is None:
            # Refused, or not understood: the response is read as through a transport.
            sock = socket.socket(fileno=link.take())
            upstream = Upstream(backend, self.plane.connector.forget)
            try:
                await self.plane.loop.connect_accepted_socket(lambda: upstream, sock)
            except asyncio.CancelledError:
                # The client left: the backend counts the request until this socket
                # is closed (uvloop closes it as the cancel passes).
                upstream.release_when_closed(reservation)
                raise
            except OSError:
                sock.close()  # a no-op once uvloop has let go of it
                self._admitted(reservation, backend, fallback)
                return self._backend_failed(Ending.BACKEND_FAILED)
            return await self._forward(reservation, backend, upstream, fallback, answer=answer)
        head, rest = switched
        record = self._admitted(reservation, backend, fallback)
        record.status = head.status
        extra = self._admission.cookie_headers(backend.id, self.request.head)
        response = render_response(head, keep_alive=False, chunked=False, extra=extra)
        self.plane.sessions.attach(
            reservation, record, backend, self.client.upgrade(), link, response, rest
        )
        assert self.route is not None
        self.route.pool.record_success(backend)
        return True

    async def _forward(
        self,
        reservation: Reservation,
        backend: Backend,
        upstream: Upstream,
        fallback: bool,
        *,
        answer: bytes | None = None,
    ) -> bool:
        """Forward through ``upstream``; ``answer``: the relay sent the request, this came."""
        plane, client, request = self.plane, self.client, self.request
        head = request.head
        record = self._admitted(reservation, backend, fallback)
        self.upstream = upstream
        self.finished = finished = plane.loop.create_future()
        client.peer, upstream.peer = upstream, client  # flow control, both ways
        upstream.begin(self, head_request=head.method == b"HEAD", upgrade=head.upgrade)
        if answer is not None:
            upstream.data_received(answer)
        elif head.upgrade:
            upstream.write(self._request_bytes(backend))
        else:
            wire = self._request_bytes(backend)
            body = b"".join(request.body)
            request.body.clear()
            request.body_size = 0
            if head.chunked and body:
                body = _chunk(body)
            if head.chunked and request.ended:
                body += b"0\r\n\r\n"
            upstream.write(wire + body)
            record.bytes_in += len(body)
            request.sink = self
            client.resume_reading()
        try:
            ending = await finished
        except asyncio.CancelledError:
            # The client went away mid-exchange: the backend counts the request until
            # the connection to it is closed.
            upstream.abandon()
            upstream.release_when_closed(reservation)
            plane.log.finished(record, Outcome.CLIENT_CLOSED)
            raise
        finally:
            client.peer = upstream.peer = None
        return self._after(ending)

    def _after(self, ending: Ending) -> bool:
        """Account for the response's end; whether the client connection stays open."""
        plane, route = self.plane, self.route
        assert route is not None  # an admitted exchange has its route
        backend, upstream, record, reservation = (
            self.backend, self.upstream, self.record, self.reservation,
        )  # fmt: skip
        assert backend is not None and upstream is not None and record is not None
        assert reservation is not None
        head = self.request.head
        if ending is Ending.UPGRADED:
            route.pool.record_success(backend)
            return True
        if ending is Ending.COMPLETE:
            # Passive ejection counts refused upgrades; any other answer is a success.
            if 500 <= record.status < 600 and head.upgrade:
                route.pool.record_failure(backend, f"{record.status} on upgrade")
            else:
                route.pool.record_success(backend)
            keep = head.keep_alive and not head.upgrade and self.request.ended
            plane.log.finished(record, Outcome.OK if record.status < 500 else Outcome.BACKEND_ERROR)
            if head.upgrade:
                upstream.abandon()  # a refused upgrade leaves the connection in no known state
                upstream.release_when_closed(reservation)
            else:
                # The backend has answered in full: the slot is free as the block ends.
                plane.connector.give_back(upstream)
            return keep and not plane.draining
        upstream.abandon()
        upstream.release_when_closed(reservation)
        return self._backend_failed(ending)

    def _backend_failed(self, ending: Ending) -> bool:
        """The backend failed before or during its response: a 502 if none was begun."""
        route, backend, record = self.route, self.backend, self.record
        assert route is not None and backend is not None and record is not None
        if record.status == 0:
            backend.connect_failures_total += 1
            route.pool.record_failure(backend, ending)
            self.client.write(
                error_response(502, Reason.BACKEND_UNREACHABLE, retry_after=1.0, close=True)
            )
            record.status = 502
        self.plane.log.finished(record, ending)
        return False

    def _reject(self, decision: Rejected, *, close: bool) -> None:
        plane = self.plane
        plane.stats.rejected[decision.reason] += 1
        if self.route is not None:
            self.route.rejected[decision.reason] += 1
        retry = decision.retry_after if decision.retry_after > 0 else None
        self.client.write(
            error_response(decision.status, decision.reason, retry_after=retry, close=close)
        )
        plane.log.write(
            kind=self.kind, client=self.client_ip, status=decision.status,
            outcome=decision.reason, request_id=self.request_id,
            duration=time.monotonic() - self.started,
        )  # fmt: skip

    @property
    def _admission(self) -> Admission:
        assert self.route is not None  # an admitted exchange has its route
        return self.route.admission

    # -- the request body, as the downstream receives it ----------------------------------
    def request_body(self, data: bytes) -> None:
        assert self.upstream is not None and self.record is not None
        self.record.bytes_in += len(data)
        self.upstream.write(_chunk(data) if self.request.head.chunked else data)

    def request_end(self) -> None:
        if self.request.head.chunked and self.upstream is not None:
            self.upstream.write(b"0\r\n\r\n")

    # -- ResponseSink: what the upstream reports ------------------------------------------
    def response_head(self, head: ResponseHead) -> None:
        record = self.record
        assert record is not None and self.backend is not None
        record.status = head.status
        request = self.request.head
        if head.status == 101 and request.upgrade:
            return  # answered with the upgrade, once the backend's bytes say it happened
        chunked = head.chunked or (
            head.content_length is None and _may_have_body(head.status, request)
        )
        self.chunked_out = chunked
        keep = request.keep_alive and not request.upgrade and not self.plane.draining
        extra = self._admission.cookie_headers(self.backend.id, request)
        self.client.write(render_response(head, keep_alive=keep, chunked=chunked, extra=extra))

    def response_body(self, data: bytes) -> None:
        assert self.record is not None
        self.client.write(_chunk(data) if self.chunked_out else data)
        self.record.bytes_out += len(data)

    def ended(self, ending: Ending) -> None:
        if self.chunked_out and ending in (Ending.COMPLETE, Ending.COMPLETE_AT_EOF):
            self.client.write(b"0\r\n\r\n")
        self._finish(ending)

    def _finish(self, ending: Ending) -> None:
        finished = self.finished
        if finished is not None and not finished.done():
            finished.set_result(ending)

    def upgraded(self, head: ResponseHead, rest: bytes) -> None:
        backend, upstream, record, reservation = (
            self.backend, self.upstream, self.record, self.reservation,
        )  # fmt: skip
        assert backend is not None and upstream is not None and upstream.transport is not None
        assert record is not None and reservation is not None
        extra = self._admission.cookie_headers(backend.id, self.request.head)
        self.client.write(render_response(head, keep_alive=False, chunked=False, extra=extra))
        self._finish(Ending.UPGRADED)
        client_transport = self.client.upgrade()
        assert not isinstance(client_transport, int)  # transport_ready saw to it
        # The HTTP reader is done; dropping its parser now frees it by reference
        # counting instead of leaving a cycle for the collector.
        upstream.reader.detach()
        self.plane.sessions.open(
            reservation, record, backend, client_transport, upstream.transport, rest
        )
