"""The gateway: named parts, composed, and their life cycle.

:class:`Gateway` builds the parts and wires each to the few others it needs;
no part holds the gateway:

- the data plane (:class:`~.plane.Plane`: downstream → exchange → upstream →
  session → relay), reached through the :class:`~.listener.Listener`, or with
  TLS or PROXY protocol through the :class:`~wsgate.edge.listener.EdgeListener`;
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
from wsgate.config import Config, ConfigError
from wsgate.edge.client_address import ClientResolver, TrustedNetworks
from wsgate.edge.downstream import EdgeDownstream, TrustedClientAddress
from wsgate.edge.listener import EdgeListener, EdgeStats
from wsgate.edge.tls import ServingCertificate, TlsError
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


def serving_certificate(config: Config) -> ServingCertificate | None:
    """The listener's TLS pair, read now.

    Raises:
        ConfigError: the pair cannot be used.
    """
    tls = config.tls
    if tls is None:
        return None
    try:
        return ServingCertificate(tls.cert, tls.key, tls.client_ca, tls.min_version)
    except TlsError as error:
        raise ConfigError(f"tls: {error}") from None


def client_address(config: Config) -> TrustedClientAddress:
    return TrustedClientAddress(ClientResolver(config.trusted_proxies, config.forwarded_header))


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
        self.pool.set_default_tls(config.backend_tls)
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
        self.edge_stats = EdgeStats()
        self.serving_certificate = serving_certificate(config)
        self.listener: Listener | EdgeListener
        if config.tls is not None or config.proxy_protocol is not None:
            self.listener = self._edge_listener(sock, reuse_port)
        else:
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
            loop, self.config, self.stats, self.log, self.connector, self.sessions,
            self._route_for, client_address=client_address(self.config),
        )  # fmt: skip
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

    def _edge_listener(self, sock: socket.socket | None, reuse_port: bool) -> EdgeListener:
        config = self.config
        proxy, tls = config.proxy_protocol, config.tls
        return EdgeListener(
            self._accept_at_edge,
            config.listen,
            stats=self.edge_stats,
            sock=sock,
            reuse_port=reuse_port,
            tls=self.serving_certificate,
            handshake_timeout=tls.handshake_timeout if tls is not None else 10.0,
            proxy_sources=TrustedNetworks(proxy.trusted if proxy is not None else ()),
            proxy_timeout=proxy.timeout if proxy is not None else 3.0,
        )

    def _accept_at_edge(self, client: str, proxied: bool) -> Downstream:
        assert self.plane is not None
        # Only a source trusted to send a PROXY header may: from any other it is refused.
        refuse = self.config.proxy_protocol is not None and not proxied
        return EdgeDownstream(
            self.plane, self.downstreams, client, stats=self.edge_stats, refuse_proxy_header=refuse
        )

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
            if self.serving_certificate is not None:
                self.serving_certificate.check()  # a stat per file: a rotated pair is seen
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
    def reload(self, new: Config, why: str = "config reload") -> list[str]:
        """Apply ``new`` to the running gateway without dropping a live connection.

        Keys in :data:`RESTART_KEYS` keep their running values (logged). Limits and
        caps apply to new connections only. The TLS pair is read again (``why``
        says who asked). Returns the top-level keys applied.

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
        new, serving = self._reload_edge(old, new, why)

        self.config = admission.config = self.rebalancer.config = new
        if self.plane is not None:
            self.plane.config = new
            self.plane.client_address = client_address(new)
        self.serving_certificate = serving
        if isinstance(self.listener, EdgeListener):
            self.listener.tls = serving
            proxy = new.proxy_protocol
            self.listener.proxy_sources = TrustedNetworks(proxy.trusted if proxy else ())
        admission.policy = policy
        self.store.configure(limits_of(new))
        self.pool.default_cap = new.limits.max_connections_per_backend
        self.pool.passive = new.health.passive
        self.pool.set_default_tls(new.backend_tls)
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

    def _reload_edge(
        self, old: Config, new: Config, why: str
    ) -> tuple[Config, ServingCertificate | None]:
        """The edge settings a reload can apply, and the TLS pair to serve from now on.

        Turning TLS or PROXY protocol on or off changes the kind of listener: that
        waits for a restart. New paths for the pair are read now (a pair that cannot
        be used refuses the whole reload); the same paths are read again, as on SIGHUP.
        """
        kept = {
            key: getattr(old, key)
            for key in ("tls", "proxy_protocol")
            if (getattr(new, key) is None) != (getattr(old, key) is None)
        }
        if kept:
            log.warning(
                "config reload: turning %s on or off needs a restart; keeping the running value",
                " and ".join(kept),
            )
            new = new.model_copy(update=kept)
        serving = self.serving_certificate
        if new.tls != old.tls:
            serving = serving_certificate(new)
        elif serving is not None:
            serving.reload(why)
        return new, serving
