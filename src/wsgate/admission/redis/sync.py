"""Whether a replica's view of Redis can be trusted: the sync as a state machine.

No I/O and no clock of its own: the store feeds it the decoded replies of the
script, the instants they were sent and received, and the failures; it keeps
the replica's truth (``held``) and what it last learnt from Redis, and says
what to do next. Every transition goes to ``on_change`` (the store logs it and
wakes its renewal loop).

    STARTING ──registered──► IN_SYNC ──any doubt──► DEGRADED ──registered──► IN_SYNC
        └───────────any doubt───────────────────────────┘
    STARTING or DEGRADED ──registered, Redis settling──► SETTLING ──registered, settled──► IN_SYNC
    (any state) ──close──► CLOSED

SETTLING follows a loss of Redis's data (the renew reply reports the wait left):
registered, but the totals may still lack what replicas not yet back hold, so
it admits as DEGRADED does and re-registers until the wait is over.

"Any doubt" is a call that failed or timed out, a refused token (``stale``), a
lease found lost, a reply that came after its deadline (``late``), the lease's
own deadline passed by the replica's clock, or a quiet renewal that found Redis
holding other counts for this replica than its truth.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from enum import Enum
from typing import NamedTuple

from wsgate.admission.contract import Reason, Rejected
from wsgate.admission.redis.script import (
    AdmitReply,
    AdmitStatus,
    ReleaseReply,
    RenewReply,
    RenewStatus,
)

__all__ = ["Change", "Registration", "ReplicaSync", "SyncState"]

# A call that must not take effect late is void once this share of ``timeout``
# has passed by Redis's clock; the rest is left for its reply to come back.
DEADLINE_SHARE = 0.8


class SyncState(Enum):
    STARTING = "starting"  # never registered yet
    IN_SYNC = "in_sync"  # registered, current token: admit and release through Redis
    DEGRADED = "degraded"  # in doubt: only re-registrations go to Redis
    SETTLING = "settling"  # registered after Redis lost its data: not admitting through it yet
    CLOSED = "closed"  # closed or abandoned: nothing goes to Redis any more


class Change(NamedTuple):
    old: SyncState
    new: SyncState
    reason: str


class Registration(Enum):
    DONE = "done"  # in sync again
    AGAIN = "again"  # the truth changed while the call was out: send it again
    FAILED = "failed"  # void or refused: still degraded
    SETTLING = "settling"  # registered, but Redis lost its data: register again when settled


class ReplicaSync:
    """The replica's side of the bargain with the script (see store.py's theory).

    Args:
        lease_ttl: seconds the lease lasts after a renewal.
        lease_margin: stop trusting the lease this long before it could expire.
        timeout: seconds any call may take (quick replies teach Redis's clock).
        on_change: told of every transition (and of every doubt while degraded).
    """

    def __init__(
        self,
        lease_ttl: float,
        lease_margin: float,
        timeout: float,
        on_change: Callable[[Change], None],
    ):
        self.lease_ttl = lease_ttl
        self.lease_margin = lease_margin
        self.timeout = timeout
        self.on_change = on_change
        self.state = SyncState.STARTING
        self.token = ""
        self.lease_deadline = 0.0  # by the replica's clock
        #: The slots this replica really holds: one per ticket admitted and not
        #: yet released, whichever way it was admitted. Redis is kept in step.
        self.held: Counter[str] = Counter()
        self.global_counts: dict[str, int] = {}
        # Per backend, the call whose view of its count is shown: replies are
        # handled in another order than their calls ran in (a renewal's waiter
        # wakes after a release's callback), and an older view must not replace
        # a newer one. Calls run in the order they are sent; ``seq`` is that order.
        self._count_seen: dict[str, int] = {}
        self.live = 1
        self.rate_offset = 0.0  # seconds until the global bucket is full, when last seen
        self.rate_seen = 0.0
        self.server_offset: float | None = None  # Redis's clock minus the replica's
        self.epoch = ""  # when Redis's data set began, as it last said
        self.settle_until = 0.0  # by the replica's clock: when SETTLING may end
        self.errors_total = 0

    @property
    def in_sync(self) -> bool:
        return self.state is SyncState.IN_SYNC

    def truth(self) -> dict[str, int]:
        return {backend: count for backend, count in self.held.items() if count > 0}

    # -- doubt ------------------------------------------------------------------------------

    def lose(self, reason: str) -> None:
        """Stop trusting Redis: degraded until a re-registration succeeds."""
        old = self.state
        if old is SyncState.CLOSED:
            return
        self.state = SyncState.DEGRADED
        self.on_change(Change(old, SyncState.DEGRADED, reason))

    def failed(self, reason: str) -> None:
        """A call failed or timed out: it may or may not have run."""
        self.errors_total += 1
        self.lose(reason)

    def check_lease(self, now: float) -> None:
        if self.in_sync and now >= self.lease_deadline:
            self.lose("lease not renewed in time")

    def close(self) -> None:
        self.state = SyncState.CLOSED

    def deadline(self, now: float) -> int:
        """The server instant (µs) after which a call made now is void; 0 if unknown."""
        if self.server_offset is None:
            return 0
        return round((now + self.server_offset + self.timeout * DEADLINE_SHARE) * 1e6)

    # -- admission --------------------------------------------------------------------------

    def admit_replied(
        self, reply: AdmitReply, now: float, retry_after: float, *, seq: int | None = None
    ) -> str | Rejected | None:
        """The admitted backend (counted as held), a refusal, or None: out of sync.

        (A ``pool`` reply is the store's to handle: it sends its pool and asks again.)
        """
        if reply.status is AdmitStatus.LATE:
            self.lose("Redis answered after the deadline")
            return None
        if reply.status is AdmitStatus.STALE:
            self.lose("lease lost")
            return None
        self.live = reply.live_replicas
        self.rate_offset = reply.rate_offset
        self.rate_seen = now
        if reply.status is AdmitStatus.OK:
            self.held[reply.backend] += 1
            self._learn(reply.backend, reply.total, seq)
            return reply.backend
        if reply.status is AdmitStatus.RATE_LIMITED:
            return Rejected(Reason.RATE_LIMITED, reply.retry_after)
        if reply.status is AdmitStatus.CLIENT_RATE_LIMITED:
            return Rejected(Reason.CLIENT_RATE_LIMITED, reply.retry_after)
        if reply.status is AdmitStatus.CLIENT_CONNECTION_LIMIT:
            return Rejected(Reason.CLIENT_CONNECTION_LIMIT, retry_after)
        return Rejected(Reason.NO_CAPACITY, retry_after)

    def admitted_locally(self, backend: str) -> None:
        self.held[backend] += 1

    def abandoned(self, reply: AdmitReply | None) -> str | None:
        """Its caller stopped waiting: the backend whose slot to give back, if any.

        ``None`` for the reply means the call failed or was never sent.
        """
        if reply is None:
            self.lose("an admission was abandoned before Redis answered")
            return None
        if reply.status is AdmitStatus.OK and self.in_sync:
            return reply.backend
        return None

    def released(self, backend: str, *, seq: int | None = None) -> bool:
        """Count a release; True when it is to be sent to Redis (in sync, as call ``seq``)."""
        held = self.held
        held[backend] -= 1
        if held[backend] <= 0:
            del held[backend]
        if backend in self.global_counts:
            self._learn(backend, self.global_counts[backend] - 1, seq)
        return self.in_sync

    def release_replied(self, backend: str, reply: ReleaseReply, *, seq: int | None = None) -> None:
        if reply.stale:
            self.lose("lease lost")
        else:
            self._learn(backend, reply.total, seq)

    def _learn(self, backend: str, total: int, seq: int | None) -> None:
        if seq is not None:
            if seq < self._count_seen.get(backend, -1):
                return  # a call that ran before the one whose count is shown
            self._count_seen[backend] = seq
        # Only backends with connections are kept: the map is shown as it is.
        if total > 0:
            self.global_counts[backend] = total
        else:
            self.global_counts.pop(backend, None)

    # -- leases -----------------------------------------------------------------------------

    def renewed(
        self,
        reply: RenewReply,
        sent: float,
        received: float,
        *,
        quiet: bool,
        seq: int | None = None,
    ) -> None:
        """A plain renewal's reply. ``quiet``: no other call of this replica ran meanwhile."""
        self._absorb(reply, sent, received, seq)
        if reply.status is not RenewStatus.OK:
            self.lose("lease lost")
            return
        self.lease_deadline = sent + self.lease_ttl - self.lease_margin
        # With nothing else running meanwhile, what Redis holds for this replica must
        # be its truth exactly. It differs only if Redis lost writes it had acknowledged
        # (a failover to a lagging replica): then register the truth again.
        if quiet and reply.held != self.truth():
            self.lose("Redis lost some of this replica's slots")
        elif reply.settling > 0:
            self.lose("Redis lost its data")

    def registered(
        self,
        reply: RenewReply,
        token: str,
        truth: Mapping[str, int],
        sent: float,
        received: float,
        *,
        seq: int | None = None,
    ) -> Registration:
        """A re-registration's reply: ``truth`` was sent with the new ``token``."""
        if self.state is SyncState.CLOSED:
            return Registration.FAILED
        if reply.status is RenewStatus.LATE:
            self.server_offset = None  # learn the clock again from a plain renewal
            self.lose("Redis answered after the deadline")
            return Registration.FAILED
        self.token = token
        self.lease_deadline = sent + self.lease_ttl - self.lease_margin
        self._absorb(reply, sent, received, seq)
        if self.truth() != truth:
            return Registration.AGAIN  # released or admitted locally meanwhile
        if reply.settling > 0:
            # Replicas not yet back hold slots the totals lack: wait for them.
            self.settle_until = received + reply.settling
            old, self.state = self.state, SyncState.SETTLING
            if old is not SyncState.SETTLING:
                self.on_change(
                    Change(
                        old,
                        self.state,
                        f"Redis lost its data: waiting {reply.settling:.2f}s "
                        "for every replica to register again",
                    )
                )
            return Registration.SETTLING
        old, self.state = self.state, SyncState.IN_SYNC
        if self.state is not old:
            slots = sum(truth.values())
            self.on_change(
                Change(old, self.state, f"{slots} live slots, {self.live} live replicas")
            )
        return Registration.DONE

    def _absorb(self, reply: RenewReply, sent: float, received: float, seq: int | None) -> None:
        if received - sent <= self.timeout / 4:
            # Redis's clock in the replica's terms, to within half a quick round trip.
            self.server_offset = reply.server_time - (sent + received) / 2
        self.live = reply.live_replicas
        self.rate_offset = reply.rate_offset
        self.rate_seen = received
        if reply.epoch:
            self.epoch = reply.epoch  # sent back with every renewal from now on
        if reply.status is RenewStatus.OK:
            for backend in self.global_counts.keys() | reply.totals.keys():
                self._learn(backend, reply.totals.get(backend, 0), seq)
