"""Admission as the data plane asks for it: policy, affinity, the store, the queue, the cookie.

:class:`Admission` turns one request into a decision: a
:class:`~wsgate.gateway.reservation.Reservation` of a slot, or a rejection.
It orders the pool's healthy backends by the balancing policy and the
affinity setting, asks the store in one step, and, when every backend is
full and a queue is configured, waits in FIFO order for a slot. It sets the
affinity cookie on responses. It holds no connection and sends no byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence

from wsgate.admission import AdmissionStore, Admitted, Candidate, Reason, Rejected, Ticket
from wsgate.balancing import Policy, Rendezvous, cookie_token
from wsgate.config import RouteConfig
from wsgate.gateway.head import Header, RequestHead
from wsgate.gateway.reservation import Reservation
from wsgate.gateway.stats import Stats
from wsgate.upstreams.pool import BackendPool

__all__ = ["QUEUE_POLL", "Admission", "Decision"]

# Queued connections re-ask the store this often, to see slots other replicas freed.
QUEUE_POLL = 0.25

Decision = Reservation | Rejected


class Admission:
    """Decides which backend takes one more connection, for one pool."""

    def __init__(
        self,
        config: RouteConfig,
        store: AdmissionStore,
        pool: BackendPool,
        policy: Policy,
        stats: Stats,
    ):
        self.config = config  # the route's keys; a reload replaces them (and the policy)
        self.store = store
        self.pool = pool
        self.policy = policy
        self.stats = stats
        self.draining = False
        self._waiters: deque[asyncio.Event] = deque()
        self._cookie_ids: dict[str, str] = {}
        self._rendezvous = Rendezvous()
        pool.on_change.append(self.pool_changed)

    @property
    def queued(self) -> int:
        """Connections waiting in the queue for a slot."""
        return len(self._waiters)

    def pool_changed(self) -> None:
        self._cookie_ids = {cookie_token(b.id): b.id for b in self.pool}

    async def admit(
        self, head: RequestHead, client_ip: str, *, exclude: set[str]
    ) -> tuple[Decision, str | None]:
        """Decide one connection: (decision, the affine backend if there was one)."""
        queue = self.config.limits.queue
        if queue.max and self._waiters:
            return await self._queued(head, client_ip, exclude), None
        decision, preferred = await self._decide(head, client_ip, exclude)
        if (
            isinstance(decision, Rejected)
            and decision.reason == Reason.NO_CAPACITY
            and queue.max
            and len(self._waiters) < queue.max
        ):
            decision = await self._queued(head, client_ip, exclude)
        if isinstance(decision, Rejected) and decision.reason == Reason.NO_CAPACITY:
            for candidate in self.pool.candidates():
                if candidate.backend_id not in exclude:
                    backend = self.pool.get(candidate.backend_id)
                    if backend is not None:
                        backend.rejected_total += 1
        return decision, preferred

    def release(self, ticket: Ticket) -> None:
        """Give a slot back (through its reservation) and wake the head of the queue."""
        self.store.release_now(ticket)
        if self._waiters:
            self._waiters[0].set()

    def cookie_headers(self, backend_id: str, head: RequestHead) -> list[Header]:
        """The affinity cookie to set on a response from ``backend_id``, if it is missing."""
        affinity = self.config.affinity
        if affinity.by != "cookie":
            return []
        token = cookie_token(backend_id)
        if head.cookie(affinity.cookie) == token:
            return []
        cookie = f"{affinity.cookie}={token}; Path=/; HttpOnly; SameSite=Lax"
        return [(b"Set-Cookie", cookie.encode())]

    def _affinity(
        self,
        head: RequestHead,
        client_ip: str,
        candidates: Sequence[Candidate],
        exclude: set[str],
    ) -> tuple[str | None, str]:
        """(the affine backend, the hash key) of this request under the affinity setting."""
        affinity = self.config.affinity
        if affinity.by == "cookie":
            token = head.cookie(affinity.cookie)
            backend_id = self._cookie_ids.get(token) if token else None
            known = (
                backend_id is not None
                and backend_id not in exclude
                and self.pool.is_candidate(backend_id)
            )
            return (backend_id if known else None), client_ip
        key = client_ip
        if affinity.by == "header":
            value = head.get(affinity.header.encode())
            if value is None:
                return None, client_ip
            key = value.decode("latin-1")
        elif affinity.by != "ip":
            return None, client_ip
        # Rendezvous over the healthy backends: stable per key, little churn on change.
        return self._rendezvous.top(candidates, key, exclude), key

    def _global_load(self, backend_id: str) -> int:
        return self.store.global_counts().get(backend_id, 0)

    async def _decide(
        self, head: RequestHead, client_ip: str, exclude: set[str]
    ) -> tuple[Decision, str | None]:
        # The pool's own tuple, unchanged until the pool changes: the store then
        # knows it already, and the excluded backends travel by name.
        candidates = self.pool.candidates()
        if exclude and sum(map(self.pool.is_candidate, exclude)) >= len(candidates):
            candidates = ()  # every healthy backend was tried: none is left
        preferred, key = self._affinity(head, client_ip, candidates, exclude)
        plan = self.policy.plan(candidates, key=key, load=self._global_load, preferred=preferred)
        started = time.perf_counter()
        decision = await self.store.admit(
            plan.candidates,
            client_key=client_ip,
            least_loaded=plan.least_loaded,
            preferred=plan.preferred,
            first=plan.first,
            exclude=exclude,
        )
        self.stats.admission_latency.observe(time.perf_counter() - started)
        if isinstance(decision, Admitted):
            return Reservation(decision.ticket, self.release), preferred
        return decision, preferred

    async def _queued(self, head: RequestHead, client_ip: str, exclude: set[str]) -> Decision:
        """Wait in FIFO order for a slot, up to queue.timeout."""
        limits = self.config.limits
        if len(self._waiters) >= limits.queue.max:
            return Rejected(Reason.NO_CAPACITY, limits.retry_after)
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._waiters.append(wake)
        deadline = loop.time() + limits.queue.timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if self.draining:
                    return Rejected(Reason.DRAINING, 1.0)
                if remaining <= 0:
                    return Rejected(Reason.NO_CAPACITY, self.config.limits.retry_after)
                # Local releases wake the head of the line at once; the head also
                # polls, because slots freed by other replicas send no wake-up.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(remaining, QUEUE_POLL))
                wake.clear()
                if self._waiters[0] is not wake:
                    continue  # first come, first served
                decision, _ = await self._decide(head, client_ip, exclude)
                if not (isinstance(decision, Rejected) and decision.reason == Reason.NO_CAPACITY):
                    return decision
        finally:
            self._waiters.remove(wake)
            if self._waiters:
                self._waiters[0].set()  # the next in line tries now
