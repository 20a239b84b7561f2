"""Types of the admission contract and the one rule that picks a backend."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from wsgate.config import RateConfig

__all__ = [
    "REJECT_STATUS",
    "AdmissionStore",
    "Admitted",
    "Candidate",
    "Limits",
    "Reason",
    "Rejected",
    "Ticket",
    "choose_backend",
]


class Reason(StrEnum):
    """Why a connection was not admitted; each maps to one HTTP status."""

    RATE_LIMITED = "rate_limited"
    CLIENT_RATE_LIMITED = "client_rate_limited"
    CLIENT_CONNECTION_LIMIT = "client_connection_limit"  # max_connections_per_client
    NO_CAPACITY = "no_capacity"
    NO_HEALTHY_BACKEND = "no_healthy_backend"
    STATE_UNAVAILABLE = "state_unavailable"
    BACKEND_UNREACHABLE = "backend_unreachable"
    DRAINING = "draining"
    OVERLOADED = "overloaded"  # the gateway itself is out of descriptors or memory
    NO_ROUTE = "no_route"  # no route matches the request's host and path


REJECT_STATUS: Mapping[Reason, int] = {
    Reason.RATE_LIMITED: 429,
    Reason.CLIENT_RATE_LIMITED: 429,
    Reason.CLIENT_CONNECTION_LIMIT: 429,
    Reason.NO_CAPACITY: 503,
    Reason.NO_HEALTHY_BACKEND: 503,
    Reason.STATE_UNAVAILABLE: 503,
    Reason.BACKEND_UNREACHABLE: 502,
    Reason.DRAINING: 503,
    Reason.OVERLOADED: 503,
    Reason.NO_ROUTE: 404,
}


class Candidate(NamedTuple):
    """A healthy backend the policy would accept, with its cap.

    A named tuple: one is made per healthy backend per admission, and tuples
    are the cheapest immutable records to make.
    """

    backend_id: str
    cap: int


_serials = itertools.count(1)


@dataclass(slots=True, eq=False)
class Ticket:
    """Proof of one reserved slot; released exactly once."""

    backend_id: str
    serial: int = field(default_factory=lambda: next(_serials))
    released: bool = False
    # The client whose connection count this slot adds to (max_connections_per_client
    # was on when it was admitted); None when it counts for no client.
    client_key: str | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    ticket: Ticket

    @property
    def backend_id(self) -> str:
        return self.ticket.backend_id


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: Reason
    retry_after: float  # seconds; 0 when a retry cannot help soon

    @property
    def status(self) -> int:
        return REJECT_STATUS[self.reason]


@dataclass(frozen=True, slots=True)
class Limits:
    """What a store enforces besides the caps carried by the candidates."""

    connect_rate: RateConfig | None = None
    client_connect_rate: RateConfig | None = None
    max_connections_per_client: int | None = None
    no_capacity_retry_after: float = 5.0


def choose_backend(
    candidates: Sequence[Candidate],
    active: Callable[[str], int],
    *,
    least_loaded: bool,
    preferred: str | None = None,
    first: Sequence[str] = (),
    exclude: Collection[str] = (),
) -> str | None:
    """Pick the backend that takes the next connection, or None when all are full.

    Only candidates not in ``exclude`` count. ``preferred`` (affinity) wins
    while it has room, then the first of ``first`` (the policy's own pick,
    in order) with room. Otherwise ``least_loaded`` takes the candidate with
    the lowest share of its cap (ties go to the smallest id, so that every
    store breaks them alike), and first-fit takes the first candidate with
    room. The stores find the same backend without scanning the pool (the
    memory store's ``PoolIndex``, the Redis script's load ranking); this is
    the rule written plainly, which they are tested against.
    """
    caps = {c.backend_id: c.cap for c in candidates if c.backend_id not in exclude}
    for backend in (preferred, *first):
        if backend is not None and backend in caps and active(backend) < caps[backend]:
            return backend
    if not least_loaded:
        for candidate in candidates:
            backend = candidate.backend_id
            if backend in caps and active(backend) < candidate.cap:
                return backend
        return None
    best: tuple[float, str] | None = None
    for backend, cap in caps.items():
        used = active(backend)
        if used < cap and (best is None or (used / cap, backend) < best):
            best = (used / cap, backend)
    return None if best is None else best[1]


class AdmissionStore(Protocol):
    """Where admission decisions are made; one decision is one atomic step."""

    kind: str  # "memory" or "redis"
    #: Told (backend_id, count) when this replica holds ``count`` connections
    #: too many on a backend (a shared store found it over its cap when it
    #: re-registered): the gateway closes that many of its newest there.
    on_excess: Callable[[str, int], None] | None

    @property
    def mode(self) -> str:
        """``ok``, or ``degraded`` while the shared state cannot be reached."""
        ...

    @property
    def errors_total(self) -> int:
        """Calls to the shared state that failed or timed out (0 for one process)."""
        ...

    @property
    def departures_total(self) -> int:
        """Replicas this one saw end, and gave their slots back before their lease did."""
        ...

    async def refresh(self) -> None:
        """Make the global counts as fresh as the store can (one round trip at most)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def configure(self, limits: Limits) -> None:
        """Apply new rate limits (hot reload); caps travel with the candidates."""
        ...

    async def admit(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
        first: Sequence[str] = (),
        exclude: Collection[str] = (),
    ) -> Admitted | Rejected:
        """Decide one connection by :func:`choose_backend`'s rule, then the rates.

        ``candidates`` is the pool: pass the same sequence object while the
        pool does not change. A store works out what changed only when it is
        given another one, so an admission costs the same with 4 backends or
        10,000 (a new sequence costs one pass over it).
        """
        ...

    async def release(self, ticket: Ticket) -> None:
        """Give the slot back; a second release of the same ticket does nothing."""
        ...

    def release_now(self, ticket: Ticket) -> None:
        """Give the slot back without waiting for the store to confirm it."""
        ...

    def global_counts(self) -> Mapping[str, int]:
        """Live connections per backend held by all replicas (last known)."""
        ...

    def local_counts(self) -> Mapping[str, int]:
        """Live connections per backend held by this replica."""
        ...

    def clients_connected(self) -> int:
        """Client addresses with a connection counted against max_connections_per_client,
        through this replica (0 while the cap is off)."""
        ...

    def tokens_available(self) -> float | None:
        """Connect-rate tokens left in the global bucket; None when unlimited."""
        ...

    def live_replicas(self) -> int: ...

    async def acquire_close_tokens(self, per_second: float, want: int) -> int:
        """How many rebalance closes the caller may do now (at most ``want``).

        All replicas draw from one budget of ``per_second`` closes a second
        with a burst of ``ceil(per_second)``, so together they close no faster.
        """
        ...

    async def snapshot(self) -> dict[str, Any]:
        """What the store knows, as JSON-ready data (admin API, ``wsgate state``)."""
        ...
