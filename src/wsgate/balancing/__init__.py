"""Balancing policies: in which order to offer the healthy backends. No I/O here.

A policy turns the healthy backends into an ordered list of candidates. The
admission store then takes the first one with room (first fit), or, for
``least_conn``, the least-loaded one by the global counts of all replicas, which
only the store can see atomically. Affinity names one *preferred* backend that
wins while it has room; when it is full the policy's order applies.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wsgate.admission import Candidate

__all__ = [
    "Plan",
    "Policy",
    "cookie_token",
    "make_policy",
    "rendezvous_order",
]


@dataclass(frozen=True, slots=True)
class Plan:
    """What to ask the store: candidates in order, and how it should pick."""

    candidates: list[Candidate]
    least_loaded: bool
    preferred: str | None = None


def _score(key: str, backend_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{backend_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(candidates: Sequence[Candidate], key: str) -> list[Candidate]:
    """Highest-random-weight order: stable for a key, moves little when backends change."""
    return sorted(candidates, key=lambda c: _score(key, c.backend_id), reverse=True)


def cookie_token(backend_id: str) -> str:
    """The opaque affinity-cookie value naming a backend (not its address)."""
    return hashlib.blake2b(backend_id.encode(), digest_size=9).hexdigest()


class Policy:
    """Orders candidates for one connection. Subclasses set the order rule."""

    name = "first_fit"
    least_loaded = False

    def order(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> list[Candidate]:
        return list(candidates)

    def plan(
        self,
        candidates: Sequence[Candidate],
        *,
        key: str | None = None,
        load: Callable[[str], int] = lambda _: 0,
        preferred: str | None = None,
    ) -> Plan:
        return Plan(self.order(candidates, key, load), self.least_loaded, preferred)


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def order(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> list[Candidate]:
        if not candidates:
            return []
        start = self._next % len(candidates)
        self._next = start + 1
        return [*candidates[start:], *candidates[:start]]


class LeastConn(Policy):
    name = "least_conn"
    least_loaded = True


class PowerOfTwo(Policy):
    """Two random candidates, the less loaded first (by this replica's view)."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def order(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> list[Candidate]:
        if len(candidates) < 2:
            return list(candidates)
        first, second = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[first], candidates[second]
        if load(b.backend_id) / b.cap < load(a.backend_id) / a.cap:
            a, b = b, a
        rest = [c for i, c in enumerate(candidates) if i not in (first, second)]
        return [a, b, *rest]


class Hash(Policy):
    """Rendezvous hashing on the client key (its IP unless affinity names another)."""

    name = "hash"

    def order(
        self, candidates: Sequence[Candidate], key: str | None, load: Callable[[str], int]
    ) -> list[Candidate]:
        return rendezvous_order(candidates, key) if key is not None else list(candidates)


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
