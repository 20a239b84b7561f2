"""The embedded store: admission state in this process only.

Every decision runs without an ``await`` between reading and writing, so on one
event loop it is atomic by construction. This is the default when no Redis is
configured, and the reference the Redis store is tested against.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from wsgate.admission.contract import Admitted, Candidate, Limits, Reason, Rejected, Ticket
from wsgate.admission.local import LocalDecision
from wsgate.admission.pool_index import PoolIndex

__all__ = ["MemoryStore", "take_tokens"]


class MemoryStore:
    kind = "memory"

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic):
        self._limits = limits or Limits()
        self._clock = clock
        self._active: Counter[str] = Counter()
        # Connections per client address under max_connections_per_client; a client
        # whose last one ends is deleted, so the map holds connected clients only.
        self._clients: Counter[str] = Counter()
        self._decision = LocalDecision(clock)
        self._index = PoolIndex(self._active)
        self._close_tat: float | None = None
        self.on_excess: Callable[[str, int], None] | None = None  # never over: nothing to shed

    @property
    def mode(self) -> str:
        return "ok"

    @property
    def errors_total(self) -> int:
        return 0

    @property
    def departures_total(self) -> int:
        return 0  # no other replica shares this store

    async def refresh(self) -> None:
        return None  # the counts are this process's own: always fresh

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def configure(self, limits: Limits) -> None:
        self._limits = limits

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
        return self.admit_now(
            candidates,
            client_key=client_key,
            least_loaded=least_loaded,
            preferred=preferred,
            first=first,
            exclude=exclude,
        )

    def admit_now(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
        first: Sequence[str] = (),
        exclude: Collection[str] = (),
    ) -> Admitted | Rejected:
        """The decision itself, synchronous: usable from code that cannot await."""
        limits = self._limits
        if not candidates:
            return Rejected(Reason.NO_HEALTHY_BACKEND, limits.no_capacity_retry_after)
        index = self._index
        index.offer(candidates)
        choice = index.choose(
            least_loaded=least_loaded, preferred=preferred, first=first, exclude=exclude
        )
        decision = self._decision.admit(
            choice, limits, client_key=client_key, clients=self._clients
        )
        if isinstance(decision, Rejected):
            return decision
        self._active[decision] += 1
        index.changed(decision)
        counted = client_key if limits.max_connections_per_client is not None else None
        if counted is not None:
            self._clients[counted] += 1
        return Admitted(Ticket(decision, client_key=counted))

    async def release(self, ticket: Ticket) -> None:
        self.release_now(ticket)

    def release_now(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        backend = ticket.backend_id
        self._active[backend] -= 1
        if self._active[backend] <= 0:
            del self._active[backend]
        self._index.changed(backend)
        client = ticket.client_key
        if client is not None:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]

    def global_counts(self) -> Mapping[str, int]:
        # A read-only view, not a copy: policies read it on every admission.
        return MappingProxyType(self._active)

    def local_counts(self) -> Mapping[str, int]:
        return MappingProxyType(self._active)

    def clients_connected(self) -> int:
        return len(self._clients)

    def tokens_available(self) -> float | None:
        return self._decision.tokens_available(self._limits)

    def live_replicas(self) -> int:
        return 1

    async def acquire_close_tokens(self, per_second: float, want: int) -> int:
        if want <= 0 or per_second <= 0:
            return 0
        granted, self._close_tat = take_tokens(
            self._close_tat, self._clock(), per_second, max(1, math.ceil(per_second)), want
        )
        return granted

    async def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "live_replicas": 1,
            "global": dict(self.global_counts()),
            "local": dict(self.local_counts()),
            "tokens": self.tokens_available(),
            "clients_connected": self.clients_connected(),
        }


def take_tokens(
    tat: float | None, now: float, per_second: float, burst: int, want: int
) -> tuple[int, float | None]:
    """Take up to ``want`` whole tokens from a GCRA bucket; returns (taken, new TAT).

    The Redis script's ``close_tokens`` does the same arithmetic.
    """
    interval = 1.0 / per_second
    base = max(tat if tat is not None else now, now)
    available = math.floor((burst * interval - (base - now)) / interval + 1e-9)
    taken = max(0, min(want, available))
    return taken, (base + taken * interval if taken else tat)
