"""The backend's side of an exchange: one connection, its response read as events.

An :class:`Upstream` knows nothing of clients. It reads the backend's bytes
with :class:`~wsgate.gateway.http1.ResponseReader` and reports what they
mean to the exchange it serves, through the small :class:`ResponseSink`
interface: a head, body bytes, an upgrade, or how the response ended. It
serves one exchange at a time; between two, a pooled connection waits idle
in the :class:`~wsgate.gateway.connector.Connector`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from wsgate.gateway.flow import Endpoint
from wsgate.gateway.head import ResponseHead
from wsgate.gateway.http1 import BadMessage, Body, End, Head, ResponseReader, Upgrade
from wsgate.gateway.outcomes import Ending
from wsgate.gateway.reservation import Reservation
from wsgate.upstreams.pool import Backend

__all__ = ["ResponseSink", "Upstream"]

log = logging.getLogger("wsgate.upstream")


class ResponseSink(Protocol):
    """What an upstream reports to its exchange, in the order it learns it."""

    def response_head(self, head: ResponseHead) -> None:
        """A response head; a ``101`` to an upgrade is followed by :meth:`upgraded`."""

    def response_body(self, data: bytes) -> None: ...

    def upgraded(self, head: ResponseHead, rest: bytes) -> None:
        """The backend switched protocols; ``rest`` is what it sent after its ``101``."""

    def ended(self, ending: Ending) -> None:
        """The response is over (or never came); the upstream serves no one now."""


class Upstream(Endpoint):
    """One connection to a backend: HTTP exchanges one after another, or one upgrade."""

    def __init__(self, backend: Backend, forget: Callable[[Upstream], None]):
        super().__init__()
        self.backend = backend
        self._forget = forget  # the connector's: an idle connection that closes leaves its pool
        self.reader = ResponseReader()
        self.sink: ResponseSink | None = None
        self.idle_since = 0.0
        self.lost = False  # the socket is closed (connection_lost has come)
        self._release_on_lost: Reservation | None = None
        self._upgrading = False
        self._status = 0  # of the response in progress
        self._upgrade_head: ResponseHead | None = None

    def begin(self, sink: ResponseSink, *, head_request: bool, upgrade: bool) -> None:
        """Serve ``sink``'s exchange: its request is about to be written."""
        self.sink = sink
        self._upgrading = upgrade
        self._status = 0
        self._upgrade_head = None
        if head_request:
            self.reader.expect_no_body()

    def _end(self, ending: Ending) -> None:
        sink = self.sink
        if sink is not None:
            self.sink = None
            sink.ended(ending)

    # -- asyncio.Protocol --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:
            # Bytes from an idle pooled connection: it is no longer trustworthy.
            self.abandon()
            return
        try:
            events = self.reader.feed(data)
        except BadMessage as error:
            log.warning("backend %s: %s", self.backend.id, error.detail)
            self.abandon()
            self._end(Ending.BAD_RESPONSE)
            return
        for event in events:
            if isinstance(event, Head):
                head = event.head
                assert isinstance(head, ResponseHead)
                self._status = head.status
                if head.status == 101 and self._upgrading:
                    self._upgrade_head = head  # the Upgrade event follows
                sink.response_head(head)
            elif isinstance(event, Body):
                sink.response_body(event.data)
            elif isinstance(event, End):
                if self._status == 101:
                    continue
                self._end(Ending.COMPLETE)
            elif isinstance(event, Upgrade):
                self.sink = None
                if self._upgrade_head is None:
                    self.abandon()
                    sink.ended(Ending.BAD_RESPONSE)
                    return
                sink.upgraded(self._upgrade_head, event.rest)
                return

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.lost = True  # uvloop closes the socket as this returns
        self._forget(self)
        reservation = self._release_on_lost
        if reservation is not None:
            self._release_on_lost = None
            reservation.release()
        if self.sink is None:
            return
        for event in self.reader.feed_eof():
            if isinstance(event, End):
                self._end(Ending.COMPLETE_AT_EOF)
                return
        self._end(Ending.BACKEND_CLOSED if self._status else Ending.BACKEND_FAILED)

    # -- used by the exchange and the connector ----------------------------------------
    def release_when_closed(self, reservation: Reservation) -> None:
        """Take ``reservation`` over: released once this connection is closed (at once if it is).

        Until then the backend still counts the request it was sent.
        """
        reservation.commit()
        if self.lost or self.transport is None:
            reservation.release()
        else:
            self._release_on_lost = reservation

    def abandon(self) -> None:
        """Close without reuse (the exchange was cut short)."""
        super().abandon()
        self._forget(self)
