"""The one place an admitted slot is given back.

The store hands out a :class:`~wsgate.admission.Ticket` per admitted
connection. A :class:`Reservation` wraps it for the data plane: used as a
context manager by the exchange, it releases the slot when the block ends,
however it ends (rejected by the backend, a failed connect, the client
leaving, an error, the end of an HTTP response), unless it was *committed*. A committed
reservation belongs to an owner that releases it once, when the gateway's
socket toward the backend is closed: a session (the relay says when), or an
upstream connection cut short mid-request.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from wsgate.admission import Ticket

__all__ = ["Reservation"]


class Reservation:
    """One admitted slot: released exactly once, by itself unless committed."""

    __slots__ = ("_give_back", "committed", "released", "ticket")

    def __init__(self, ticket: Ticket, give_back: Callable[[Ticket], None]):
        self.ticket = ticket
        self._give_back = give_back
        self.committed = False
        self.released = False

    @property
    def backend_id(self) -> str:
        return self.ticket.backend_id

    def commit(self) -> None:
        """Hand the slot to an owner (a session, a closing upstream), which releases it."""
        self.committed = True

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        if not self.released:
            self.released = True
            self._give_back(self.ticket)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self.committed:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "committed" if self.committed else "held"
        return f"<Reservation {self.backend_id} {state}>"
