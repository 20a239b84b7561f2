"""Live WebSocket sessions: one slot each, their timers, their close.

A :class:`Session` begins when its exchange's backend answers ``101``. It owns
the exchange's committed :class:`~wsgate.gateway.reservation.Reservation` and
releases it once, when it ends. Its bytes are relayed in C
(:mod:`wsgate.gateway._relay`); Python keeps the slot, the timers and the
decision to close. A session with a TLS side cannot go to the C relay (its
bytes are in the clear only inside the SSL transport): a
:class:`~wsgate.gateway.transport_link.TransportLink` relays it on the event
loop, with the same face. :class:`Sessions` holds the live ones and the relay that
carries them, and is all a session is given of the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator

from wsgate.gateway._relay import Link, Relay
from wsgate.gateway.access_log import Record, RequestLog
from wsgate.gateway.dial import answered
from wsgate.gateway.handoff import Handoff, HandOver, Spares, hand_over
from wsgate.gateway.outcomes import CloseReason, Outcome
from wsgate.gateway.reservation import Reservation
from wsgate.gateway.stats import Stats
from wsgate.gateway.transport_link import TransportLink
from wsgate.upstreams.pool import Backend
from wsgate.wire import CloseCode, close_frame, masked_close_frame

__all__ = ["CLOSE_GRACE", "Session", "Sessions"]

log = logging.getLogger("wsgate.session")

# How long a gateway-initiated close waits for a frame boundary, then for the
# peers to finish the closing handshake, before it cuts the connection.
CLOSE_GRACE = 5.0


class Sessions:
    """The live sessions of one gateway and the relay thread that carries their bytes.

    The relay starts with :meth:`start` (on the running loop) and ends with
    :meth:`close`. While :meth:`close_all` is in force (a drain), a session
    that opens is asked to close at once: it was admitted as the drain began.
    """

    def __init__(
        self,
        stats: Stats,
        log: RequestLog,
        spares: Spares,
        *,
        hand_over: HandOver = hand_over,
    ):
        self.stats = stats
        self.log = log
        self.spares = spares  # for hand-overs at the open-files limit
        self.hand_over = hand_over
        self.live: set[Session] = set()
        self.relay: Relay | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closing: tuple[int, CloseReason] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # Established sessions are relayed in C; a session hears from it when it ends.
        self.relay = relay = Relay(
            Session.finish,
            on_backend_closed=Session.backend_closed,
            on_answer=answered,
            linger=CLOSE_GRACE,
        )
        loop.add_reader(relay.fileno(), relay.report)

    def open(
        self,
        reservation: Reservation,
        record: Record,
        backend: Backend,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport,
        rest: bytes,
    ) -> Session:
        """A session of both transports; ``rest`` is what the backend sent after its 101."""
        session = self._begin(reservation, record, backend)
        if _is_tls(client_transport) or _is_tls(backend_transport):
            # The C relay reads and writes plain sockets: TLS is relayed on the loop.
            session.link = TransportLink(
                client_transport,
                backend_transport,
                rest,
                session,
                _end,
                on_backend_closed=_backend_closed,
                linger=CLOSE_GRACE,
            )
        else:
            session.handoff = self.hand_over(
                session, client_transport, backend_transport, rest, self.spares
            )
        return self._opened(session)

    def attach(
        self,
        reservation: Reservation,
        record: Record,
        backend: Backend,
        client: asyncio.Transport | int,
        link: Link,
        head: bytes,
        rest: bytes,
    ) -> Session:
        """A session of a dial the relay made: ``head`` (the 101) and ``rest`` go to the client.

        ``client`` is its transport, or its descriptor if it never became one: that
        is the relay's as it is, with nothing to flush or duplicate first.
        """
        session = self._begin(reservation, record, backend)
        session.dialed = (link, head)
        if isinstance(client, int):
            session.relay(client, None, rest, sole=True)
        else:
            session.handoff = self.hand_over(session, client, None, rest, self.spares)
        return self._opened(session)

    def _begin(self, reservation: Reservation, record: Record, backend: Backend) -> Session:
        """A live session holding the committed slot, before its sockets are placed."""
        reservation.commit()
        session = Session(self, reservation, record, backend)
        backend.connections.add(session)
        self.live.add(session)
        return session

    def _opened(self, session: Session) -> Session:
        if self.closing is not None:  # admitted as a drain began: closed at once
            session.close_gracefully(*self.closing)
        return session

    def close_all(self, code: int, reason: CloseReason) -> None:
        """Close every session gracefully, and from now on each new one too."""
        self.closing = (code, reason)
        for session in list(self.live):
            session.close_gracefully(code, reason)

    def finish_all(self, outcome: str) -> None:
        for session in list(self.live):
            session.finish(outcome)

    def close(self) -> None:
        """Stop the relay (what it still owed slow peers had the stop's time to leave)."""
        if self.relay is not None:
            if self.loop is not None:
                self.loop.remove_reader(self.relay.fileno())
            self.relay.close()
            self.relay = None

    def __len__(self) -> int:
        return len(self.live)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.live)

    def __bool__(self) -> bool:
        return bool(self.live)


