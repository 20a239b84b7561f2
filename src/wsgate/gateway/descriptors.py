"""Descriptors kept in reserve for hand-overs at the open-files limit.

A session handed to the relay holds two descriptors more until uvloop closes
its own on the next loop iteration. At the limit that would fail a session
already answered ``101``; a spare makes room instead, and is taken back once
uvloop's descriptors are closed (:meth:`SpareDescriptors.refill_soon`).
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["SPARE_DESCRIPTORS", "SpareDescriptors"]

# Each session handed to the relay in one loop iteration may need two of them.
SPARE_DESCRIPTORS = 16


class SpareDescriptors:
    def __init__(self, count: int = SPARE_DESCRIPTORS):
        self.count = count
        self._fds: list[int] = []

    def __len__(self) -> int:
        return len(self._fds)

    def take(self) -> bool:
        """Close one spare so a descriptor can be opened; False when none is left."""
        if not self._fds:
            return False
        os.close(self._fds.pop())
        return True

    def refill_soon(self) -> None:
        """After a hand-over has aborted its transports: take back the spares it used.

        ``abort()`` closes a transport's socket in a callback it schedules with
        ``call_soon``, so one scheduled after it runs once the socket is closed.
        (A timer would not do: when the loop is slow, a timer due in 1 ms fires
        before the ready callbacks, the descriptors are still open, the spares are
        not taken back, and the hand-overs that follow find none.)
        """
        if len(self._fds) < self.count:
            asyncio.get_running_loop().call_soon(self.refill)

    def refill(self) -> None:
        while len(self._fds) < self.count:
            try:
                self._fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # at the limit still: tried again at the next housekeeping round

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())
