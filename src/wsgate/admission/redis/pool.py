"""The replica's pool as Redis holds it: versioned, so only changes travel. No I/O.

The script keeps each replica's pool (its eligible backends, their caps and
order) next to the counts, so an admission need not carry it. Every
admission carries the pool's current version and what changed since the
version Redis last acknowledged; once acknowledged, that is nothing. Redis
answers ``pool`` when it holds some other version (it lost its data, or
reaped this replica): the next admission then sends the whole pool.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from wsgate.admission.contract import Candidate
from wsgate.admission.redis.script import PoolUpdate

__all__ = ["PoolSync"]

Members = dict[str, tuple[int, int]]  # backend -> (cap, position)


class PoolSync:
    def __init__(self) -> None:
        # Versions are unique to this store instance: a restarted replica with the
        # same id never matches the pool its predecessor left in Redis.
        self._prefix = secrets.token_hex(4)
        self._serial = 0
        self.version = ""
        self._source: Sequence[Candidate] | None = None
        self._members: Members = {}
        self._acked_version = ""
        self._acked: Members = {}
        self._pending: dict[str, Members] = {}  # versions sent, not yet acknowledged
        self._reset = False
        self._update: PoolUpdate | None = None
        #: The last cap seen for every backend ever in the pool: a re-registration
        #: is judged by them for the backends it holds slots of.
        self.caps: dict[str, int] = {}

    def offer(self, candidates: Sequence[Candidate]) -> None:
        """Take ``candidates`` as the pool; nothing to do when it is the same sequence."""
        if candidates is self._source:
            return
        self._source = candidates
        members = {c.backend_id: (c.cap, i) for i, c in enumerate(candidates)}
        if members == self._members:
            return
        self._serial += 1
        self.version = f"{self._prefix}:{self._serial}"
        self._members = members
        self._pending[self.version] = members
        self._update = None
        for backend, (cap, _) in members.items():
            self.caps[backend] = cap

    def update(self) -> PoolUpdate:
        """What the next admission carries: nothing once Redis has this version."""
        if self._update is None:
            if self._reset:
                entries = [(b, cap, pos) for b, (cap, pos) in self._members.items()]
            elif self._acked_version == self.version:
                entries = []
            else:
                old, new = self._acked, self._members
                entries = [
                    (b, cap, pos) for b, (cap, pos) in new.items() if old.get(b) != (cap, pos)
                ]
                entries += [(b, 0, 0) for b in old if b not in new]
            self._update = PoolUpdate(self._acked_version, self.version, self._reset, entries)
        return self._update

    def acknowledged(self, version: str) -> None:
        """An admission's reply: Redis holds ``version`` now."""
        if version == self._acked_version and not self._reset:
            return
        members = self._pending.get(version)
        if members is None:
            return  # not one of ours (or long superseded): the next 'pool' reply tells
        self._acked_version, self._acked = version, members
        serial = int(version.rsplit(":", 1)[1])
        self._pending = {
            v: m for v, m in self._pending.items() if int(v.rsplit(":", 1)[1]) > serial
        }
        if version == self.version:
            self._pending[version] = members  # kept while the same version is current
            self._reset = False
        self._update = None

    def resend(self) -> None:
        """Redis holds another version than ours: send the whole pool next."""
        self._reset = True
        self._update = None

    def forget_caps(self, keep: Sequence[str] | set[str]) -> None:
        """Forget caps of backends neither in the pool nor in ``keep``."""
        self.caps = {b: c for b, c in self.caps.items() if b in self._members or b in keep}
