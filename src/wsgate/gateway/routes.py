"""The routes of one gateway: which route each request takes, and each route's own parts.

Every route owns what decides for its pool: the pool itself, its health checks,
the backend follower (static list or discovery), its admission (policy,
affinity, queue) and its own admission store, so its caps, rates and queue are
its own. With Redis, a route's store keeps its state under a namespace of its
own (``{wsgate:NS:ROUTE}``, the default route keeps ``{wsgate:NS}``), which is
also its own hash tag: a Redis Cluster spreads the routes over its shards. The
rebalancer of a route moves that route's sessions only.

:class:`Routes` holds the table (:class:`~wsgate.routing.RouteTable`) and the
parts by name. A reload keeps the parts of every route whose name stays, and
applies its new keys to them; it starts the parts of new routes before the new
table takes requests; a route that went away takes no new request, its
sessions are closed with 1001, and its parts stop once they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from wsgate.admission import AdmissionStore
from wsgate.balancing import make_policy
from wsgate.config import Config, RouteConfig
from wsgate.gateway.admit import Admission
from wsgate.gateway.follower import BackendFollower, discovery_source
from wsgate.gateway.head import RequestHead
from wsgate.gateway.outcomes import CloseReason
from wsgate.gateway.plane import Route
from wsgate.gateway.rebalancer import Rebalancer
from wsgate.gateway.session import Session
from wsgate.gateway.stats import Stats
from wsgate.gateway.store import limits_of, open_store
from wsgate.routing import RouteTable, request_host_and_path, route_namespace
from wsgate.upstreams.discovery import BackendSource
from wsgate.upstreams.health import HealthChecker
from wsgate.upstreams.pool import BackendPool
from wsgate.wire import CloseCode

__all__ = ["DISCOVERY_START_WAIT", "RouteParts", "RoutePlan", "RouteSessions", "Routes"]

log = logging.getLogger("wsgate.routes")

# How long start waits for a route's first discovery snapshot before listening anyway.
DISCOVERY_START_WAIT = 5.0


class RouteSessions:
    """The live sessions of one route: those on the backends of its pool."""

    def __init__(self, pool: BackendPool):
        self.pool = pool

    def __iter__(self) -> Iterator[Session]:
        for backend in list(self.pool):
            yield from list(backend.connections)

    def __len__(self) -> int:
        return sum(len(backend.connections) for backend in self.pool)


class RouteParts:
    """One route's own pool, health checks, follower, store, admission and rebalancer."""

    def __init__(
        self,
        spec: RouteConfig,
        config: Config,
        store: AdmissionStore,
        stats: Stats,
        drop_idle: Callable[[str], None],
    ):
        self.spec = spec
        self.store = store
        self.pool = BackendPool(spec.limits.max_connections_per_backend, spec.health.passive)
        self.pool.set_default_tls(config.backend_tls)
        self.health = HealthChecker(self.pool, spec.health)
        self.admission = Admission(spec, store, self.pool, make_policy(spec.balance), stats)
        self.follower = BackendFollower(self.pool, self.health, drop_idle)
        self.sessions = RouteSessions(self.pool)
        self.rebalancer = Rebalancer(config, store, self.pool, self.sessions)
        self.route = Route(self.pool, self.admission, spec.name)
        self._rebalancing: asyncio.Task[None] | None = None
        store.on_excess = self.rebalancer.close_excess

    @property
    def name(self) -> str:
        return self.spec.name

    async def start(self, *, initial: bool) -> None:
        """Start the store, fill the pool, and rebalance from now on."""
        backends = self.spec.backends
        # A discovery source that cannot even be built is a config mistake: say so first.
        source = None if isinstance(backends, list) else discovery_source(backends)
        await self.store.start()
        if isinstance(backends, list):
            self.pool.update(backends, initial=initial)
            self.health.sync()
        elif source is not None:
            await self.follower.follow(source, initial=initial, wait=DISCOVERY_START_WAIT)
        self._rebalancing = asyncio.create_task(
            self.rebalancer.run(), name=f"rebalance-{self.name}"
        )

    def reconfigure(self, spec: RouteConfig, config: Config) -> None:
        """Apply a route's new keys to new connections; the live ones stay.

        New backends from a list are applied here; a new discovery source is the
        caller's to follow.
        """
        old = self.spec
        self.spec = spec
        self.route.name = spec.name
        admission = self.admission
        admission.config = spec
        if spec.balance != old.balance:
            admission.policy = make_policy(spec.balance)
        self.rebalancer.config = config
        self.store.configure(limits_of(spec))
        self.pool.default_cap = spec.limits.max_connections_per_backend
        self.pool.passive = spec.health.passive
        self.pool.set_default_tls(config.backend_tls)
        self.health.config = spec.health
        if spec.backends != old.backends and isinstance(spec.backends, list):
            self.follower.stop()
            self.follower.apply(spec.backends)
        self.health.sync()
        admission.pool_changed()

    def keep_house(self) -> None:
        """Once a second: forget drained backends, end ejections that are due."""
        known = len(self.pool)
        self.pool.forget_drained()
        if len(self.pool) != known:
            self.health.sync()  # stop checking backends that have drained and left
        self.pool.end_ejections()

    def close_sessions(self, code: int, reason: CloseReason) -> int:
        return sum(bool(s.close_gracefully(code, reason)) for s in self.sessions)

    async def stop(self) -> None:
        self.admission.draining = True
        if self._rebalancing is not None:
            self._rebalancing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebalancing
        self.follower.stop()
        await self.health.close()
        await self.store.close()


