"""The admission decision one process makes alone, without I/O.

It is the memory store's whole decision, and the Redis store's while Redis is
away (``on_failure: local``): there each replica takes its *share* of
everything shared, ``cap // live`` of each cap and ``1/live`` of the connect
rate (``burst // live`` tokens), measured on its own held counts, so the
replicas together stay within the limits as long as ``live`` is not an
undercount. With ``live == 1`` the share is the whole. The per-client rate
and the per-client cap apply in full: a client's connections through this
process are all it sees.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from wsgate.admission.contract import Candidate, Limits, Reason, Rejected, choose_backend
from wsgate.admission.rate import gcra, tokens_left
from wsgate.config import RateConfig

__all__ = ["LocalDecision", "share_choice"]

# Per-client buckets idle this long are forgotten: they are full again anyway.
_CLIENT_BUCKET_SWEEP = 60.0


def _rate_share(rate: RateConfig, live: int) -> RateConfig | None:
    if live == 1:
        return rate
    burst = rate.burst // live
    if burst < 1:
        return None
    return RateConfig(per_second=rate.per_second / live, burst=burst)


def share_choice(
    candidates: Sequence[Candidate],
    held: Mapping[str, int],
    live: int,
    *,
    least_loaded: bool,
    preferred: str | None,
    first: Sequence[str],
    exclude: Collection[str],
) -> str | None:
    """The backend with room in this replica's share of every cap (one pass)."""
    if live > 1:
        candidates = [Candidate(c.backend_id, c.cap // live) for c in candidates]
    return choose_backend(
        candidates,
        lambda b: held.get(b, 0),
        least_loaded=least_loaded,
        preferred=preferred,
        first=first,
        exclude=exclude,
    )


class LocalDecision:
    """Capacity first (the caller's choice of backend, then the client's cap),
    then the global rate, then the client's; tokens are spent only by an
    admission. The caller counts the admitted backend (and the client, under a
    per-client cap) as held."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._rate_tat: float | None = None
        self._client_tat: dict[str, float] = {}
        self._next_sweep = 0.0

    def admit(
        self,
        backend: str | None,
        limits: Limits,
        *,
        live: int = 1,
        client_key: str | None = None,
        clients: Mapping[str, int] | None = None,
    ) -> str | Rejected:
        """``backend`` (the choice by capacity; None when all are full) once the
        client's cap and the rates allow it, or why not. ``clients``:
        connections held per client."""
        if backend is None:
            return Rejected(Reason.NO_CAPACITY, limits.no_capacity_retry_after)
        per_client = limits.max_connections_per_client
        if (
            per_client is not None
            and client_key is not None
            and clients is not None
            and clients.get(client_key, 0) >= per_client
        ):
            return Rejected(Reason.CLIENT_CONNECTION_LIMIT, limits.no_capacity_retry_after)
        now = self._clock()
        rate_tat: float | None = None
        if limits.connect_rate is not None:
            share = _rate_share(limits.connect_rate, max(1, live))
            if share is None:
                return Rejected(Reason.RATE_LIMITED, limits.no_capacity_retry_after)
            rate = gcra(self._rate_tat, now, share)
            if not rate.allowed:
                return Rejected(Reason.RATE_LIMITED, rate.retry_after)
            rate_tat = rate.tat
        if limits.client_connect_rate is not None and client_key is not None:
            client = gcra(self._client_tat.get(client_key), now, limits.client_connect_rate)
            if not client.allowed:
                return Rejected(Reason.CLIENT_RATE_LIMITED, client.retry_after)
            self._client_tat[client_key] = client.tat
            self._sweep_clients(now)
        if rate_tat is not None:
            self._rate_tat = rate_tat
        return backend

    def tokens_available(self, limits: Limits) -> float | None:
        """Connect-rate tokens left (the whole rate's bucket); None when unlimited."""
        rate = limits.connect_rate
        return None if rate is None else tokens_left(self._rate_tat, self._clock(), rate)

    def _sweep_clients(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + _CLIENT_BUCKET_SWEEP
        self._client_tat = {key: tat for key, tat in self._client_tat.items() if tat > now}
