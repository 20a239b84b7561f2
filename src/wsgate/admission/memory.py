"""The embedded store: admission state in this process only.

Every decision runs without an ``await`` between reading and writing, so on one
event loop it is atomic by construction. This is the default when no Redis is
configured, and the reference the Redis store is tested against.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from wsgate.admission.contract import (
    Admitted,
    Candidate,
    Limits,
    Reason,
    Rejected,
    Ticket,
    choose_backend,
)
from wsgate.admission.rate import gcra, tokens_left

__all__ = ["MemoryStore", "take_tokens"]

# Per-client buckets idle this long are forgotten: they are full again anyway.
_CLIENT_BUCKET_SWEEP = 60.0


class MemoryStore:
    kind = "memory"

    def __init__(self, limits: Limits | None = None, clock: Callable[[], float] = time.monotonic):
        self._limits = limits or Limits()
        self._clock = clock
        self._active: Counter[str] = Counter()
        self._rate_tat: float | None = None
        self._client_tat: dict[str, float] = {}
        self._next_sweep = 0.0
        self._close_tat: float | None = None

    @property
    def mode(self) -> str:
        return "ok"

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
    ) -> Admitted | Rejected:
        return self.admit_now(
            candidates, client_key=client_key, least_loaded=least_loaded, preferred=preferred
        )

    def admit_now(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
    ) -> Admitted | Rejected:
        """The decision itself, synchronous: usable from code that cannot await."""
        limits = self._limits
        if not candidates:
            return Rejected(Reason.NO_HEALTHY_BACKEND, limits.no_capacity_retry_after)
        backend = choose_backend(
            candidates, self._active.__getitem__, least_loaded=least_loaded, preferred=preferred
        )
        if backend is None:
            return Rejected(Reason.NO_CAPACITY, limits.no_capacity_retry_after)
        now = self._clock()
        if limits.connect_rate is not None:
            rate = gcra(self._rate_tat, now, limits.connect_rate)
            if not rate.allowed:
                return Rejected(Reason.RATE_LIMITED, rate.retry_after)
        if limits.client_connect_rate is not None and client_key is not None:
            client = gcra(self._client_tat.get(client_key), now, limits.client_connect_rate)
            if not client.allowed:
                return Rejected(Reason.CLIENT_RATE_LIMITED, client.retry_after)
            self._client_tat[client_key] = client.tat
            self._sweep_clients(now)
        if limits.connect_rate is not None:
            self._rate_tat = rate.tat
        self._active[backend] += 1
        return Admitted(Ticket(backend))

    async def release(self, ticket: Ticket) -> None:
        self.release_now(ticket)

    def release_now(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self._active[ticket.backend_id] -= 1
        if self._active[ticket.backend_id] <= 0:
            del self._active[ticket.backend_id]

    def _sweep_clients(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _CLIENT_BUCKET_SWEEP
        self._client_tat = {key: tat for key, tat in self._client_tat.items() if tat > now}

    def global_counts(self) -> Mapping[str, int]:
        # A read-only view, not a copy: policies read it on every admission.
        return MappingProxyType(self._active)

    def local_counts(self) -> Mapping[str, int]:
        return MappingProxyType(self._active)

    def tokens_available(self) -> float | None:
        rate = self._limits.connect_rate
        return None if rate is None else tokens_left(self._rate_tat, self._clock(), rate)

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
