"""Deadlines that share one delay, behind one timer.

Each connection being set up has a deadline or two (its backend connect's, the
moment to start watching for its client leaving), nearly always cancelled
long before they come. An event-loop timer each costs an allocation, a start
and a cancel per connection. Deadlines set with the same delay come due in the
order they were set, so a queue in that order and one timer, armed for the
oldest, serve them all: setting or cancelling one is a dictionary operation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

__all__ = ["Deadlines"]


class Deadlines:
    """Callbacks run ``delay`` seconds after they were set, unless cancelled first.

    ``delay`` may change (a reload): a deadline keeps the delay it was set
    with, and one set after a shortening may run late, by at most the
    longer delay.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float):
        self.loop = loop
        self.delay = delay
        self._due: dict[Hashable, tuple[float, Callable[[], None]]] = {}  # oldest first
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: Hashable, callback: Callable[[], None]) -> None:
        """Run ``callback`` once ``delay`` has passed, unless ``key`` is cancelled first.

        A key set again is moved to the back, with its new deadline.
        """
        due = self._due
        due.pop(key, None)
        due[key] = (self.loop.time() + self.delay, callback)
        if self._timer is None:
            self._timer = self.loop.call_later(self.delay, self._fire)

    def cancel(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def close(self) -> None:
        """Drop every deadline; none runs."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        due = self._due
        now = self.loop.time()
        # The handle stays set while callbacks run: one that sets a deadline arms
        # nothing, and the timer is armed once below for the oldest left (even
        # if a callback raised).
        try:
            while due:
                key = next(iter(due))
                when, callback = due[key]
                if when > now:
                    break
                del due[key]
                callback()
        finally:
            self._timer = None
            if due:
                when, _ = next(iter(due.values()))
                self._timer = self.loop.call_later(max(0.0, when - now), self._fire)
