"""How many long-lived connections to move, and which ones, without sockets.

Connections stay on the backend they landed on, so new or recovered backends sit
idle while the old ones stay full. The gateway moves connections by closing
them (close code 1012 by default); clients reconnect and the normal policy puts
them on the least loaded backend. This module decides how many to close:

- *Load* is connections when every cap is the same, else the share of the cap.
  The *spread* is the most loaded minus the least loaded available backend.
- :func:`plan_moves` simulates, one connection at a time, a close on the most
  loaded backend and its reconnect on the least loaded one with room, until the
  spread is within ``max_skew`` or a move would no longer narrow it (so the plan
  never churns). Connections closed a moment ago and not back yet (``arriving``)
  are placed first, as least-connections placement will place them.
- Every replica plans from the same global counts but may close only its own
  connections. :func:`local_share` gives it its part of the plan, in proportion
  to what it holds on each backend, rounded down: replicas acting on the same
  counts at the same moment never close more than the plan between them. The
  remainder that rounding leaves (a plan of 1 split between two replicas) goes
  to a replica chosen by the caller's coin (``tail``), asked at jittered times,
  so that the last few moves also get done.
- :class:`ArrivalEstimate` guesses ``arriving`` from the highest total seen in
  the last few seconds: a client that really left counts as arriving for that
  long, which only makes the plan more cautious meanwhile.

The rate of closes is not decided here: every close spends a token of the
budget all replicas share (``AdmissionStore.acquire_close_tokens``).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping

__all__ = ["ArrivalEstimate", "local_share", "plan_moves", "spread"]

_EPSILON = 1e-9


def _by_share(caps: Mapping[str, int]) -> bool:
    return len(set(caps.values())) > 1


def _load(count: int, cap: int, by_share: bool) -> float:
    # Always computed from the integers, never accumulated: one division rounds
    # equal shares (9/18 and 1/2) to the same float, so ties stay ties.
    return count / cap if by_share else float(count)


def spread(counts: Mapping[str, int], caps: Mapping[str, int]) -> float:
    """Most loaded minus least loaded backend among ``caps`` (connections, or share of cap)."""
    if not caps:
        return 0.0
    by_share = _by_share(caps)
    loads = [_load(counts.get(b, 0), cap, by_share) for b, cap in caps.items()]
    return max(loads) - min(loads)


def plan_moves(
    counts: Mapping[str, int],
    caps: Mapping[str, int],
    max_skew: float,
    *,
    arriving: int = 0,
) -> dict[str, int]:
    """Closes per backend (all replicas together) that bring the spread within ``max_skew``.

    Args:
        counts: live connections per backend, all replicas.
        caps: the backends that may take connections now, with their caps; connections
            on other backends are not moved (draining and sick backends have their own
            handling).
        max_skew: tolerated spread, in connections, or as a share of the cap when the
            caps differ.
        arriving: connections on their way back (closed, not reconnected yet).
    """
    if len(caps) < 2:
        return {}
    by_share = _by_share(caps)
    held = {backend: max(0, counts.get(backend, 0)) for backend in caps}

    def load(backend: str, change: int = 0) -> float:
        return _load(held[backend] + change, caps[backend], by_share)

    def least_with_room() -> str | None:
        room = [b for b in caps if held[b] < caps[b]]
        return min(room, key=lambda b: (load(b), b)) if room else None

    for _ in range(max(0, arriving)):
        target = least_with_room()
        if target is None:
            break
        held[target] += 1

    moves: dict[str, int] = {}
    for _ in range(sum(held.values())):
        source = max(caps, key=lambda b: (load(b), b))
        target = least_with_room()
        if target is None or target == source:
            break
        if load(source) - load(target) <= max_skew + _EPSILON:
            break
        # Only a move that leaves the source at least as loaded as the target
        # narrows the spread; anything else would just swap the roles.
        if load(source, -1) < load(target, +1) - _EPSILON:
            break
        held[source] -= 1
        held[target] += 1
        moves[source] = moves.get(source, 0) + 1
    return moves


def local_share(
    moves: Mapping[str, int],
    global_counts: Mapping[str, int],
    local_counts: Mapping[str, int],
    *,
    tail: Callable[[float], bool],
) -> dict[str, int]:
    """This replica's part of ``moves``: in proportion to what it holds on each backend.

    Args:
        moves: the plan, closes per backend for all replicas together.
        global_counts: live connections per backend, all replicas.
        local_counts: the ones this replica may close (its own, not closing yet).
        tail: ``tail(p)`` answers True with probability ``p``; decides who takes the
            remainder that rounding down leaves.
    """
    share: dict[str, int] = {}
    for backend, wanted in moves.items():
        mine = local_counts.get(backend, 0)
        if wanted <= 0 or mine <= 0:
            continue
        everyone = max(global_counts.get(backend, 0), mine)
        exact = wanted * mine / everyone
        count = math.floor(exact + _EPSILON)
        if count == 0 and tail(exact):
            count = 1
        count = min(count, mine)
        if count:
            share[backend] = count
    return share


class ArrivalEstimate:
    """Connections closed by the gateway and not back yet, guessed from recent totals."""

    def __init__(self, window: float):
        self.window = window
        self._seen: deque[tuple[float, int]] = deque()

    def observe(self, now: float, total: int) -> int:
        """Record the total live now; return how many seem to be on their way back."""
        seen = self._seen
        while seen and seen[0][0] < now - self.window:
            seen.popleft()
        # Keep only totals that a later, higher total does not dominate.
        while seen and seen[-1][1] <= total:
            seen.pop()
        seen.append((now, total))
        return seen[0][1] - total
