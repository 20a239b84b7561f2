"""GCRA, the token bucket written as one timestamp per key.

The state is the *theoretical arrival time* (TAT): the instant at which the
bucket would be full again. With an emission interval ``T = 1/per_second`` and a
capacity of ``burst`` tokens, a request at ``now`` is allowed when
``max(TAT, now) + T - burst*T <= now``; spending it moves TAT forward by ``T``.
The Redis script does the same arithmetic on the server's clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from wsgate.config import RateConfig

__all__ = ["RateDecision", "gcra", "tokens_left"]


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    tat: float  # the TAT to store if the request is spent
    retry_after: float  # seconds until a token is there (0 when allowed)


def gcra(tat: float | None, now: float, rate: RateConfig) -> RateDecision:
    """Decide one request against a bucket; the caller stores ``tat`` only when it spends."""
    interval = 1.0 / rate.per_second
    new_tat = max(tat if tat is not None else now, now) + interval
    allow_at = new_tat - rate.burst * interval
    if allow_at > now + 1e-9:
        return RateDecision(False, tat if tat is not None else now, allow_at - now)
    return RateDecision(True, new_tat, 0.0)


def tokens_left(tat: float | None, now: float, rate: RateConfig) -> float:
    """Whole and partial tokens in the bucket at ``now``."""
    if tat is None:
        return float(rate.burst)
    interval = 1.0 / rate.per_second
    return max(0.0, min(float(rate.burst), rate.burst - (max(tat, now) - now) / interval))
