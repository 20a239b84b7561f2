"""The hand-over of a new session's two sockets to the relay.

After ``101`` the session's bytes never pass through Python again: the relay
(:mod:`wsgate.gateway._relay`) gets a duplicate of each socket's descriptor,
and the transports let theirs go. Usually nothing waits in uvloop's write
buffers and :func:`hand_over` does it at once; otherwise a :class:`Handoff`
holds the transports until uvloop has written what it holds for them. When
the relay dialed the backend, the client's socket is the only transport.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from typing import Protocol

from wsgate.gateway.outcomes import Outcome

__all__ = ["HandOver", "Handoff", "Receiver", "Spares", "hand_over"]


class Receiver(Protocol):
    """Who takes the sockets: a session, told the descriptors or why there are none."""

    def relay(self, client_fd: int, backend_fd: int | None, rest: bytes) -> None:
        """The descriptors; ``backend_fd`` None: the relay has the backend's socket."""
        ...

    def finish(self, outcome: str) -> None: ...


class Spares(Protocol):
    """Descriptors kept for hand-overs at the open-files limit (:mod:`.descriptors`)."""

    def take(self) -> bool:
        """Free one so a descriptor can be opened; False when none is left."""
        ...

    def refill_soon(self) -> None:
        """Take back those used, once the aborted transports' sockets are closed."""
        ...


class Handoff(asyncio.Protocol):
    """A new session's two transports, until uvloop has written what it holds for them.

    A write-buffer limit of zero makes uvloop call ``resume_writing`` when the
    last byte has left; the sockets then go to the receiver.
    """

    __slots__ = ("backend_transport", "client_transport", "receiver", "rest", "spares")

    def __init__(
        self,
        receiver: Receiver,
        client_transport: asyncio.Transport,
        backend_transport: asyncio.Transport | None,
        rest: bytes,
        spares: Spares,
    ):
        self.receiver: Receiver | None = receiver
        self.client_transport = client_transport
        self.backend_transport = backend_transport
        self.rest = rest
        self.spares = spares
        for transport in _both(client_transport, backend_transport):
            transport.set_protocol(self)
            transport.pause_reading()  # the relay reads from here on
            transport.set_write_buffer_limits(0, 0)

    def hand_over_when_written(self) -> None:
        receiver = self.receiver
        if receiver is None or _unwritten(self.client_transport, self.backend_transport):
            return
        self.receiver = None
        _hand_over(receiver, self.client_transport, self.backend_transport, self.rest, self.spares)

    def abort(self) -> None:
        """Give both transports up (the session ended before the hand-over); once."""
        if self.receiver is not None:
            self.receiver = None
            _abort(self.client_transport, self.backend_transport)

    def resume_writing(self) -> None:
        self.hand_over_when_written()

    def connection_lost(self, exc: Exception | None) -> None:
        receiver = self.receiver
        if receiver is not None:
            self.abort()
            receiver.finish(Outcome.HANDOFF_FAILED)


# How a new session's sockets reach the relay: hand_over, or a test's stand-in.
HandOver = Callable[
    [Receiver, asyncio.Transport, "asyncio.Transport | None", bytes, Spares], "Handoff | None"
]


def _both(
    client_transport: asyncio.Transport, backend_transport: asyncio.Transport | None
) -> tuple[asyncio.Transport, ...]:
    if backend_transport is None:
        return (client_transport,)
    return (client_transport, backend_transport)


def _unwritten(
    client_transport: asyncio.Transport, backend_transport: asyncio.Transport | None
) -> bool:
    return any(t.get_write_buffer_size() for t in _both(client_transport, backend_transport))


def hand_over(
    receiver: Receiver,
    client_transport: asyncio.Transport,
    backend_transport: asyncio.Transport | None,
    rest: bytes,
    spares: Spares,
) -> Handoff | None:
    """Give ``receiver`` the sockets now, or a :class:`Handoff` that will once written.

    ``backend_transport`` is None when the relay dialed the backend. ``spares``
    free a descriptor kept for this moment when duplicating one hits the
    open-files limit (see :class:`~wsgate.gateway.descriptors.SpareDescriptors`).
    """
    if _unwritten(client_transport, backend_transport):
        return Handoff(receiver, client_transport, backend_transport, rest, spares)
    _hand_over(receiver, client_transport, backend_transport, rest, spares)
    return None


def _hand_over(
    receiver: Receiver,
    client_transport: asyncio.Transport,
    backend_transport: asyncio.Transport | None,
    rest: bytes,
    spares: Spares,
) -> None:
    """Give the receiver a descriptor of each socket, then let the transports go.

    Aborting a transport closes only its own descriptor (libuv takes it out of
    its epoll set first): the sockets stay open through the duplicates. uvloop
    closes its descriptors one loop iteration later, so for that moment the
    session holds two more; the spares used for them come back after that.
    """
    try:
        client_fd = _duplicate(client_transport, spares)
    except OSError:
        _abort(client_transport, backend_transport)
        spares.refill_soon()
        receiver.finish(Outcome.CLIENT_ERROR)
        return
    backend_fd = None
    if backend_transport is not None:
        try:
            backend_fd = _duplicate(backend_transport, spares)
        except OSError:
            os.close(client_fd)
            _abort(client_transport, backend_transport)
            spares.refill_soon()
            receiver.finish(Outcome.BACKEND_ERROR)
            return
    _abort(client_transport, backend_transport)
    spares.refill_soon()
    receiver.relay(client_fd, backend_fd, rest)


def _duplicate(transport: asyncio.Transport, spares: Spares) -> int:
    fd = transport.get_extra_info("socket").fileno()
    try:
        return os.dup(fd)
    except OSError as error:
        if error.errno != errno.EMFILE or not spares.take():
            raise
        return os.dup(fd)


class _Gone(asyncio.Protocol):
    """The protocol of a transport given up: its connection_lost concerns no one."""


_GONE = _Gone()


def _abort(
    client_transport: asyncio.Transport, backend_transport: asyncio.Transport | None
) -> None:
    for transport in _both(client_transport, backend_transport):
        transport.set_protocol(_GONE)
        transport.abort()
