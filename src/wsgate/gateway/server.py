"""The gateway: named parts, composed, and their life cycle.

:class:`Gateway` builds the parts and wires each to the few others it needs;
no part holds the gateway:

- the data plane (:class:`~.plane.Plane`: downstream → exchange → upstream →
  session → relay), reached through the :class:`~.listener.PlainListener` (an
  upgrade whose head came whole is an :class:`~.arrival.Arrival`), or with
  TLS or PROXY protocol through the :class:`~wsgate.gateway.edge_listener.EdgeListener`;
- the :class:`~.routes.Routes`: the table that gives each request its route,
  and per route its pool, health checks, backend follower, admission (policy,
  affinity, queue, cookie), store and rebalancer;
- the :class:`~.descriptors.SpareDescriptors`, the :class:`~.access_log.RequestLog`.

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
from wsgate.config import Config, ConfigError
from wsgate.edge.client_address import ClientResolver, TrustedNetworks
from wsgate.edge.tls import ServingCertificate, TlsError
from wsgate.gateway.access_log import RequestLog
from wsgate.gateway.arrival import WATCH_AFTER, arrive
from wsgate.gateway.connector import Connector
from wsgate.gateway.deadlines import Deadlines
from wsgate.gateway.descriptors import SpareDescriptors
from wsgate.gateway.downstream import Downstream
from wsgate.gateway.edge_downstream import EdgeDownstream, TrustedClientAddress
from wsgate.gateway.edge_listener import EdgeListener, EdgeStats
from wsgate.gateway.exchange import Client
from wsgate.gateway.listener import Listener, PlainListener
from wsgate.gateway.outcomes import CloseReason, Outcome
from wsgate.gateway.plane import Plane
from wsgate.gateway.routes import RoutePlan, Routes
from wsgate.gateway.session import Session, Sessions
from wsgate.gateway.stats import Stats
from wsgate.wire import CloseCode

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
        self.stats = Stats()
        self.log = RequestLog(self.replica_id, self.stats, enabled=config.access_log)
        self.spares = SpareDescriptors()
        self.sessions = Sessions(self.stats, self.log, self.spares)
        self.connector = Connector(config.timeouts.connect)
        self.routes = Routes(
            config, self.replica_id, self.stats, self.connector.drop_idle, store=store
        )
        self.downstreams: set[Client] = set()
        self.edge_stats = EdgeStats()
        self.serving_certificate = serving_certificate(config)
        self.listener: Listener
        if config.tls is not None or config.proxy_protocol is not None:
            self.listener = self._edge_listener(sock, reuse_port)
        else:
            self.listener = PlainListener(
                self._arrived, self._accept, config.listen, sock=sock, reuse_port=reuse_port
            )
        self.plane: Plane | None = None  # made by start, on the running loop
        self.arrival_watches: Deadlines | None = None  # likewise
        self.draining = False
        self.ready = False
        self.started_at = time.time()
        self.stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.stopped = asyncio.Event()
        self._drain_cut = asyncio.Event()
        await self.routes.start()
        self.connector.start(loop)
        self.arrival_watches = Deadlines(loop, WATCH_AFTER)
        self.plane = Plane(
            loop,
            self.config,
            self.stats,
            self.log,
            self.connector,
            self.sessions,
            self.routes.route_for,
            client_address=client_address(self.config),
        )
        await self.listener.start(loop)
        # The relay thread starts once there is somewhere for its sessions to come from.
        self.sessions.start(loop)
        self.connector.dial_with(self.sessions.relay)  # upgrades' backend sides, in C
        self.spares.refill()
        self.spawn(self._housekeeping(), "housekeeping")
        self.ready = True
        backends = sum(len(parts.pool) for parts in self.routes)
        log.info(
            "gateway %s listening on %s with %d routes and %d backends, store %s",
            self.replica_id, self.config.listen, len(self.routes), backends, self.store.kind,
        )  # fmt: skip

    def _arrived(self, fd: int, peername: Any, data: bytes) -> bool:
        assert self.plane is not None
        assert self.arrival_watches is not None
        return arrive(self.plane, self.downstreams, self.arrival_watches, fd, peername, data)

    def _accept(self, early: bytes) -> Downstream:
        assert self.plane is not None
        return Downstream(self.plane, self.downstreams, early=early)

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

    @property
    def store(self) -> AdmissionStore:
        """The first route's store: what the replica's state (mode, replicas) is read from."""
        return next(iter(self.routes)).store

    @property
    def listening(self) -> list[tuple[str, int]]:
        return self.listener.addresses

    @property
    def queued(self) -> int:
        """Connections waiting in the admission queue for a slot."""
        return self.routes.queued

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Stop taking connections and close the live ones gently, within drain_timeout."""
        if self.draining:
            return
        self.draining = True
        self.routes.drain()
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
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Let transports finish closing, and so release their slots, before the store
        # closes (for Redis, the releases leave before the store's own goodbye).
        await asyncio.sleep(0)
        # The relay's sockets still flushing are cut: each slot is released as its
        # backend socket closes, and before the store says goodbye.
        self.sessions.close()
        await self.routes.stop()
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
            self.routes.keep_house()
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
        new, serving = self._reload_edge(old, new, why)  # raises before anything changes
        plan = self.routes.plan(new)  # so does this

        self.config = new
        if self.plane is not None:
            self.plane.config = new
            self.plane.client_address = client_address(new)
        self.serving_certificate = serving
        if isinstance(self.listener, EdgeListener):
            self.listener.tls = serving
            proxy = new.proxy_protocol
            self.listener.proxy_sources = TrustedNetworks(proxy.trusted if proxy else ())
        self.connector.connect_timeout = new.timeouts.connect
        self.log.enabled = new.access_log
        self.spawn(self._apply_routes(plan, changed), "reload-routes")
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

    async def _apply_routes(self, plan: RoutePlan, changed: list[str]) -> None:
        """The routes' part of a reload: new routes take requests once started."""
        try:
            for line in await self.routes.apply(plan):
                log.info("config reload: %s", line)
        except Exception:
            log.exception("config reload: applying the routes failed")
            return
        log.info("config reloaded: %s", ", ".join(changed) if changed else "nothing changed")