@dataclass(slots=True)
class RoutePlan:
    """What a reload does to the routes, decided before anything changes."""

    config: Config
    table: RouteTable
    added: list[RouteParts]
    changed: list[tuple[RouteParts, RouteConfig, BackendSource | None]]
    removed: list[RouteParts]


class Routes:
    """The routes of one gateway: the table each request is looked up in, and the parts."""

    def __init__(
        self,
        config: Config,
        replica_id: str,
        stats: Stats,
        drop_idle: Callable[[str], None],
        *,
        store: AdmissionStore | None = None,
    ):
        self.config = config
        self.replica_id = replica_id
        self.stats = stats
        self._drop_idle = drop_idle
        # A store given by the caller (tests, embedding) serves the first route.
        self._given_store = store
        self.parts: dict[str, RouteParts] = {}
        for spec in config.route_list():
            self.parts[spec.name] = self._parts(spec, config)
        self.table = self._table(config)
        self._retiring: set[asyncio.Task[None]] = set()

    def _parts(self, spec: RouteConfig, config: Config) -> RouteParts:
        store = self._given_store
        self._given_store = None
        if store is None:
            namespace = route_namespace(config.state.namespace, spec.name)
            store = open_store(config, self.replica_id, limits=spec, namespace=namespace)
        return RouteParts(spec, config, store, self.stats, self._drop_idle)

    @staticmethod
    def _table(config: Config) -> RouteTable:
        return RouteTable((spec.name, spec.match.key) for spec in config.route_list())

    def __iter__(self) -> Iterator[RouteParts]:
        return iter(list(self.parts.values()))

    def __len__(self) -> int:
        return len(self.parts)

    def route_for(self, head: RequestHead) -> Route | None:
        """The route of a request, or None when no route matches it (404)."""
        table = self.table
        name = table.sole
        if name is None:
            name = table.pick(*request_host_and_path(head.target, head.get(b"host")))
        return None if name is None else self.parts[name].route

    @property
    def queued(self) -> int:
        return sum(parts.admission.queued for parts in self)

    @property
    def stores(self) -> list[AdmissionStore]:
        return [parts.store for parts in self]

    async def start(self) -> None:
        for parts in self:
            await parts.start(initial=True)

    def drain(self) -> None:
        for parts in self:
            parts.admission.draining = parts.rebalancer.draining = True

    def keep_house(self) -> None:
        for parts in self:
            parts.keep_house()

    async def stop(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for parts in self:
            await parts.stop()

    def plan(self, new: Config) -> RoutePlan:
        """What a reload to ``new`` would do.

        Raises:
            ConfigError: a route's discovery source cannot be built (nothing changed).
        """
        wanted = {spec.name: spec for spec in new.route_list()}
        changed = []
        for name, spec in wanted.items():
            parts = self.parts.get(name)
            if parts is not None and parts.spec != spec:
                source = None
                if spec.backends != parts.spec.backends and not isinstance(spec.backends, list):
                    source = discovery_source(spec.backends)
                changed.append((parts, spec, source))
        for spec in wanted.values():
            if spec.name not in self.parts and not isinstance(spec.backends, list):
                discovery_source(spec.backends)  # a mistake is said now, not after a start
        return RoutePlan(
            config=new,
            table=self._table(new),
            added=[self._parts(s, new) for name, s in wanted.items() if name not in self.parts],
            changed=changed,
            removed=[parts for name, parts in self.parts.items() if name not in wanted],
        )

    async def apply(self, plan: RoutePlan) -> list[str]:
        """Carry a plan out: changed routes at once, new ones once started, then the
        new table; removed routes retire. Returns what was done, one line per route."""
        new = plan.config
        self.config = new
        said: list[str] = []
        for parts in self:
            parts.rebalancer.config = new
        for parts, spec, source in plan.changed:
            parts.reconfigure(spec, new)
            if source is not None:
                await parts.follower.follow(source, initial=False)
            said.append(f"route {spec.name} changed")
        for parts in plan.added:
            await parts.start(initial=True)
            said.append(f"route {parts.name} added ({parts.spec.match.key})")
        by_name = {**self.parts, **{parts.name: parts for parts in plan.added}}
        self.parts = {spec.name: by_name[spec.name] for spec in new.route_list()}
        self.table = plan.table
        for parts in plan.removed:
            said.append(f"route {parts.name} removed")
            task = asyncio.create_task(self._retire(parts, new.drain_timeout), name="retire")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return said

    async def _retire(self, parts: RouteParts, within: float) -> None:
        """A route that went away: its sessions are told 1001, then its parts stop."""
        closing = parts.close_sessions(CloseCode.GOING_AWAY, CloseReason.ROUTE_REMOVED)
        log.info("route %s removed: closing its %d sessions with 1001", parts.name, closing)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        # Polled: a route retires seldom, and its sessions carry no hook for it.
        while len(parts.sessions) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await parts.stop()
