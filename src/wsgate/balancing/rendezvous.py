"""Rendezvous hashing over thousands of backends for the price of about a hundred hashes.

Rendezvous (highest random weight) hashing gives each key the backend that
scores highest for it: stable for a key, the same on every replica, and when a
backend leaves only its keys move. Done plainly it hashes the key with every
backend, which with 5,000 pods is 5,000 hashes (about 6 ms here) per
connection.

Here the backends are spread over :data:`GROUPS` fixed groups by a hash of
their id. A key first picks a group by *weighted* rendezvous, a group's weight
being how many backends it holds (score ``w / -ln(u)``, ``u`` the key's hash
with the group in (0, 1): a group wins with probability ``w / n``), then a
backend within it by plain rendezvous. Every backend keeps a ``1/n`` share of
the keys, and a key costs at most ``GROUPS + n / GROUPS`` hashes. When a
backend arrives or leaves, its group's weight changes: besides the keys that
move to or from it, about as many move between its group and the others, so
about ``2/n`` of the keys move instead of ``1/n``.

The groups are built once per pool: the gateway hands the same candidate
sequence to every admission until the pool changes, and a new sequence is
indexed on first use. No I/O.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Collection, Sequence

from wsgate.admission import Candidate

__all__ = ["GROUPS", "Rendezvous", "score"]

# About the square root of the largest pools served (thousands of pods): the two
# levels then cost about the same.
GROUPS = 64
_MASK = (1 << 64) - 1
_SCALE = float(1 << 52)

# (name, its 64-bit hash): a backend, or a group.
_Named = tuple[str, int]
# (the group, its weight, its backends)
_Group = tuple[_Named, int, tuple[_Named, ...]]


def _hash(text: str, person: bytes = b"") -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def score(key: int, name: int) -> int:
    """The score of a name's hash for a key's hash: 64 well-mixed bits.

    Both hashes are made once (the key's per connection, a name's per pool),
    so a candidate costs a few integer operations, not a hash of its own
    (splitmix64's finalizer of their exclusive or).
    """
    z = key ^ name
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=1 << 16)
def _placed(backend: str) -> tuple[int, _Named]:
    """A backend's group and hash: kept, so a pool that changes is indexed without hashing."""
    return _hash(backend, b"wsgate-g") % GROUPS, (backend, _hash(backend))


class Rendezvous:
    """The rendezvous choice over one pool's candidates, indexed once per pool."""

    __slots__ = ("_for", "_groups")

    def __init__(self) -> None:
        self._for: Sequence[Candidate] | None = None
        self._groups: list[_Group] = []

    def top(
        self, candidates: Sequence[Candidate], key: str, exclude: Collection[str] = ()
    ) -> str | None:
        """The key's backend among ``candidates``, skipping ``exclude``; None when none is left."""
        if candidates is not self._for:
            self._index(candidates)
        groups = self._groups
        if not groups:
            return None
        hashed = _hash(key)
        if len(groups) == 1:
            return _best(groups[0][2], hashed, exclude)
        if not exclude:
            return _best(_top_group(groups, hashed), hashed, exclude)
        for _, _, members in sorted(groups, key=lambda g: _weighted(hashed, g), reverse=True):
            best = _best(members, hashed, exclude)
            if best is not None:
                return best
        return None

    def _index(self, candidates: Sequence[Candidate]) -> None:
        groups: dict[int, list[_Named]] = {}
        for candidate in candidates:
            group, named = _placed(candidate.backend_id)
            groups.setdefault(group, []).append(named)
        self._groups = [
            ((f"group-{number}", _hash(f"group-{number}")), len(members), tuple(members))
            for number, members in sorted(groups.items())
        ]
        self._for = candidates


def _weighted(key: int, group: _Group) -> tuple[float, str]:
    """A group's weighted rendezvous score for ``key`` (its name breaks a tie)."""
    (name, hashed), weight, _ = group
    # u in (0, 1), never 0 (the log) nor 1 (the division): 52 bits and a half
    # are exact in a double.
    u = ((score(key, hashed) >> 12) + 0.5) / _SCALE
    return weight / -math.log(u), name


def _top_group(groups: Sequence[_Group], key: int) -> tuple[_Named, ...]:
    """The members of the group :func:`_weighted` ranks first: the same loop, written out.

    This runs once per connection over up to :data:`GROUPS` groups, so the
    mixing is inlined rather than called per group.
    """
    log = math.log
    best = -1.0
    best_name = ""
    members: tuple[_Named, ...] = ()
    for (name, hashed), weight, group_members in groups:
        z = key ^ hashed
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        weighted = weight / -log(((z >> 12) + 0.5) / _SCALE)
        if weighted > best or (weighted == best and name > best_name):
            best, best_name, members = weighted, name, group_members
    return members


def _best(members: Sequence[_Named], key: int, exclude: Collection[str]) -> str | None:
    """The member scoring highest for ``key`` (:func:`score`, inlined), not in ``exclude``."""
    best = -1
    found: str | None = None
    for backend, hashed in members:
        z = key ^ hashed
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        z ^= z >> 31
        if (z > best or (z == best and found is not None and backend > found)) and (
            backend not in exclude
        ):
            best, found = z, backend
    return found
