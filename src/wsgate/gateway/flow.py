"""Flow control between the two connections of one exchange.

Each connection of the data plane is an :class:`Endpoint`. Its transport has
write-buffer limits: when what waits to be written passes :data:`HIGH_WATER`,
uvloop calls ``pause_writing`` and the endpoint stops reading its *peer* (the
connection whose bytes fill that buffer), until ``resume_writing`` at
:data:`LOW_WATER`. An exchange links the client's and the backend's endpoints
as peers while it forwards, and unlinks them when it ends.
"""

from __future__ import annotations

import asyncio
from typing import cast

__all__ = ["HIGH_WATER", "LOW_WATER", "Endpoint"]

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class Endpoint(asyncio.Protocol):
    """One connection of the data plane: its transport, its reading switch, its peer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None  # whose reading our write buffer holds back
        self.reading_paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()

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

    def abandon(self) -> None:
        """Close at once, dropping what waits to be written (nothing more will come)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
