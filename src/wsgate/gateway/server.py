"""The gateway: its listener, its backends, its admission store, and its life cycle.

:class:`Gateway` ties the pieces together. The protocols in :mod:`.proxy` call
back into it to admit (policy + affinity + store + queue), release, log, and
turn an upgraded exchange into a session. Everything here runs on one event
loop; a decision on the memory store never awaits between reading and writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import deque
from typing import Any

from wsgate.admission import AdmissionStore, Admitted, Candidate, Limits, Reason, Rejected, Ticket
from wsgate.admission.memory import MemoryStore
from wsgate.balancing import cookie_token, make_policy, rendezvous_order
from wsgate.config import Config, parse_address
from wsgate.gateway.connector import Connector
from wsgate.gateway.head import RequestHead
from wsgate.gateway.proxy import Downstream, Exchange, Session
from wsgate.gateway.stats import Stats
from wsgate.upstreams.health import HealthChecker
from wsgate.upstreams.pool import BackendPool

__all__ = ["Gateway", "limits_of", "open_store"]

log = logging.getLogger("wsgate.gateway")
access = logging.getLogger("wsgate.access")

# Queued connections re-ask the store this often, to see slots other replicas freed.
QUEUE_POLL = 0.25
HOUSEKEEPING_INTERVAL = 1.0


def limits_of(config: Config) -> Limits:
    limits = config.limits
    return Limits(
        connect_rate=limits.connect_rate,
        client_connect_rate=limits.client_connect_rate,
        no_capacity_retry_after=limits.retry_after,
    )


def open_store(config: Config, replica_id: str) -> AdmissionStore:
    """The store the config names: embedded memory, or Redis shared by replicas."""
    state = config.state
    if state.store == "memory":
        return MemoryStore(limits_of(config))
    from wsgate.admission.redis import RedisStore

    return RedisStore(
        state.store,
        namespace=state.namespace,
        replica_id=replica_id,
        lease_ttl=state.lease_ttl,
        timeout=state.timeout,
        on_failure=state.on_failure,
        limits=limits_of(config),
    )


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        store: AdmissionStore | None = None,
        replica_id: str | None = None,
        sock: socket.socket | None = None,
    ):
        self.config = config
        self.replica_id = replica_id or config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = store or open_store(config, self.replica_id)
        self.pool = BackendPool(config.limits.max_connections_per_backend, config.health.passive)
        self.policy = make_policy(config.balance)
        self.stats = Stats()
        self.sessions: set[Session] = set()
        self.downstreams: set[Downstream] = set()
        self.connector = Connector(self)
        self.health = HealthChecker(self.pool, config.health)
        self.loop = asyncio.get_event_loop_policy().get_event_loop()
        self.draining = False
        self.ready = False
        self.started_at = time.time()
        self._sock = sock
        self._server: asyncio.Server | None = None
        self._waiters: deque[asyncio.Event] = deque()
        self._background: set[asyncio.Task[Any]] = set()
        self._cookie_ids: dict[str, str] = {}
        self.pool.on_change.append(self._pool_changed)
        self.stopped = asyncio.Event()

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        await self.store.start()
        if isinstance(self.config.backends, list):
            self.pool.update(self.config.backends, initial=True)
        self.health.sync()
        if self._sock is not None:
            self._server = await self.loop.create_server(
                lambda: Downstream(self), sock=self._sock, backlog=4096
            )
        else:
            host, port = parse_address(self.config.listen)
            self._server = await self.loop.create_server(
                lambda: Downstream(self), host, port, backlog=4096, reuse_address=True
            )
        self.spawn(self._housekeeping(), "housekeeping")
        self.ready = True
        log.info(
            "gateway %s listening on %s with %d backends, store %s",
            self.replica_id, self.config.listen, len(self.pool), self.store.kind,
        )  # fmt: skip

    @property
    def listening(self) -> list[tuple[str, int]]:
        if self._server is None:
            return []
        return [s.getsockname()[:2] for s in self._server.sockets]

    def spawn(self, coroutine: Any, name: str) -> asyncio.Task[Any]:
        task = self.loop.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Stop taking connections and close the live ones gently, within drain_timeout."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d sessions", len(self.sessions))
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.close_gracefully(1001, "drain")
        for down in list(self.downstreams):
            if down.task is None:
                down.close()  # idle keep-alive: nothing in flight
        deadline = self.loop.time() + self.config.drain_timeout
        # Polled, not signalled: drain happens once, and the data path stays free
        # of bookkeeping for it.
        while self.busy and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    @property
    def busy(self) -> bool:
        """Sessions or HTTP exchanges still in flight."""
        return bool(self.sessions) or any(d.task for d in self.downstreams)

    @property
    def queued(self) -> int:
        """Connections waiting in the admission queue for a slot."""
        return len(self._waiters)

    async def stop(self) -> None:
        self.ready = False
        if self._server is not None:
            self._server.close()
        for session in list(self.sessions):
            session.finish("gateway_stopped")
        for down in list(self.downstreams):
            down.close()
        self.connector.close()
        await self.health.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Let transports finish closing (and their releases run) before the store goes.
        await asyncio.sleep(0)
        await self.store.close()
        self.stopped.set()

    async def _housekeeping(self) -> None:
        idle_timeout = self.config.timeouts.idle
        last_bytes: dict[Session, int] = {}
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.connector.expire_idle()
            self.pool.forget_drained()
            if idle_timeout:
                now_bytes = {s: s.bytes_in + s.bytes_out for s in self.sessions}
                for session, total in now_bytes.items():
                    if session.age > idle_timeout and last_bytes.get(session) == total:
                        session.finish("idle_timeout")
                last_bytes = now_bytes

    # -- admission ----------------------------------------------------------------------------
    def _pool_changed(self) -> None:
        self._cookie_ids = {cookie_token(b.id): b.id for b in self.pool}

    def _affinity(
        self, head: RequestHead, client_ip: str, candidates: list[Candidate]
    ) -> tuple[str | None, str]:
        """(the affine backend, the hash key) of this request under the affinity setting."""
        affinity = self.config.affinity
        if affinity.by == "cookie":
            token = head.cookie(affinity.cookie)
            backend_id = self._cookie_ids.get(token) if token else None
            known = any(c.backend_id == backend_id for c in candidates)
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
        return (rendezvous_order(candidates, key)[0].backend_id if candidates else None), key

    async def admit(
        self, head: RequestHead, client_ip: str, *, exclude: set[str]
    ) -> tuple[Admitted | Rejected, str | None]:
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
            for backend_id in self._candidate_ids(exclude):
                backend = self.pool.get(backend_id)
                if backend is not None:
                    backend.rejected_total += 1
        return decision, preferred

    def _candidate_ids(self, exclude: set[str]) -> list[str]:
        return [c.backend_id for c in self.pool.candidates() if c.backend_id not in exclude]

    async def _decide(
        self, head: RequestHead, client_ip: str, exclude: set[str]
    ) -> tuple[Admitted | Rejected, str | None]:
        candidates = [c for c in self.pool.candidates() if c.backend_id not in exclude]
        preferred, key = self._affinity(head, client_ip, candidates)
        counts = self.store.global_counts()
        plan = self.policy.plan(
            candidates, key=key, load=lambda b: counts.get(b, 0), preferred=preferred
        )
        started = time.perf_counter()
        decision = await self.store.admit(
            plan.candidates,
            client_key=client_ip,
            least_loaded=plan.least_loaded,
            preferred=plan.preferred,
        )
        self.stats.admission_latency.observe(time.perf_counter() - started)
        return decision, preferred

    async def _queued(
        self, head: RequestHead, client_ip: str, exclude: set[str]
    ) -> Admitted | Rejected:
        """Wait in FIFO order for a slot, up to queue.timeout."""
        queue = self.config.limits.queue
        if len(self._waiters) >= queue.max:
            return Rejected(Reason.NO_CAPACITY, self.config.limits.retry_after)
        wake = asyncio.Event()
        self._waiters.append(wake)
        deadline = self.loop.time() + queue.timeout
        try:
            while True:
                remaining = deadline - self.loop.time()
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

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        store = self.store
        if isinstance(store, MemoryStore):
            store.release_now(ticket)
        else:
            self.spawn(store.release(ticket), "release")
        if self._waiters:
            self._waiters[0].set()

    # -- exchanges and sessions ---------------------------------------------------------------
    def response_headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        affinity = self.config.affinity
        if affinity.by != "cookie":
            return []
        token = cookie_token(exchange.backend.id)
        if exchange.request.head.cookie(affinity.cookie) == token:
            return []
        cookie = f"{affinity.cookie}={token}; Path=/; HttpOnly; SameSite=Lax"
        return [(b"Set-Cookie", cookie.encode())]

    def start_session(self, exchange: Exchange, rest: bytes) -> None:
        down, up = exchange.down, exchange.up
        assert down.transport is not None and up.transport is not None
        self.downstreams.discard(down)
        Session(exchange, down.transport, up.transport).start(rest)

    def access_log(self, **fields: Any) -> None:
        if not self.config.access_log or not access.isEnabledFor(logging.INFO):
            return
        record = {"time": round(time.time(), 3), "replica": self.replica_id}
        record.update((k, v) for k, v in fields.items() if v is not None)
        duration = fields.get("duration")
        if isinstance(duration, float):
            record["duration"] = round(duration, 4)
        access.info(json.dumps(record, separators=(",", ":")))