class Session:
    """A live WebSocket session: two sockets relayed in C, one slot held.

    It keeps only what the close and the reports need: the HTTP machinery that
    set it up (parsers, heads, the exchange) is left behind for the collector.
    """

    __slots__ = (
        "backend", "close_timer", "closing_code", "closing_reason", "dialed", "done",
        "duration_factor", "handoff", "link", "record", "reservation", "sessions", "started",
    )  # fmt: skip

    def __init__(
        self, sessions: Sessions, reservation: Reservation, record: Record, backend: Backend
    ):
        self.sessions = sessions
        self.reservation = reservation
        self.record = record
        self.backend = backend
        self.started = time.monotonic()
        # max_connection_duration is stretched or shrunk by up to 10% per session, so
        # sessions opened together do not all end together.
        self.duration_factor = random.uniform(0.9, 1.1)
        self.closing_code = 0
        self.closing_reason = ""
        self.close_timer: asyncio.TimerHandle | None = None
        self.done = False
        self.handoff: Handoff | None = None
        self.link: Link | TransportLink | None = None
        # A dial's link and the 101 for the client, until the client's socket joins it.
        self.dialed: tuple[Link, bytes] | None = None

    def relay(
        self, client_fd: int, backend_fd: int | None, rest: bytes, *, sole: bool = False
    ) -> None:
        """The sockets are ours alone now: the relay moves their bytes from here on.

        ``backend_fd`` is None when the relay dialed the backend: its link has it.
        ``sole``: ``client_fd`` is its socket's only descriptor (an arrival's, never
        a transport's duplicate), which the relay can close without more ado.
        """
        self.handoff = None
        relay = self.sessions.relay
        try:
            if backend_fd is None:
                assert self.dialed is not None
                link, head = self.dialed
                self.dialed = None
                link.attach(client_fd, head, rest, self, sole)
                self.link = link
            elif relay is None:
                raise OSError("the relay is not running")
            else:
                self.link = relay.add(client_fd, backend_fd, rest, self)
        except (OSError, ValueError) as error:
            log.warning("relay refused a session: %s", error)
            self.finish(Outcome.RELAY_FAILED)
            return
        if self.closing_code:  # asked for while uvloop was still writing
            self._send_close()

    @property
    def bytes_in(self) -> int:
        link = self.link
        return self.record.bytes_in + (link.bytes_in if link is not None else 0)

    @property
    def bytes_out(self) -> int:
        link = self.link
        return self.record.bytes_out + (link.bytes_out if link is not None else 0)

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
        self.sessions.stats.closed_by_gateway[reason] += 1
        if self.link is not None:
            self._send_close()
        loop = self.sessions.loop
        assert loop is not None
        self.close_timer = loop.call_later(CLOSE_GRACE, self.finish, f"closed_{reason}")
        return True

    def _send_close(self) -> None:
        # The relay writes the client's close frame between two frames (unless the
        # backend's own close is already passing), then tells the backend we are
        # going away as a client would, and relays nothing more either way.
        assert self.link is not None
        self.link.close_gracefully(
            close_frame(self.closing_code, self.closing_reason),
            masked_close_frame(CloseCode.GOING_AWAY, "gateway closing"),
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
        if self.dialed is not None:
            self.dialed[0].abort()  # the backend's socket is closed now
            self.dialed = None
        record = self.record
        link = self.link
        if link is not None:
            link.finish()  # what is still waiting for a peer is flushed, then closed
            record.bytes_in += link.bytes_in
            record.bytes_out += link.bytes_out
            self.link = None  # the link refers to us until its backend socket is closed
        else:
            self.reservation.release()  # never relayed: the transports' sockets are closed
        sessions = self.sessions
        self.backend.connections.discard(self)
        sessions.live.discard(self)
        sessions.log.finished(
            record, f"closed_{self.closing_reason}" if self.closing_code else outcome
        )

    def backend_closed(self) -> None:
        """The relay closed the socket toward the backend: its slot is free now."""
        self.reservation.release()


def _is_tls(transport: asyncio.Transport) -> bool:
    return transport.get_extra_info("sslcontext") is not None


def _end(session: object, outcome: str) -> None:
    assert isinstance(session, Session)
    session.finish(outcome)


def _backend_closed(session: object) -> None:
    assert isinstance(session, Session)
    session.backend_closed()
