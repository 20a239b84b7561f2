"""The shared store: admission state in Redis, decided by one script per step.

THEORY OF OPERATION
===================

The rules of the shared state live in ``state.lua`` (read its header first): it
keeps ``total[b] == sum of held:R[b]`` over registered replicas, admits only
below the cap, and reaps replicas whose lease expired. This module is the
replica's side of that bargain. It holds one piece of truth Redis cannot see:

    ``self._held`` -- the slots this replica really holds: one per ticket that
    was admitted and not yet released, whichever way it was admitted.

Everything else follows from keeping Redis in step with ``_held``:

* While the replica is *in sync* (registered, current session token, no call
  failed since), every admit and release changes ``_held`` and ``held:R`` by
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
  own counts); releases change ``_held`` only.

* Re-registration waits until no call is in flight, then sends ``_held`` as
  the absolute truth with a fresh session token. Redis replaces ``held:R`` by
  it and fixes ``total`` by the difference; any old call that still arrives
  is refused for its stale token, so nothing that happened before can count
  twice or be lost. If ``_held`` changed while the call was out, it is sent
  again. A backend pushed over its cap by this (others admitted into slots
  reaped while this replica was away, or slots admitted locally meanwhile) is
  reported to ``on_excess`` so the gateway closes that many of its newest
  connections there.

* A background task renews the lease every ``lease_ttl / 3``; the same script
  reaps expired replicas. A replica stops admitting through Redis as soon as
  a renewal fails and in any case before its lease could expire by its own
  clock; it keeps its live connections either way. A renewal that ran alone
  (no other call of this replica in flight) also checks that Redis holds
  exactly ``_held`` for it: a difference means Redis lost writes it had
  acknowledged (a failover to a lagging replica), and ends the sync too.

A crash of this process loses nothing: its lease expires and the survivors
give its slots back. A crash of Redis loses nothing either: every replica
re-registers its truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from importlib import resources
from typing import Any, Literal

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from wsgate.admission.contract import (
    Admitted,
    Candidate,
    Limits,
    Reason,
    Rejected,
    Ticket,
    choose_backend,
)
from wsgate.admission.rate import gcra
from wsgate.config import RateConfig, redact_url

__all__ = [
    "SCRIPT",
    "HiredisPackingConnection",
    "LocalShare",
    "RedisStore",
    "StateUnavailable",
    "connect",
    "default_replica_id",
    "key_prefix",
    "run_script",
]

logger = logging.getLogger("wsgate.state")

SCRIPT = resources.files("wsgate.admission").joinpath("state.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

OnFailure = Literal["closed", "local"]

# Renewals (of lease_ttl/3 each) a backend's cap is remembered after it was
# last among the candidates: long enough for an unhealthy spell, not forever.
_CAPS_MEMORY_ROUNDS = 30
# A call that must not take effect late is void once this share of ``timeout``
# has passed by Redis's clock; the rest is left for its reply to come back.
_DEADLINE_SHARE = 0.8
# Per-client buckets kept while degraded before the full ones are swept.
_LOCAL_CLIENT_BUCKETS = 10_000


def key_prefix(namespace: str) -> str:
    """The hash tag every key of a namespace starts with (one Cluster slot)."""
    return "{wsgate:" + namespace + "}"


def default_replica_id() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StateUnavailable(Exception):
    """Redis did not answer in time, or answered with an error."""


class HiredisPackingConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis (C) instead of Python.

    redis-py's asyncio connections pack every command in Python, and every
    admission and release is a command: on the connection set-up path that
    packing was a tenth of the gateway's CPU. Everything else stays redis-py's.
    (``rediss://`` and ``unix://`` URLs keep redis-py's own connection classes.)
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # "SCRIPT LOAD" and the like are one name in redis-py, two words on the wire.
        if (isinstance(first, str) and " " in first) or (
            isinstance(first, bytes) and b" " in first
        ):
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client that never retries; callers bound each call with ``asyncio.timeout``.

    redis-py's own ``socket_timeout`` is off on purpose: it runs each write under
    ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that
    arrives as the write completes, and a cancelled admission must stay cancelled.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        connection_class=HiredisPackingConnection,
    )


Arg = str | int | float


async def run_script(client: aioredis.Redis, namespace: str, *args: Arg) -> Any:
    """EVALSHA the state script, loading it once when Redis does not know it."""
    key = key_prefix(namespace) + ":replicas"
    try:
        return await client.evalsha(SCRIPT_SHA, 1, key, *args)
    except NoScriptError:
        await client.script_load(SCRIPT)
        return await client.evalsha(SCRIPT_SHA, 1, key, *args)


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


def _pass_on(waiter: asyncio.Future[Any], reply: asyncio.Future[Any]) -> None:
    """Give a script call's outcome to the caller waiting for it, unless it stopped."""
    if waiter.done():
        return
    if reply.cancelled():
        waiter.cancel()
    elif (error := reply.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(reply.result())


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a failure as seen even when its caller stopped waiting for it."""
    if not future.cancelled():
        future.exception()


class ScriptPipeline:
    """Script calls made while another batch is out go to Redis together.

    The first call goes at once; calls made while a batch is on its way wait
    for it and then leave together as one pipeline (one write, one round trip).
    Each call stays its own atomic run of the script: batching only saves round
    trips and per-command work when many connections arrive at once.
    """

    def __init__(self, namespace: str, timeout: float):
        self._key = key_prefix(namespace) + ":replicas"
        self._timeout = timeout
        self._queue: list[tuple[tuple[Arg, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(self, client: aioredis.Redis, args: tuple[Arg, ...]) -> asyncio.Future[Any]:
        """The reply of one script call, or StateUnavailable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_consume)
        self._queue.append((args, future))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all(client))
        return future

    def cancel(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        for _, future in self._queue:
            future.cancel()
        self._queue = []

    async def _send_all(self, client: aioredis.Redis) -> None:
        while self._queue:
            batch = [(args, future) for args, future in self._queue if not future.done()]
            self._queue = []
            if batch:
                await self._send(client, batch)

    async def _send(
        self, client: aioredis.Redis, batch: list[tuple[tuple[Arg, ...], asyncio.Future[Any]]]
    ) -> None:
        calls = [args for args, _ in batch]
        try:
            async with asyncio.timeout(self._timeout):
                if len(calls) == 1:
                    results: list[Any] = [await self._one(client, calls[0])]
                else:
                    results = await self._many(client, calls)
        except (TimeoutError, RedisError, OSError) as error:
            results = [error] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(StateUnavailable(_describe(result)))
            else:
                future.set_result(result)

    async def _one(self, client: aioredis.Redis, args: tuple[Arg, ...]) -> Any:
        try:
            return await client.evalsha(SCRIPT_SHA, 1, self._key, *args)
        except NoScriptError:
            await client.script_load(SCRIPT)
            return await client.evalsha(SCRIPT_SHA, 1, self._key, *args)

    async def _many(self, client: aioredis.Redis, calls: list[tuple[Arg, ...]]) -> list[Any]:
        results = await self._pipelined(client, calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await client.script_load(SCRIPT)
            again = await self._pipelined(client, [calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipelined(self, client: aioredis.Redis, calls: list[tuple[Arg, ...]]) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for args in calls:
            pipe.evalsha(SCRIPT_SHA, 1, self._key, *args)
        return list(await pipe.execute(raise_on_error=False))


class LocalShare:
    """Admission while Redis is away (``on_failure: local``), without I/O.

    Each replica takes its share of everything shared: ``cap // live`` of each
    cap and ``1/live`` of the connect rate (``burst // live`` tokens), measured
    on its own held counts, so the replicas together stay within the limits as
    long as ``live`` is not an undercount. The per-client rate applies in full:
    a client's connections through this replica are all this replica sees.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._rate_tat: float | None = None
        self._client_tat: dict[str, float] = {}

    def admit(
        self,
        candidates: Sequence[Candidate],
        held: Mapping[str, int],
        *,
        live: int,
        limits: Limits,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
    ) -> str | Rejected:
        """The backend to use (the caller counts it as held), or why not."""
        live = max(1, live)
        shares = [Candidate(c.backend_id, c.cap // live) for c in candidates if c.cap >= live]
        backend = choose_backend(
            shares, lambda b: held.get(b, 0), least_loaded=least_loaded, preferred=preferred
        )
        if backend is None:
            return Rejected(Reason.NO_CAPACITY, limits.no_capacity_retry_after)
        now = self._clock()
        rate_tat: float | None = None
        if limits.connect_rate is not None:
            share = self._rate_share(limits.connect_rate, live)
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
            if len(self._client_tat) > _LOCAL_CLIENT_BUCKETS:
                self._client_tat = {k: t for k, t in self._client_tat.items() if t > now}
            self._client_tat[client_key] = client.tat
        if rate_tat is not None:
            self._rate_tat = rate_tat
        return backend

    @staticmethod
    def _rate_share(rate: RateConfig, live: int) -> RateConfig | None:
        if live == 1:
            return rate
        burst = rate.burst // live
        if burst < 1:
            return None
        return RateConfig(per_second=rate.per_second / live, burst=burst)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _pairs(flat: Sequence[Any]) -> dict[str, int]:
    return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


def _rate_args(rate: RateConfig | None) -> list[str]:
    return ["0", "0"] if rate is None else [repr(rate.per_second), str(rate.burst)]


class RedisStore:
    """Admission shared by every replica that uses the same Redis and namespace.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (a password may be in it).
        namespace: separates wsgate clusters sharing one Redis.
        replica_id: this process's name in the shared state; unique per process.
        lease_ttl: seconds a replica's slots outlive its last renewal.
        timeout: seconds any Redis call may take before Redis counts as unavailable.
        on_failure: ``closed`` (reject with 503) or ``local`` (local shares).
        limits: the connect-rate limits; the caps travel with the candidates.
    """

    kind = "redis"

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "default",
        replica_id: str | None = None,
        lease_ttl: float = 15.0,
        timeout: float = 0.1,
        on_failure: OnFailure = "closed",
        limits: Limits | None = None,
    ):
        if lease_ttl <= 0 or timeout <= 0:
            raise ValueError("lease_ttl and timeout must be positive")
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
        self._rate_argv: list[str] = []
        self.configure(self._limits)

        self._client: aioredis.Redis | None = None
        self._renew_every = lease_ttl / 3
        self._retry_every = min(self._renew_every, 1.0)
        # Stop admitting through Redis this long before the lease could expire.
        self._lease_margin = min(max(timeout, 0.05), lease_ttl / 3)

        self._token = ""
        self._in_sync = False
        self._lease_deadline = 0.0
        self._mode: str | None = None
        self._held: Counter[str] = Counter()
        # backend -> (cap, renewal round it was last a candidate in)
        self._caps: dict[str, tuple[int, int]] = {}
        self._round = 0
        self._global: dict[str, int] = {}
        self._live = 1
        self._rate_offset = 0.0  # seconds until the global bucket is full, when last seen
        self._rate_seen = 0.0
        self._local = LocalShare()

        self._pipeline = ScriptPipeline(namespace, timeout)
        self._server_offset: float | None = None  # Redis's clock minus time.monotonic()
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self._calls = 0  # Redis calls started, to tell a renewal that ran alone
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        self._renew_lock = asyncio.Lock()
        self._renew_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- life cycle -------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "ok" if self._mode == "ok" else "degraded"

    async def start(self, *, renew_in_background: bool = True) -> None:
        """Register and start renewing; a Redis that is down means ``degraded``, not an error.

        With ``renew_in_background=False`` nothing renews the lease unless the
        caller calls :meth:`renew_now` (tests that choose every step do this).
        """
        self._client = connect(self.url, self.timeout)
        await self.renew_now()
        if renew_in_background:
            self._renew_task = asyncio.create_task(self._renew_loop(), name="wsgate-lease")

    async def close(self) -> None:
        """Stop renewing and give every slot this replica still holds back at once."""
        self._closed = True
        await self._stop_renewing()
        if self._client is not None and self._in_sync:
            with contextlib.suppress(StateUnavailable):
                await self._call("leave", self.replica_id, self._token)
        await self._drop_client()

    async def abandon(self) -> None:
        """Stop renewing and disconnect without giving slots back.

        To the other replicas this looks exactly like a crash: the slots come
        back when the lease expires. Tests use it; so may a process that must
        exit at once.
        """
        self._closed = True
        await self._stop_renewing()
        await self._drop_client()

    async def _stop_renewing(self) -> None:
        task, self._renew_task = self._renew_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _drop_client(self) -> None:
        self._pipeline.cancel()
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def configure(self, limits: Limits) -> None:
        self._limits = limits
        self._rate_argv = [
            *_rate_args(limits.connect_rate),
            *_rate_args(limits.client_connect_rate),
        ]

    # -- admission --------------------------------------------------------------

    async def admit(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None = None,
        least_loaded: bool = False,
        preferred: str | None = None,
    ) -> Admitted | Rejected:
        limits = self._limits
        if not candidates:
            return Rejected(Reason.NO_HEALTHY_BACKEND, limits.no_capacity_retry_after)
        caps, now_round = self._caps, self._round
        argv: list[Arg] = [
            self.replica_id,
            self._token,
            "1" if least_loaded else "0",
            preferred or "",
            self._rate_argv[0],
            self._rate_argv[1],
            client_key or "",
            self._rate_argv[2],
            self._rate_argv[3],
        ]
        for candidate in candidates:
            caps[candidate.backend_id] = (candidate.cap, now_round)
            argv.append(candidate.backend_id)
            argv.append(candidate.cap)

        if self._in_sync and time.monotonic() >= self._lease_deadline:
            self._lose_sync("lease not renewed in time")
        if self._in_sync:
            try:
                reply = await self._call(
                    "admit", *argv, expires=True, abandoned=self._undo_admission
                )
            except StateUnavailable as error:
                self._lose_sync(str(error))
            else:
                # No await from here on: the reply and _held change together.
                status = _text(reply[0])
                if status == "late":
                    self._lose_sync("Redis answered after the deadline")
                elif status != "stale":
                    return self._absorb_admit(status, reply, candidates)
                else:
                    self._lose_sync("lease lost")
        return self._admit_degraded(
            candidates, client_key=client_key, least_loaded=least_loaded, preferred=preferred
        )

    def _absorb_admit(
        self, status: str, reply: Sequence[Any], candidates: Sequence[Candidate]
    ) -> Admitted | Rejected:
        self._live = int(reply[4])
        self._rate_offset = float(reply[3]) / 1e6
        self._rate_seen = time.monotonic()
        counts = self._global
        for candidate, count in zip(candidates, reply[5:], strict=False):
            counts[candidate.backend_id] = int(count)
        if status == "ok":
            backend = _text(reply[1])
            self._held[backend] += 1
            return Admitted(Ticket(backend))
        wait = float(reply[2]) / 1e6
        if status == "rate_limited":
            return Rejected(Reason.RATE_LIMITED, wait)
        if status == "client_rate_limited":
            return Rejected(Reason.CLIENT_RATE_LIMITED, wait)
        return Rejected(Reason.NO_CAPACITY, self._limits.no_capacity_retry_after)

    def _admit_degraded(
        self,
        candidates: Sequence[Candidate],
        *,
        client_key: str | None,
        least_loaded: bool,
        preferred: str | None,
    ) -> Admitted | Rejected:
        if self.on_failure == "closed":
            return Rejected(Reason.STATE_UNAVAILABLE, max(1.0, math.ceil(self._retry_every)))
        decision = self._local.admit(
            candidates,
            self._held,
            live=self._live,
            limits=self._limits,
            client_key=client_key,
            least_loaded=least_loaded,
            preferred=preferred,
        )
        if isinstance(decision, Rejected):
            return decision
        self._held[decision] += 1
        return Admitted(Ticket(decision))

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
        backend = ticket.backend_id
        self._held[backend] -= 1
        if self._held[backend] <= 0:
            del self._held[backend]
        if backend in self._global:
            self._global[backend] = max(0, self._global[backend] - 1)
        client = self._client
        if not self._in_sync or client is None:
            return None  # re-registration will carry the new truth
        self._in_flight += 1
        self._calls += 1
        self._idle.clear()
        reply = self._pipeline.submit(client, ("release", 0, self.replica_id, self._token, backend))
        reply.add_done_callback(functools.partial(self._released, backend))
        return reply

    def _released(self, backend: str, reply: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if not self._in_flight:
            self._idle.set()
        if reply.cancelled():
            self._lose_sync("a release was not sent")
            return
        error = reply.exception()
        if error is not None:
            self._lose_sync(str(error))
        elif _text(reply.result()[0]) == "stale":
            self._lose_sync("lease lost")
        else:
            self._global[backend] = int(reply.result()[1])

    def _undo_admission(self, reply: asyncio.Future[Any]) -> None:
        """The caller of ``admit`` was cancelled: give back what Redis reserved for it."""
        if reply.cancelled() or reply.exception() is not None:
            self._lose_sync("an admission was abandoned before Redis answered")
            return
        result = reply.result()
        if _text(result[0]) == "ok" and self._in_sync:
            self._spawn(self._give_back(_text(result[1])))

    async def _give_back(self, backend: str) -> None:
        try:
            reply = await self._call("release", self.replica_id, self._token, backend)
        except StateUnavailable as error:
            self._lose_sync(str(error))
            return
        if _text(reply[0]) == "stale":
            self._lose_sync("lease lost")

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
        if want <= 0 or per_second <= 0 or not self._in_sync:
            return 0
        burst = max(1, math.ceil(per_second))
        try:
            granted = await self._call("close_tokens", repr(per_second), burst, want)
        except StateUnavailable as error:
            self._lose_sync(str(error))
            return 0
        return int(granted)

    # -- what the replica knows -------------------------------------------------

    def global_counts(self) -> Mapping[str, int]:
        return {backend: count for backend, count in self._global.items() if count > 0}

    def local_counts(self) -> Mapping[str, int]:
        return dict(self._held)

    def tokens_available(self) -> float | None:
        rate = self._limits.connect_rate
        if rate is None:
            return None
        pending = max(0.0, self._rate_offset - (time.monotonic() - self._rate_seen))
        return max(0.0, min(float(rate.burst), rate.burst - pending * rate.per_second))

    def live_replicas(self) -> int:
        return self._live

    async def snapshot(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "mode": self.mode,
            "store": redact_url(self.url),
            "namespace": self.namespace,
            "replica_id": self.replica_id,
            "on_failure": self.on_failure,
            "lease_ttl": self.lease_ttl,
            "lease_left": max(0.0, self._lease_deadline + self._lease_margin - time.monotonic())
            if self._in_sync
            else 0.0,
            "live_replicas": self._live,
            "global": dict(self.global_counts()),
            "local": dict(self.local_counts()),
            "tokens": self.tokens_available(),
        }

    # -- leases -----------------------------------------------------------------

    async def renew_now(self) -> None:
        """One renewal, or a re-registration when the replica is out of sync."""
        async with self._renew_lock:
            if self._closed or self._client is None:
                return
            if self._in_sync and time.monotonic() >= self._lease_deadline:
                self._lose_sync("lease not renewed in time")
            if self._in_sync:
                await self._renew()
            if not self._in_sync:
                await self._register()

    async def _renew_loop(self) -> None:
        while not self._closed:
            delay = self._renew_every if self._in_sync else self._retry_every
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            try:
                await self.renew_now()
            except Exception:  # the lease must outlive any surprise
                logger.exception("lease renewal failed unexpectedly")
            self._wake.clear()

    async def _renew(self) -> None:
        sent = time.monotonic()
        quiet = self._in_flight == 0
        calls = self._calls
        try:
            reply = await self._call(
                "renew",
                self.replica_id,
                self._token,
                self._ttl_ms(),
                "0",
                "",
                *self._renew_tail({}),
            )
        except StateUnavailable as error:
            self._lose_sync(str(error))
            return
        self._absorb_renewal(reply, sent)
        if _text(reply[0]) == "lost":
            self._lose_sync("lease lost")
            return
        self._lease_deadline = sent + self.lease_ttl - self._lease_margin
        # When nothing else ran meanwhile, what Redis holds for this replica must be
        # its truth exactly. It differs only if Redis lost writes it had acknowledged
        # (a failover to a lagging replica): then register the truth again.
        quiet = quiet and self._in_flight == 0 and self._calls == calls + 1
        if quiet and _pairs(reply[6]) != {b: n for b, n in self._held.items() if n > 0}:
            self._lose_sync("Redis lost some of this replica's slots")

    async def _register(self) -> None:
        """Send this replica's truth with a new token, until Redis has exactly it."""
        for _attempt in range(3):
            if not await self._wait_idle():
                return
            truth = {backend: count for backend, count in self._held.items() if count > 0}
            token = secrets.token_hex(8)
            sent = time.monotonic()
            try:
                reply = await self._call(
                    "renew",
                    self.replica_id,
                    self._token,
                    self._ttl_ms(),
                    "1",
                    token,
                    *self._renew_tail(truth),
                    expires=True,
                )
            except StateUnavailable as error:
                self._lose_sync(str(error))
                return
            if _text(reply[0]) == "late":
                self._server_offset = None  # learn the clock again from a plain renewal
                self._lose_sync("Redis answered after the deadline")
                return
            self._token = token
            self._lease_deadline = sent + self.lease_ttl - self._lease_margin
            self._absorb_renewal(reply, sent)
            now = {backend: count for backend, count in self._held.items() if count > 0}
            if now != truth:
                continue  # released or admitted locally meanwhile: send the new truth
            self._in_sync = True
            self._set_mode(
                "ok",
                f"registered as {self.replica_id} with {sum(truth.values())} live slots, "
                f"{self._live} live replicas",
            )
            self._report_excess(_pairs(reply[4]))
            return

    async def _wait_idle(self) -> bool:
        """Wait for every call in flight to settle (each is bounded by ``timeout``)."""
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                while self._in_flight:
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _renew_tail(self, held: Mapping[str, int]) -> list[Arg]:
        tail: list[Arg] = [len(held)]
        for backend, count in held.items():
            tail += [backend, count]
        # Backends that were no candidate for many renewals are gone: forget them.
        self._round += 1
        horizon = self._round - _CAPS_MEMORY_ROUNDS
        self._caps = {b: seen for b, seen in self._caps.items() if seen[1] >= horizon}
        tail.append(len(self._caps))
        for backend, (cap, _) in self._caps.items():
            tail += [backend, cap]
        tail += self._rate_argv
        return tail

    def _ttl_ms(self) -> int:
        return max(1, round(self.lease_ttl * 1000))

    def _absorb_renewal(self, reply: Sequence[Any], sent: float) -> None:
        received = time.monotonic()
        if received - sent <= self.timeout / 4:
            # Redis's clock in our monotonic terms, to within half a quick round trip.
            self._server_offset = float(reply[7]) / 1e6 - (sent + received) / 2
        self._live = max(1, int(reply[1]))
        self._rate_offset = float(reply[2]) / 1e6
        self._rate_seen = time.monotonic()
        if _text(reply[0]) == "ok":
            self._global = _pairs(reply[3])
        reaped = [_text(name) for name in reply[5]]
        if reaped:
            logger.info("lease expired for %s: their slots are free again", ", ".join(reaped))

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

    def _lose_sync(self, reason: str) -> None:
        self._in_sync = False
        if self._closed:
            return
        if self.on_failure == "closed":
            policy = "rejecting new connections (on_failure: closed)"
        else:
            policy = f"admitting within local shares of {self._live} replicas (on_failure: local)"
        self._set_mode("degraded", f"shared state unavailable ({reason}): {policy}")
        self._wake.set()

    def _set_mode(self, mode: str, message: str) -> None:
        if self._mode == mode:
            return
        self._mode = mode
        (logger.info if mode == "ok" else logger.warning)("%s", message)

    async def _call(
        self,
        op: str,
        *args: Arg,
        expires: bool = False,
        abandoned: Callable[[asyncio.Future[Any]], None] | None = None,
    ) -> Any:
        """One script call, bounded by ``timeout``.

        With ``expires``, Redis voids the call if it runs after this replica has
        given up waiting for it (see the deadline in state.lua). If the caller is
        cancelled, the call still completes; ``abandoned`` then gets its outcome,
        so that what it did in Redis can be undone.
        """
        client = self._client
        if client is None:
            raise StateUnavailable("not connected")
        deadline = 0
        if expires and self._server_offset is not None:
            until = time.monotonic() + self._server_offset + self.timeout * _DEADLINE_SHARE
            deadline = round(until * 1e6)
        self._in_flight += 1
        self._calls += 1
        self._idle.clear()
        reply = self._pipeline.submit(client, (op, deadline, *args))
        # The caller waits on a future of its own, so that its cancellation or its
        # timeout leaves the reply to the pipeline (what asyncio.shield and
        # asyncio.timeout would do, for one future and one timer: this runs once
        # per admission).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        reply.add_done_callback(functools.partial(_pass_on, waiter))
        timer = loop.call_later(self.timeout, _expire, waiter)
        try:
            return await waiter
        except TimeoutError:
            reply.cancel()  # not sent yet: never send it
            raise StateUnavailable(f"no answer within {self.timeout * 1000:g}ms") from None
        except asyncio.CancelledError:
            if abandoned is not None:
                reply.add_done_callback(abandoned)
            raise
        finally:
            timer.cancel()
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
