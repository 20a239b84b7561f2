"""The shared store: admission state in Redis, decided by one script per step.

THEORY OF OPERATION
===================

The rules of the shared state live in ``state.lua`` (read its header first): it
keeps ``total[b] == sum of held:R[b]`` over registered replicas, admits only
below the cap, and reaps replicas whose lease expired. This module is the
replica's side of that bargain (its states are ``sync.ReplicaSync``'s). It holds
one piece of truth Redis cannot see:

    ``held`` -- the slots this replica really holds: one per ticket that was
    admitted and not yet released, whichever way it was admitted.

Everything else follows from keeping Redis in step with ``held``:

* While the replica is *in sync* (registered, current session token, no call
  failed since), every admit and release changes ``held`` and ``held:R`` by
  the same amount, in the same script call: one round trip each. Calls made
  while others are on their way leave together as one pipeline (each still
  its own atomic script run). A caller cancelled mid-call does not cancel the
  call: an admission Redis granted anyway is released again. Admissions and
  re-registrations carry a deadline in Redis's time (its clock is learnt from
  quick renewals), so one this replica stopped waiting for never takes effect.

* Any doubt -- a call that failed or timed out (it may or may not have run), a
  refused token, a lease found lost, a local deadline passed -- ends the sync.
  From then on the replica is ``degraded``: it sends nothing but
  re-registration attempts; admissions follow ``on_failure`` (``closed``: 503
  state_unavailable; ``local``: its share of every cap and of the rate, on its
  own counts); releases change ``held`` only.

* Re-registration waits until no call is in flight, then sends ``held`` as
  the absolute truth with a fresh session token. Redis replaces ``held:R`` by
  it and fixes ``total`` by the difference; any old call that still arrives
  is refused for its stale token, so nothing that happened before can count
  twice or be lost. If ``held`` changed while the call was out, it is sent
  again. A backend pushed over its cap by this (others admitted into slots
  reaped while this replica was away, or slots admitted locally meanwhile) is
  reported to ``on_excess`` so the gateway closes that many of its newest
  connections there.

* A background task renews the lease every ``lease_ttl / 3``; the same script
  reaps expired replicas. A replica stops admitting through Redis as soon as
  a renewal fails and in any case before its lease could expire by its own
  clock; it keeps its live connections either way. A renewal that ran alone
  (no other call of this replica in flight) also checks that Redis holds
  exactly ``held`` for it: a difference means Redis lost writes it had
  acknowledged (a failover to a lagging replica), and ends the sync too.

* Every renewal carries the epoch of Redis's data this replica last saw.
  When Redis lost its data, the script finds another epoch, reports a wait of
  one ``lease_ttl`` from the first sighting, and the replica stays *settling*
  (registered, but admitting as when degraded) until it is over: by then every
  live replica has re-registered, and the totals are complete again. A first
  start has no epoch to compare and is not delayed.

A crash of this process loses nothing: its lease expires and the survivors
give its slots back; when the process ended on a host that stayed up, they see
its connection close and give them back within about three ``departure_check``s
(``presence.Presence``). A crash of Redis loses nothing either: every replica
re-registers its truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

from wsgate.admission.contract import Admitted, Candidate, Limits, Reason, Rejected, Ticket
from wsgate.admission.local import LocalDecision, share_choice
from wsgate.admission.redis import script
from wsgate.admission.redis.connection import (
    ClusterNodes,
    StateUnavailable,
    Target,
    connect,
    describe_target,
)
from wsgate.admission.redis.lease import LeaseKeeper
from wsgate.admission.redis.pipeline import ScriptCaller
from wsgate.admission.redis.pool import PoolSync
from wsgate.admission.redis.presence import Presence
from wsgate.admission.redis.sync import Change, ReplicaSync, SyncState

__all__ = ["OnFailure", "RedisStore", "default_replica_id"]

logger = logging.getLogger("wsgate.state")

OnFailure = Literal["closed", "local"]


def default_replica_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class RedisStore:
    """Admission shared by every replica that uses the same Redis and namespace.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (a password may be in it),
            or a Sentinel service or a Cluster (``connection.Target``).
        namespace: separates wsgate clusters sharing one Redis.
        replica_id: this process's name in the shared state; unique per process.
        lease_ttl: seconds a replica's slots outlive its last renewal.
        timeout: seconds any Redis call may take before Redis counts as unavailable.
        on_failure: ``closed`` (reject with 503) or ``local`` (local shares).
        limits: the connect-rate limits; the caps travel with the candidates.
        departure_check: seconds between two looks for replicas whose process
            ended (their slots are given back then, not at their lease's end);
            0 leaves that to the leases. Not with a Redis Cluster.
    """

    kind = "redis"

    def __init__(
        self,
        url: Target,
        *,
        namespace: str = "default",
        replica_id: str | None = None,
        lease_ttl: float = 15.0,
        timeout: float = 0.1,
        on_failure: OnFailure = "closed",
        limits: Limits | None = None,
        departure_check: float = 0.5,
    ):
        if lease_ttl <= 0 or timeout <= 0:
            raise ValueError("lease_ttl and timeout must be positive")
        if departure_check < 0:
            raise ValueError("departure_check must not be negative")
        self.url = url
        self.namespace = namespace
        self.replica_id = replica_id or default_replica_id()
        self.lease_ttl = lease_ttl
        self.timeout = timeout
        self.on_failure: OnFailure = on_failure
        #: Called with (backend_id, count) when re-registration finds a backend
        #: over its cap: close that many of this replica's newest connections there.
        self.on_excess: Callable[[str, int], None] | None = None
        self._limits = limits or Limits()
        # Stop admitting through Redis this long before the lease could expire.
        lease_margin = min(max(timeout, 0.05), lease_ttl / 3)
        self._sync = ReplicaSync(lease_ttl, lease_margin, timeout, self._changed)
        self._caller = ScriptCaller(script.replicas_key(namespace), timeout)
        # Connections this replica holds per client under max_connections_per_client:
        # its truth for P:clients:R, sent on re-registration as ``held`` is.
        self._clients: Counter[str] = Counter()
        self._presence: Presence | None = None
        if departure_check > 0 and not isinstance(url, ClusterNodes):
            self._presence = Presence(
                lambda: connect(url, timeout),
                namespace,
                self.replica_id,
                interval=departure_check,
                timeout=max(5 * timeout, 0.5),
                renamed=self._presence_renamed,
                token=lambda: self._sync.token if self._sync.in_sync else "",
            )
        self._lease = LeaseKeeper(
            self._caller,
            self._sync,
            self.replica_id,
            script.rate_args(self._limits),
            self._caps_for,
            self._report_excess,
            clients=lambda: dict(self._clients),
            presence=self._presence_name,
        )
        self._local = LocalDecision()
        self._pool = PoolSync()
        self._background: set[asyncio.Task[None]] = set()

    # -- life cycle -------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "ok" if self._sync.in_sync else "degraded"

    @property
    def sync_state(self) -> SyncState:
        return self._sync.state

    @property
    def errors_total(self) -> int:
        return self._sync.errors_total

    async def start(self, *, renew_in_background: bool = True) -> None:
        """Register and start renewing; a Redis that is down means ``degraded``, not an error.

        With ``renew_in_background=False`` nothing renews the lease unless the
        caller calls :meth:`refresh` (tests that choose every step do this).
        """
        self._caller.client = connect(self.url, self.timeout)
        if self._presence is not None:
            # The first registration names the connection the others watch us by.
            self._presence.start()
            await self._presence.named(within=self.timeout)
        await self.refresh()
        if renew_in_background:
            self._lease.start()

    def _presence_name(self) -> tuple[str, float]:
        presence = self._presence
        return (presence.name, presence.quiet) if presence is not None else ("", 0.0)

    def _when_departed(self, decision: Rejected, asked: float) -> Rejected:
        """A refusal for capacity while a gone replica's slots are due back: retry then."""
        presence = self._presence
        if presence is None or decision.reason is not Reason.NO_CAPACITY:
            return decision
        presence.look_soon()
        hint = presence.retry_hint(asked, time.monotonic())
        if hint is None or hint >= decision.retry_after:
            return decision
        return Rejected(Reason.NO_CAPACITY, hint)

    def _presence_renamed(self) -> None:
        self._lease.wake()  # the others must watch the connection we hold now

    @property
    def departures_total(self) -> int:
        """Replicas this one found gone before their lease expired."""
        return self._presence.departures_total if self._presence is not None else 0

    async def close(self) -> None:
        """Stop renewing and give every slot this replica still holds back at once."""
        registered = self._sync.in_sync
        self._sync.close()
        await self._lease.stop()
        if registered:
            with contextlib.suppress(StateUnavailable):
                await self._caller.call(script.leave_call(self.replica_id, self._sync.token))
        if self._presence is not None:
            await self._presence.stop()
        await self._caller.disconnect()

    async def abandon(self) -> None:
        """Stop renewing and disconnect without giving slots back.

        To the other replicas this looks exactly like a crash: the slots come
        back when they see its connections close (``departure_check``), or when
        the lease expires. Tests use it; so may a process that must exit at once.
        """
        self._sync.close()
        await self._lease.stop()
        if self._presence is not None:
            await self._presence.stop()
        await self._caller.disconnect()

    def configure(self, limits: Limits) -> None:
        self._limits = limits
        self._lease.rates = script.rate_args(limits)

    # -- admission --------------------------------------------------------------

    async def admit(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
        first: Sequence[str] = (),
        exclude: Collection[str] = (),
    ) -> Admitted | Rejected:
        limits = self._limits
        if not candidates:
            return Rejected(Reason.NO_HEALTHY_BACKEND, limits.no_capacity_retry_after)
        self._pool.offer(candidates)
        sync = self._sync
        sync.check_lease(time.monotonic())
        client_cap = limits.max_connections_per_client
        counted = client_key if client_cap is not None else None
        tried_first = (preferred, *first) if preferred is not None else first
        # A second attempt only when Redis asked for the whole pool.
        for _attempt in range(2):
            if not sync.in_sync:
                break
            asked = time.monotonic()
            call = script.admit_call(
                sync.deadline(asked),
                self.replica_id,
                sync.token,
                self._pool.update(),
                self._lease.rates,
                client_key=client_key,
                least_loaded=least_loaded,
                first=tried_first,
                exclude=exclude,
                client_cap=client_cap,
            )
            seq = self._caller.next_call
            try:
                raw = await self._caller.call(
                    call, abandoned=functools.partial(self._undo_admission, counted)
                )
            except StateUnavailable as error:
                sync.failed(str(error))
                break
            # No await from here on: the reply and ``held`` change together.
            reply = script.decode_admit(raw)
            if reply.status is script.AdmitStatus.POOL:
                self._pool.resend()
                continue
            self._pool.acknowledged(reply.pool_version)
            decision = sync.admit_replied(
                reply, time.monotonic(), limits.no_capacity_retry_after, seq=seq
            )
            if isinstance(decision, str):
                return self._admitted(decision, counted)
            if decision is not None:
                return self._when_departed(decision, asked)
            break
        if self.on_failure == "closed":
            return Rejected(Reason.STATE_UNAVAILABLE, max(1.0, math.ceil(self._lease.retry_every)))
        # Degraded (on_failure: local): this replica's share, on its own counts.
        choice = share_choice(
            candidates,
            sync.held,
            sync.live,
            least_loaded=least_loaded,
            preferred=preferred,
            first=first,
            exclude=exclude,
        )
        decision = self._local.admit(
            choice, limits, live=sync.live, client_key=client_key, clients=self._clients
        )
        if isinstance(decision, Rejected):
            return decision
        sync.admitted_locally(decision)
        return self._admitted(decision, counted)

    def _admitted(self, backend: str, client: str | None) -> Admitted:
        if client is not None:
            self._clients[client] += 1
        return Admitted(Ticket(backend, client_key=client))

    async def release(self, ticket: Ticket) -> None:
        """Release and wait until Redis has it (or the sync is lost)."""
        reply = self._release(ticket)
        if reply is not None:
            # The outcome is handled by _released, whether or not this caller waits.
            with contextlib.suppress(StateUnavailable):
                await asyncio.shield(reply)

    def release_now(self, ticket: Ticket) -> None:
        """Release without waiting: this replica's counts change at once and the
        release leaves with the next batch of script calls.

        The gateway releases this way: a slot's end needs no answer, and not
        waiting saves a task and a timer per connection.
        """
        self._release(ticket)

    def _release(self, ticket: Ticket) -> asyncio.Future[Any] | None:
        if ticket.released:
            return None
        ticket.released = True
        backend, client = ticket.backend_id, ticket.client_key
        if client is not None:
            self._clients[client] -= 1
            if self._clients[client] <= 0:
                del self._clients[client]
        seq = self._caller.next_call  # the release's place among the calls
        if not self._sync.released(backend, seq=seq):
            return None  # re-registration will carry the new truth
        reply = self._caller.send(
            script.release_call(self.replica_id, self._sync.token, backend, client)
        )
        if reply is not None:
            reply.add_done_callback(functools.partial(self._released, backend, seq))
        return reply

    def _released(self, backend: str, seq: int, reply: asyncio.Future[Any]) -> None:
        if reply.cancelled():
            self._sync.lose("a release was not sent")
        elif (error := reply.exception()) is not None:
            self._sync.failed(str(error))
        else:
            self._sync.release_replied(backend, script.decode_release(reply.result()), seq=seq)

    def _undo_admission(self, client: str | None, reply: asyncio.Future[Any]) -> None:
        """The caller of ``admit`` was cancelled: give back what Redis reserved for it."""
        failed = reply.cancelled() or reply.exception() is not None
        backend = self._sync.abandoned(None if failed else script.decode_admit(reply.result()))
        if backend is not None:
            self._spawn(self._give_back(backend, client))

    async def _give_back(self, backend: str, client: str | None) -> None:
        try:
            raw = await self._caller.call(
                script.release_call(self.replica_id, self._sync.token, backend, client)
            )
        except StateUnavailable as error:
            self._sync.failed(str(error))
            return
        if script.decode_release(raw).stale:
            self._sync.lose("lease lost")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def acquire_close_tokens(self, per_second: float, want: int) -> int:
        """Closes the rebalancer may do now, from a budget all replicas share.

        The budget is a GCRA bucket of ``per_second`` with a burst of
        ``ceil(per_second)``. While Redis is unavailable nothing is granted:
        rebalancing can wait, and closing without coordination could close
        far more than the budget.
        """
        if want <= 0 or per_second <= 0 or not self._sync.in_sync:
            return 0
        burst = max(1, math.ceil(per_second))
        try:
            granted = await self._caller.call(script.close_tokens_call(per_second, burst, want))
        except StateUnavailable as error:
            self._sync.failed(str(error))
            return 0
        return int(granted)

    # -- what the replica knows -------------------------------------------------

    def global_counts(self) -> Mapping[str, int]:
        # A read-only view, not a copy (policies read it on every admission); the
        # sync keeps only backends with connections in it.
        return MappingProxyType(self._sync.global_counts)

    def local_counts(self) -> Mapping[str, int]:
        return dict(self._sync.held)

    def clients_connected(self) -> int:
        return len(self._clients)

    def tokens_available(self) -> float | None:
        rate = self._limits.connect_rate
        if rate is None:
            return None
        sync = self._sync
        pending = max(0.0, sync.rate_offset - (time.monotonic() - sync.rate_seen))
        return max(0.0, min(float(rate.burst), rate.burst - pending * rate.per_second))

    def live_replicas(self) -> int:
        return self._sync.live

    async def snapshot(self) -> dict[str, Any]:
        sync = self._sync
        lease_left = sync.lease_deadline + sync.lease_margin - time.monotonic()
        return {
            "kind": self.kind,
            "mode": self.mode,
            "store": describe_target(self.url),
            "namespace": self.namespace,
            "replica_id": self.replica_id,
            "on_failure": self.on_failure,
            "lease_ttl": self.lease_ttl,
            "lease_left": max(0.0, lease_left) if sync.in_sync else 0.0,
            "live_replicas": sync.live,
            "global": dict(self.global_counts()),
            "local": dict(self.local_counts()),
            "tokens": self.tokens_available(),
            "clients_connected": self.clients_connected(),
        }

    # -- leases -----------------------------------------------------------------

    async def refresh(self) -> None:
        """One renewal (fresh global counts), or a re-registration when out of sync."""
        await self._lease.refresh()

    def _caps_for(self, held: Mapping[str, int]) -> dict[str, int]:
        self._pool.forget_caps(set(held))
        caps = self._pool.caps
        return {backend: caps[backend] for backend in held if backend in caps}

    def _report_excess(self, excess: Mapping[str, int]) -> None:
        for backend, count in excess.items():
            logger.warning(
                "backend %s is over its cap after re-registering: closing %d connection(s) "
                "of this replica there",
                backend,
                count,
            )
            if self.on_excess is not None:
                try:
                    self.on_excess(backend, count)
                except Exception:
                    logger.exception("on_excess(%s, %d) failed", backend, count)

    def _changed(self, change: Change) -> None:
        """The sync's transitions: logged once each, and a lost sync retried at once."""
        if change.new is SyncState.IN_SYNC:
            logger.info("registered as %s with %s", self.replica_id, change.reason)
            return
        if change.old is not change.new:
            if self.on_failure == "closed":
                policy = "rejecting new connections (on_failure: closed)"
            else:
                policy = (
                    f"admitting within local shares of {self._sync.live} replicas "
                    "(on_failure: local)"
                )
            logger.warning("shared state unavailable (%s): %s", change.reason, policy)
        self._lease.wake()
