"""Balancing policies: which backends to try first. No I/O here.

The admission store holds the pool (the healthy backends with their caps) and
decides: the affinity backend while it has room, then the policy's ``first``
picks in order, then the least-loaded backend by the global counts of all
replicas, which only the store can see atomically. A policy only names its
few picks, in O(1) (the hash policy: one pass of hashing), so an admission
costs the same whatever the pool's size:

- ``least_conn``: no picks; the store's least loaded.
- ``round_robin``: the next backends in this replica's rotation.
- ``p2c``: two at random, the less loaded (by this replica's view) first.
- ``hash``: the rendezvous (highest-random-weight) backend for the client key.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wsgate.admission import Candidate
from wsgate.balancing.rendezvous import Rendezvous

__all__ = [
    "Plan",
    "Policy",
    "Rendezvous",
    "cookie_token",
    "make_policy",
]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to ask the store: the pool (unchanged), its picks, and how to fall back."""

    candidates: Sequence[Candidate]
    least_loaded: bool
    preferred: str | None = None
    first: tuple[str, ...] = ()


def cookie_token(backend_id: str) -> str:
    """The opaque affinity-cookie value naming a backend (not its address)."""
    return hashlib.blake2b(backend_id.encode(), digest_size=9).hexdigest()


class Policy:
    """Picks for one connection. Subclasses set the pick rule."""

    name = "first_fit"
    least_loaded = False

    def picks(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> tuple[str, ...]:
        return ()

    def plan(
        self,
        candidates: Sequence[Candidate],
        *,
        key: str | None = None,
        load: Callable[[str], int] = lambda _: 0,
        preferred: str | None = None,
    ) -> Plan:
        return Plan(candidates, self.least_loaded, preferred, self.picks(candidates, key, load))


class RoundRobin(Policy):
    """The next backends of this replica's rotation; when they are full, the least loaded."""

    name = "round_robin"
    least_loaded = True
    tries = 3

    def __init__(self) -> None:
        self._next = 0

    def picks(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> tuple[str, ...]:
        count = len(candidates)
        if not count:
            return ()
        start = self._next % count
        self._next = start + 1
        return tuple(
            candidates[(start + i) % count].backend_id for i in range(min(self.tries, count))
        )


class LeastConn(Policy):
    name = "least_conn"
    least_loaded = True


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded first (by this replica's view)."""

    name = "p2c"
    least_loaded = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def picks(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> tuple[str, ...]:
        if len(candidates) < 2:
            return tuple(c.backend_id for c in candidates)
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        if load(b.backend_id) / b.cap < load(a.backend_id) / a.cap:
            a, b = b, a
        return (a.backend_id, b.backend_id)


class Hash(Policy):
    """Rendezvous hashing on the client key (its IP unless affinity names another)."""

    name = "hash"
    least_loaded = True

    def __init__(self) -> None:
        self._rendezvous = Rendezvous()

    def picks(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> tuple[str, ...]:
        if key is None:
            return ()
        top = self._rendezvous.top(candidates, key)
        return () if top is None else (top,)


_POLICIES: dict[str, Callable[[], Policy]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConn,
    "p2c": PowerOfTwo,
    "hash": Hash,
}


def make_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown balance policy {name!r}") from None
