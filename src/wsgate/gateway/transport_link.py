"""A session relayed between two transports in Python: for what the C relay cannot take.

The C relay (:mod:`wsgate.gateway._relay`) moves the bytes of plain sockets.
A TLS session's bytes exist in the clear only inside its SSL transport (there
is no kernel TLS here), so such a session stays on the event loop: a
:class:`TransportLink` gives each transport a small protocol that writes what
it reads to the other one. It has the face of the C relay's ``Link``
(``close_gracefully``, ``finish``, the byte counters, ``outcome``), so the
session that owns it does not care which one it has:

- Flow control: when one side's write buffer passes its high-water mark, its
  ``pause_writing`` stops reading the other side until ``resume_writing``.
- Frame boundaries: the backend's stream feeds a :class:`FrameTracker`, so a
  close frame asked for is written between two frames, never inside one.
- The end: the first end of stream or error on either side ends the session and
  calls ``on_end(owner, outcome)`` once. :meth:`finish` stops reading, lets each
  transport flush what it holds, and aborts what is left after ``linger`` seconds.
- The backend's socket: once its transport is closed, ``on_backend_closed(owner)``
  is called, as the C relay does; the session frees its slot then.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from wsgate.gateway.flow import HIGH_WATER, LOW_WATER
from wsgate.gateway.frames import FrameTracker

__all__ = ["TransportLink"]


class _Side(asyncio.Protocol):
    __slots__ = ("client", "link")

    def __init__(self, link: TransportLink, client: bool):
        self.link = link
        self.client = client

    def data_received(self, data: bytes) -> None:
        if self.client:
            self.link.from_client(data)
        else:
            self.link.from_backend(data)

    def eof_received(self) -> bool | None:
        self.link.ended("client_closed" if self.client else "backend_closed")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.lost(self.client, exc)

    def pause_writing(self) -> None:
        self.link.peer_of(self.client).pause_reading()

    def resume_writing(self) -> None:
        if not self.link.ending:
            self.link.peer_of(self.client).resume_reading()


class TransportLink:
    """One session's two transports, relayed on the event loop."""

    __slots__ = (
        "_backend", "_backend_owner", "_client", "_close", "_injected", "_linger",
        "_linger_timer", "_on_backend_closed", "_on_end", "_open", "_owner", "_tracker",
        "bytes_in", "bytes_out", "ending", "outcome",
    )  # fmt: skip

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        rest: bytes,
        owner: object,
        on_end: Callable[[object, str], object],
        *,
        on_backend_closed: Callable[[object], object] | None = None,
        linger: float = 5.0,
    ):
        self._client = client
        self._backend = backend
        self._owner: object | None = owner
        self._on_end = on_end
        self._backend_owner: object | None = owner
        self._on_backend_closed = on_backend_closed
        self._linger = linger
        self._linger_timer: asyncio.TimerHandle | None = None
        self._tracker = FrameTracker()
        self._close: tuple[bytes, bytes] | None = None
        self._injected = False
        self._open = 2
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
        self.outcome: str | None = None
        self.ending = False
        for transport, is_client in ((client, True), (backend, False)):
            transport.set_protocol(_Side(self, is_client))
            transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if rest:
            self.from_backend(rest)
        for transport in (client, backend):
            if not transport.is_closing():
                transport.resume_reading()

    def peer_of(self, client: bool) -> asyncio.Transport:
        return self._backend if client else self._client

    @property
    def lingering(self) -> bool:
        return self.ending and self._open > 0

    # -- bytes --------------------------------------------------------------------------------
    def from_client(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if not self._injected and not self.ending:
            self._backend.write(data)

    def from_backend(self, data: bytes) -> None:
        self.bytes_out += len(data)
        boundary = self._tracker.feed(data)
        if self.ending or self._injected:
            return  # after our close frame, nothing more reaches the client
        if self._close is None or boundary < 0 or self._tracker.close_seen:
            # No close asked for, still inside a frame, or the backend's own close passing.
            self._client.write(data)
            return
        self._client.write(data[:boundary])
        self._inject()

    def close_gracefully(self, client_close: bytes, backend_close: bytes) -> bool:
        """Write ``client_close`` at the next frame boundary, ``backend_close`` to the backend.

        False when the session is already closing or ended.
        """
        if self.ending or self._close is not None:
            return False
        self._close = (client_close, backend_close)
        if not self._tracker.close_seen and self._tracker.at_boundary:
            self._inject()
        return True

    def _inject(self) -> None:
        assert self._close is not None
        self._injected = True
        client_close, backend_close = self._close
        self._client.write(client_close)
        self._backend.write(backend_close)

    # -- the end ------------------------------------------------------------------------------
    def ended(self, outcome: str) -> None:
        """A side closed or failed: the session ends (reported once)."""
        if self.outcome is not None or self.ending:
            return
        self.outcome = outcome
        owner, self._owner = self._owner, None
        if owner is not None:
            self._on_end(owner, outcome)

    def lost(self, client: bool, exc: Exception | None) -> None:
        self._open -= 1
        if not client:
            owner, self._backend_owner = self._backend_owner, None
            if owner is not None and self._on_backend_closed is not None:
                # Called as the transport closes its socket (uvloop closes it on return).
                self._on_backend_closed(owner)
        if self._open == 0 and self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if exc is None:
            self.ended("client_closed" if client else "backend_closed")
        else:
            self.ended("client_error" if client else "backend_error")

    def finish(self) -> None:
        """End the session now (no on_end call); what is waiting is still flushed."""
        if self.ending:
            return
        self.ending = True
        self._owner = None
        for transport in (self._client, self._backend):
            if not transport.is_closing():
                transport.pause_reading()
                transport.close()  # flushes its buffer first
        if self._open:
            loop = asyncio.get_running_loop()
            self._linger_timer = loop.call_later(self._linger, self._cut)

    def _cut(self) -> None:
        self._linger_timer = None
        for transport in (self._client, self._backend):
            transport.abort()
