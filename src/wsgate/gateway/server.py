"""The gateway: named parts, composed, and their life cycle.

:class:`Gateway` builds the parts and wires each to the few others it needs;
no part holds the gateway:

- the data plane (:class:`~.plane.Plane`: downstream → exchange → upstream →
  session → relay), reached through the :class:`~.listener.Listener`;
- :class:`~.admit.Admission` (policy, affinity, store, queue, cookie) for the
  one :class:`~.plane.Route` there is;
- the :class:`~.follower.BackendFollower` (static list or discovery), the
  health checks, the :class:`~.rebalancer.Rebalancer`, the
  :class:`~.descriptors.SpareDescriptors`, the :class:`~.access_log.RequestLog`.

The gateway itself starts and stops them, drains, keeps house once a second,
and applies a reloaded config to each. Everything runs on one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any

from wsgate.admission import AdmissionStore
from wsgate.balancing import make_policy
from wsgate.config import Config
from wsgate.gateway.access_log import RequestLog
from wsgate.gateway.admit import Admission
from wsgate.gateway.connector import Connector
from wsgate.gateway.descriptors import SpareDescriptors
from wsgate.gateway.downstream import Downstream
from wsgate.gateway.follower import BackendFollower, discovery_source
from wsgate.gateway.frames import CloseCode
from wsgate.gateway.head import RequestHead
from wsgate.gateway.listener import Listener
from wsgate.gateway.outcomes import CloseReason, Outcome
from wsgate.gateway.plane import Plane, Route
from wsgate.gateway.rebalancer import Rebalancer
from wsgate.gateway.session import Session, Sessions
from wsgate.gateway.stats import Stats
from wsgate.gateway.store import limits_of, open_store, watch_excess
from wsgate.upstreams.health import HealthChecker
from wsgate.upstreams.pool import BackendPool

__all__ = ["RESTART_KEYS", "Gateway"]

log = logging.getLogger("wsgate.gateway")

HOUSEKEEPING_INTERVAL = 1.0
# How long start waits for the first discovery snapshot before listening anyway.
DISCOVERY_START_WAIT = 5.0
# Keys a running gateway cannot change: a reload keeps their running values.
RESTART_KEYS = ("listen", "admin", "admin_token", "state", "replica_id")


class Gateway:
    """One replica: its parts, started by :meth:`start` and stopped by :meth:`stop`."""

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
        self.replica_id = replica_id or config.replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = store or open_store(config, self.replica_id)
        self.stats = Stats()
        self.log = RequestLog(self.replica_id, self.stats, enabled=config.access_log)
        self.pool = BackendPool(config.limits.max_connections_per_backend, config.health.passive)
        self.health = HealthChecker(self.pool, config.health)
        self.admission = Admission(
            config, self.store, self.pool, make_policy(config.balance), self.stats
        )
        self.route = Route(self.pool, self.admission)
        self.spares = SpareDescriptors()
        self.sessions = Sessions(self.stats, self.log, self.spares.take)
        self.connector = Connector(config.timeouts.connect)
        self.follower = BackendFollower(self.pool, self.health, self.connector.drop_idle)
        self.rebalancer = Rebalancer(config, self.store, self.pool, self.sessions)
        self.downstreams: set[Downstream] = set()
        self.listener = Listener(self._accept, config.listen, sock=sock, reuse_port=reuse_port)
        self.plane: Plane | None = None  # made by start, on the running loop
        self.draining = False
        self.ready = False
        self.started_at = time.time()
        self.stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        watch_excess(self.store, self.rebalancer.close_excess)

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        backends = self.config.backends
        # A discovery source that cannot even be built is a config mistake: say so first.
        source = None if isinstance(backends, list) else discovery_source(backends)
        await self.store.start()
        if isinstance(backends, list):
            self.pool.update(backends, initial=True)
            self.health.sync()
        elif source is not None:
            await self.follower.follow(source, initial=True, wait=DISCOVERY_START_WAIT)
        self.connector.start(loop)
        self.plane = Plane(
            loop, self.config, self.stats, self.log, self.connector, self.sessions, self._route_for
        )
        await self.listener.start(loop)
        # The relay thread starts once there is somewhere for its sessions to come from.
        self.sessions.start(loop)
        self.spares.refill()
        self.spawn(self._housekeeping(), "housekeeping")
        self.spawn(self.rebalancer.run(), "rebalance")
        self.ready = True
        log.info(
            "gateway %s listening on %s with %d backends, store %s",
            self.replica_id, self.config.listen, len(self.pool), self.store.kind,
        )  # fmt: skip

    def _accept(self) -> Downstream:
        assert self.plane is not None
        return Downstream(self.plane, self.downstreams)

    def _route_for(self, head: RequestHead) -> Route:
        return self.route

    @property
    def listening(self) -> list[tuple[str, int]]:
        return self.listener.addresses

    @property
    def queued(self) -> int:
        """Connections waiting in the admission queue for a slot."""
        return self.admission.queued

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Stop taking connections and close the live ones gently, within drain_timeout."""
        if self.draining:
            return
        self.draining = self.admission.draining = self.rebalancer.draining = True
        if self.plane is not None:
            self.plane.draining = True
        log.info("draining %d sessions", len(self.sessions))
        self.listener.close()
        self.sessions.close_all(CloseCode.GOING_AWAY, CloseReason.DRAIN)
        for down in list(self.downstreams):
            if down.task is None:
                down.close()  # idle keep-alive: nothing in flight
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.config.drain_timeout
        # Polled, not signalled: drain happens once, and the data path stays free
        # of bookkeeping for it.
        while self.busy and loop.time() < deadline and not self._drain_cut.is_set():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        took = loop.time() - started
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

    async def stop(self) -> None:
        self.ready = False
        self.listener.close()
        self.sessions.finish_all(Outcome.GATEWAY_STOPPED)
        for down in list(self.downstreams):
            down.close()
        self.connector.close()
        await self.health.close()
        self.follower.stop()
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
        self.sessions.close()
        self.spares.close()
        self.log.flush()
        self.stopped.set()

    async def _housekeeping(self) -> None:
        last_bytes: dict[Session, int] = {}
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.spares.refill()
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
                        session.finish(Outcome.IDLE_TIMEOUT)
                last_bytes = now_bytes

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
            source = discovery_source(new.backends)
        admission = self.admission
        policy = make_policy(new.balance) if new.balance != old.balance else admission.policy

        self.config = admission.config = self.rebalancer.config = new
        if self.plane is not None:
            self.plane.config = new
        admission.policy = policy
        self.store.configure(limits_of(new))
        self.pool.default_cap = new.limits.max_connections_per_backend
        self.pool.passive = new.health.passive
        self.health.config = new.health
        self.connector.connect_timeout = new.timeouts.connect
        self.log.enabled = new.access_log
        if new.backends != old.backends:
            if source is not None:
                self.spawn(self.follower.follow(source, initial=False), "discovery-start")
            else:
                self.follower.stop()
                assert isinstance(new.backends, list)
                self.follower.apply(new.backends)
        self.health.sync()
        admission.pool_changed()
        log.info("config reloaded: %s", ", ".join(changed) if changed else "nothing changed")
        return changed
