"""The gateway: its listener, its backends, its admission store, and its life cycle.

:class:`Gateway` ties the pieces together. The protocols in :mod:`.proxy` call
back into it to admit (policy + affinity + store + queue), release, log, and
turn an upgraded exchange into a session. Everything here runs on one event
loop; a decision on the memory store never awaits between reading and writing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

from wsgate.admission import AdmissionStore, Admitted, Candidate, Limits, Reason, Rejected, Ticket
from wsgate.admission.memory import MemoryStore
from wsgate.balancing import cookie_token, make_policy, rendezvous_order
from wsgate.config import (
    BackendSpec,
    Config,
    ConfigError,
    DnsDiscovery,
    FileDiscovery,
    parse_address,
)
from wsgate.gateway._relay import Relay
from wsgate.gateway.access_log import AccessLog
from wsgate.gateway.connector import Connector
from wsgate.gateway.head import RequestHead
from wsgate.gateway.proxy import CLOSE_GRACE, Downstream, Exchange, Session
from wsgate.gateway.stats import Stats
from wsgate.upstreams.discovery import BackendSource, source_for
from wsgate.upstreams.health import HealthChecker
from wsgate.upstreams.pool import BackendPool
from wsgate.upstreams.rebalance import ArrivalEstimate, local_share, plan_moves, spread

__all__ = ["RESTART_KEYS", "Gateway", "limits_of", "open_store"]

log = logging.getLogger("wsgate.gateway")

# Queued connections re-ask the store this often, to see slots other replicas freed.
QUEUE_POLL = 0.25
HOUSEKEEPING_INTERVAL = 1.0
# Descriptors kept open for hand-overs at the open-files limit: each session
# handed to the relay in one loop iteration may need two of them.
SPARE_DESCRIPTORS = 16
# How long start waits for the first discovery snapshot before listening anyway.
DISCOVERY_START_WAIT = 5.0
# A client closed by the rebalancer counts as on its way back this long (see ArrivalEstimate).
RECONNECT_WINDOW = 10.0
# Keys a running gateway cannot change: a reload keeps their running values.
RESTART_KEYS = ("listen", "admin", "admin_token", "state", "replica_id")


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
        reuse_port: bool = False,
    ):
        self.config = config
        self.reuse_port = reuse_port  # several worker processes share the listen port
        self.replica_id = replica_id or config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = store or open_store(config, self.replica_id)
        self.pool = BackendPool(config.limits.max_connections_per_backend, config.health.passive)
        self.policy = make_policy(config.balance)
        self.stats = Stats()
        self.sessions: set[Session] = set()
        # Established sessions are relayed in C; a session hears from it when it ends.
        self.relay = Relay(Session.finish, linger=CLOSE_GRACE)
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
        self._discovery: asyncio.Task[None] | None = None
        self._arrivals = ArrivalEstimate(RECONNECT_WINDOW)
        self._drain_cut = asyncio.Event()
        self.pool.on_change.append(self._pool_changed)
        self.stopped = asyncio.Event()
        self._access = AccessLog()
        self._spare_fds: list[int] = []
        self._request_prefix = os.urandom(6).hex()
        self._request_serials = itertools.count(1)
        self.store.on_excess = self._close_excess

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        backends = self.config.backends
        # A discovery source that cannot even be built is a config mistake: say so first.
        source = None if isinstance(backends, list) else self._source(backends)
        await self.store.start()
        if isinstance(backends, list):
            self.pool.update(backends, initial=True)
            self.health.sync()
        elif source is not None:
            await self._follow_discovery(source, initial=True, wait=DISCOVERY_START_WAIT)
        if self._sock is not None:
            self._server = await self.loop.create_server(
                lambda: Downstream(self), sock=self._sock, backlog=4096
            )
        else:
            host, port = parse_address(self.config.listen)
            self._server = await self.loop.create_server(
                lambda: Downstream(self),
                host,
                port,
                backlog=4096,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
        self.loop.add_reader(self.relay.fileno(), self.relay.report)
        self.keep_spare_descriptors()
        self.spawn(self._housekeeping(), "housekeeping")
        self.spawn(self._rebalance_forever(), "rebalance")
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
        started = self.loop.time()
        deadline = started + self.config.drain_timeout
        # Polled, not signalled: drain happens once, and the data path stays free
        # of bookkeeping for it.
        while self.busy and self.loop.time() < deadline and not self._drain_cut.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        took = self.loop.time() - started
        if self.busy:
            requests = sum(1 for d in self.downstreams if d.task is not None)
            log.warning(
                "drain stopped after %.1fs with %d sessions and %d requests open: cutting them",
                took, len(self.sessions), requests,
            )  # fmt: skip
        else:
            log.info("drained in %.1fs: every connection closed", took)

    def cut_drain(self) -> None:
        """End a drain in progress now (a second SIGTERM): what is still open gets cut."""
        self._drain_cut.set()

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
        # Let transports finish closing, and so release their slots, before the store
        # closes (for Redis, the releases leave before the store's own goodbye).
        await asyncio.sleep(0)
        await self.store.close()
        # Close frames still on their way to slow clients had the stop's time to leave.
        self.loop.remove_reader(self.relay.fileno())
        self.relay.close()
        while self._spare_fds:
            os.close(self._spare_fds.pop())
        self._access.flush()
        self.stopped.set()

    async def _housekeeping(self) -> None:
        last_bytes: dict[Session, int] = {}
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.keep_spare_descriptors()
            idle_timeout = self.config.timeouts.idle  # read each round: a reload may change it
            self.connector.expire_idle()
            known = len(self.pool)
            self.pool.forget_drained()
            if len(self.pool) != known:
                self.health.sync()  # stop checking backends that have drained and left
            self.pool.end_ejections()
            if idle_timeout:
                now_bytes = {s: s.bytes_in + s.bytes_out for s in self.sessions}
                for session, total in now_bytes.items():
                    if session.age > idle_timeout and last_bytes.get(session) == total:
                        session.finish("idle_timeout")
                last_bytes = now_bytes

    # -- backends that come and go -----------------------------------------------------------
    @staticmethod
    def _source(config: DnsDiscovery | FileDiscovery) -> BackendSource:
        try:
            return source_for(config)
        except ValueError as error:
            raise ConfigError(f"backends: {error}") from None

    async def _follow_discovery(
        self, source: BackendSource, *, initial: bool, wait: float = 0.0
    ) -> None:
        """Feed ``source``'s snapshots into the pool from now on; wait up to ``wait``
        seconds for the first one."""
        if self._discovery is not None:
            self._discovery.cancel()
        first = self.loop.create_future()
        self._discovery = self.spawn(self._discover(source, initial, first), "discovery")
        if wait > 0:
            try:
                await asyncio.wait_for(asyncio.shield(first), wait)
            except TimeoutError:
                log.warning("no backends from %s after %.0fs; listening anyway", source, wait)

    async def _discover(
        self, source: BackendSource, initial: bool, first: asyncio.Future[None]
    ) -> None:
        log.info("following backends from %s every %gs", source, source.refresh)
        while True:
            try:
                async for specs in source.snapshots():
                    self.apply_backends(specs, initial=initial)
                    initial = False
                    if not first.done():
                        first.set_result(None)
            except Exception:
                # Sources report their own failures; this is for the unforeseen ones.
                log.exception("following %s failed; trying again", source)
            await asyncio.sleep(source.refresh)

    def apply_backends(self, specs: Iterable[BackendSpec], *, initial: bool = False) -> None:
        """Make the pool match ``specs`` (a snapshot); drain the backends that left.

        New backends take connections once healthy (at start: at once, as with a
        static list). A backend that left takes no new connections, and its live
        sessions are closed with 1001 at a frame boundary.
        """
        added, removed = self.pool.update(specs, initial=initial)
        self.health.sync()
        for backend in added:
            wait = "" if backend.healthy else ", waiting for its health checks"
            log.info("backend %s (%s) added%s", backend.id, backend.address, wait)
        for backend in removed:
            sessions = list(backend.connections)
            log.info(
                "backend %s (%s) removed: no new connections, closing its %d sessions",
                backend.id, backend.address, len(sessions),
            )  # fmt: skip
            self.connector.drop_idle(backend.id)
            for session in sessions:
                session.close_gracefully(1001, "backend_removed")

    # -- hot reload ---------------------------------------------------------------------------
    def reload(self, new: Config) -> list[str]:
        """Apply ``new`` to the running gateway without dropping a live connection.

        Keys in :data:`RESTART_KEYS` keep their running values (logged). Limits and
        caps apply to new connections only. Returns the top-level keys applied.

        Raises:
            ConfigError: ``new`` cannot be applied (nothing was changed).
        """
        old = self.config
        fixed = [key for key in RESTART_KEYS if getattr(new, key) != getattr(old, key)]
        if fixed:
            log.warning(
                "config reload: %s cannot change while running (restart to apply); "
                "keeping the running value", ", ".join(fixed),
            )  # fmt: skip
            new = new.model_copy(update={key: getattr(old, key) for key in fixed})
        changed = [key for key in type(new).model_fields if getattr(new, key) != getattr(old, key)]
        source = None
        if new.backends != old.backends and not isinstance(new.backends, list):
            source = self._source(new.backends)
        policy = make_policy(new.balance) if new.balance != old.balance else self.policy

        self.config = new
        self.policy = policy
        self.store.configure(limits_of(new))
        self.pool.default_cap = new.limits.max_connections_per_backend
        self.pool.passive = new.health.passive
        self.health.config = new.health
        if new.backends != old.backends:
            if source is not None:
                self.spawn(self._follow_discovery(source, initial=False), "discovery-start")
            else:
                if self._discovery is not None:
                    self._discovery.cancel()
                    self._discovery = None
                assert isinstance(new.backends, list)
                self.apply_backends(new.backends)
        self.health.sync()
        self._pool_changed()
        log.info("config reloaded: %s", ", ".join(changed) if changed else "nothing changed")
        return changed

    # -- moving and ending long-lived sessions ----------------------------------------------
    async def _rebalance_forever(self) -> None:
        while True:
            interval = max(self.config.rebalance.interval, 0.05)
            # Jittered, so replicas seldom plan from the same counts at the same moment.
            await asyncio.sleep(interval * random.uniform(0.75, 1.25))
            if self.draining:
                continue
            try:
                await self.close_due_sessions()
            except Exception:
                log.exception("rebalancing failed; trying again next round")

    async def close_due_sessions(self) -> int:
        """One round: close sessions past max_connection_duration, and the sessions the
        rebalance plan gives this replica, within the shared close budget.

        Returns how many sessions were asked to close.
        """
        config = self.config
        rebalance = config.rebalance
        expired: list[Session] = []
        limit = config.max_connection_duration
        if limit:
            now = time.monotonic()
            expired = [
                s
                for s in self.sessions
                if not s.closing_code and now - s.started >= limit * s.duration_factor
            ]
            expired.sort(key=lambda s: s.started)
        moving = await self._rebalance_plan() if rebalance.enabled else []
        due = set(expired)
        wanted = expired + [s for s in moving if s not in due]
        if not wanted:
            return 0
        granted = await self.store.acquire_close_tokens(rebalance.rate, len(wanted))
        closed: Counter[str] = Counter()
        for session in wanted[:granted]:
            reason = "max_duration" if session in due else "rebalance"
            if session.close_gracefully(rebalance.close_code, reason):
                closed[f"{reason} on {session.backend.id}"] += 1
        if closed:
            log.info(
                "closing %s with %d (%d wanted, budget %g/s for all replicas)",
                ", ".join(f"{n} for {what}" for what, n in sorted(closed.items())),
                rebalance.close_code, len(wanted), rebalance.rate,
            )  # fmt: skip
        return sum(closed.values())

    async def _rebalance_plan(self) -> list[Session]:
        """This replica's sessions to move now, most loaded backend and oldest first."""
        max_skew = self.config.rebalance.max_skew
        caps = {c.backend_id: c.cap for c in self.pool.candidates()}
        counts = self.store.global_counts()
        if len(caps) < 2 or spread(counts, caps) <= max_skew:
            self._arrivals.observe(self.loop.time(), sum(counts.values()))
            return []
        # The plan must come from counts as fresh as the store can give.
        await self.store.refresh()
        counts = self.store.global_counts()
        mine: dict[str, list[Session]] = {}
        closing: Counter[str] = Counter()
        for session in self.sessions:
            if session.closing_code:
                closing[session.backend.id] += 1
            else:
                mine.setdefault(session.backend.id, []).append(session)
        # Sessions already closing are gone for the plan, and on their way back.
        arriving = self._arrivals.observe(self.loop.time(), sum(counts.values()))
        arriving += sum(closing.values())
        visible = {b: max(0, n - closing[b]) for b, n in counts.items()}
        moves = plan_moves(visible, caps, max_skew, arriving=arriving)
        share = local_share(
            moves,
            visible,
            {b: len(sessions) for b, sessions in mine.items()},
            tail=lambda p: random.random() < p,
        )
        chosen: list[Session] = []
        loads = {b: visible.get(b, 0) / caps[b] for b in share if b in caps}
        for backend_id in sorted(share, key=lambda b: -loads.get(b, 0.0)):
            oldest = sorted(mine[backend_id], key=lambda s: s.started)
            chosen.extend(oldest[: share[backend_id]])
        return chosen

    def _close_excess(self, backend_id: str, count: int) -> None:
        """The shared state found this replica over a cap: close its newest sessions there."""
        backend = self.pool.get(backend_id)
        if backend is None:
            return
        newest = sorted(backend.connections, key=lambda s: s.started, reverse=True)
        for session in newest[:count]:
            session.close_gracefully(1013, "excess")

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

    def _global_load(self, backend_id: str) -> int:
        return self.store.global_counts().get(backend_id, 0)

    def _candidate_ids(self, exclude: set[str]) -> list[str]:
        return [c.backend_id for c in self.pool.candidates() if c.backend_id not in exclude]

    async def _decide(
        self, head: RequestHead, client_ip: str, exclude: set[str]
    ) -> tuple[Admitted | Rejected, str | None]:
        candidates = self.pool.candidates()
        if exclude:
            candidates = [c for c in candidates if c.backend_id not in exclude]
        preferred, key = self._affinity(head, client_ip, candidates)
        plan = self.policy.plan(candidates, key=key, load=self._global_load, preferred=preferred)
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

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        self.store.release_now(ticket)
        if self._waiters:
            self._waiters[0].set()

    # -- exchanges and sessions ---------------------------------------------------------------
    def response_headers(self, exchange: Exchange) -> list[tuple[bytes, bytes]]:
        affinity = self.config.affinity
        if affinity.by != "cookie":
            return []
        token = cookie_token(exchange.slot.backend.id)
        if exchange.request.head.cookie(affinity.cookie) == token:
            return []
        cookie = f"{affinity.cookie}={token}; Path=/; HttpOnly; SameSite=Lax"
        return [(b"Set-Cookie", cookie.encode())]

    def start_session(self, exchange: Exchange, rest: bytes) -> None:
        down, up = exchange.down, exchange.up
        assert down.transport is not None and up.transport is not None
        self.downstreams.discard(down)
        down.upgraded = True
        session = Session(exchange.slot)
        session.start(down.transport, up.transport, rest)
        # The HTTP readers are done; dropping their parsers now frees them by
        # reference counting instead of leaving cycles for the collector.
        down.reader.detach()
        up.reader.detach()
        if self.draining:
            # Admitted while the drain began (the decision was in flight): close it too.
            session.close_gracefully(1001, "drain")

    def spare_descriptor(self) -> bool:
        """Close one of the descriptors kept for a hand-over at the open-files limit.

        A session handed to the relay holds two descriptors more until uvloop
        closes its own on the next loop iteration. At the limit that would fail a
        session already answered 101; a spare makes room instead, and is taken
        back once uvloop's descriptors are closed. False when none is left.
        """
        if not self._spare_fds:
            return False
        os.close(self._spare_fds.pop())
        self.loop.call_later(0.001, self.keep_spare_descriptors)
        return True

    def keep_spare_descriptors(self) -> None:
        while len(self._spare_fds) < SPARE_DESCRIPTORS:
            try:
                self._spare_fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # at the limit still: tried again at the next housekeeping round

    def new_request_id(self) -> str:
        """A request id unique to this process: a random prefix and a counter."""
        return f"{self._request_prefix}-{next(self._request_serials):x}"

    def access_log(self, **fields: Any) -> None:
        if not self.config.access_log:
            return
        record = {"time": round(time.time(), 3), "replica": self.replica_id}
        record.update((k, v) for k, v in fields.items() if v is not None)
        duration = fields.get("duration")
        if isinstance(duration, float):
            record["duration"] = round(duration, 4)
        self._access.write(record)
