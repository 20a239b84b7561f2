"""What the admin API shows, read from a running gateway as plain data.

One reading of the gateway (:func:`take_snapshot`) feeds every view: the
``/clusters`` JSON, the ``/stats`` lines, the Prometheus collector, the
dashboard's event stream and ``wsgate status``. So the views cannot disagree
with each other, only with the truth, and the tests check that against what
backends and clients observed.

Reading is cheap and does no I/O: counters the data path bumps, the store's
last-known counts, and one pass over the live sessions for their bytes.
:class:`RateHistory` turns cumulative counters into per-second rates for the
dashboard's chart.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsgate.admission import Reason
from wsgate.routing import DEFAULT_ROUTE

if TYPE_CHECKING:
    from wsgate.admission import AdmissionStore
    from wsgate.gateway.server import Gateway
    from wsgate.upstreams.pool import BackendPool

__all__ = [
    "BackendSnapshot",
    "RateHistory",
    "RouteSnapshot",
    "Snapshot",
    "clusters_json",
    "overview_json",
    "stats_text",
    "take_snapshot",
]


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    route: str  # the route whose pool holds it (one backend may serve several routes)
    id: str
    address: str
    healthy: bool  # active checks pass and not ejected by passive outlier detection
    ejected: bool
    draining: bool  # left discovery; no new connections
    active: int  # all replicas (the shared state's last known count)
    active_here: int  # this replica
    max_connections: int
    admitted_total: int
    rejected_total: int  # no_capacity answers given while this backend was full
    connect_failures_total: int
    ejections_total: int
    sessions_here: int  # live WebSocket sessions relayed by this replica


@dataclass(frozen=True, slots=True)
class RouteSnapshot:
    name: str
    host: str | None  # None: any host
    path_prefix: str
    mode: str  # its store's mode: "ok" or "degraded"
    queued: int
    admitted_total: int
    rejected: dict[str, int]  # this route's rejections by reason
    tokens_available: float | None
    rate_per_second: float | None
    rate_burst: int | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    replica: str
    time: float  # unix seconds
    started_at: float
    ready: bool
    draining: bool
    store: str  # "memory" or "redis"
    mode: str  # "ok" or "degraded"
    live_replicas: int
    store_errors_total: int
    departures_total: int
    tokens_available: float | None  # None: no connect-rate limit
    rate_per_second: float | None
    rate_burst: int | None
    accepted_total: int
    admitted_total: int
    rejected: dict[str, int]  # every reason, zeros included
    bad_requests: dict[int, int]
    closed_by_gateway: dict[str, int]
    affinity_fallbacks: int
    bytes_from_clients: int
    bytes_to_clients: int
    sessions_here: int
    queued: int
    backends: list[BackendSnapshot]
    routes: list[RouteSnapshot]

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    @property
    def active(self) -> int:
        return sum(b.active for b in self.backends)

    @property
    def active_here(self) -> int:
        return sum(b.active_here for b in self.backends)

    @property
    def capacity(self) -> int:
        return sum(b.max_connections for b in self.backends if not b.draining)


def take_snapshot(gw: Gateway) -> Snapshot:
    """Read the gateway now."""
    stats = gw.stats
    backends: list[BackendSnapshot] = []
    routes: list[RouteSnapshot] = []
    for parts in gw.routes:
        backends += _pool_snapshot(parts.name, parts.pool, parts.store)
        route_rate = parts.spec.limits.connect_rate
        routes.append(
            RouteSnapshot(
                name=parts.name,
                host=parts.spec.match.host,
                path_prefix=parts.spec.match.path_prefix,
                mode=parts.store.mode,
                queued=parts.admission.queued,
                admitted_total=parts.route.admitted_total,
                rejected={str(reason): n for reason, n in parts.route.rejected.items()},
                tokens_available=parts.store.tokens_available(),
                rate_per_second=route_rate.per_second if route_rate else None,
                rate_burst=route_rate.burst if route_rate else None,
            )
        )
    stores = gw.routes.stores
    # The replica's state is the worst of its routes' stores.
    mode = next((s.mode for s in stores if s.mode != "ok"), "ok")
    store = gw.store
    rejected = {str(reason): 0 for reason in Reason}
    rejected.update((str(reason), count) for reason, count in stats.rejected.items())
    rate = gw.config.limits.connect_rate
    # Finished connections are in the totals; live sessions add what they relayed so far.
    bytes_from_clients = stats.bytes_from_clients
    bytes_to_clients = stats.bytes_to_clients
    for session in list(gw.sessions):
        bytes_from_clients += session.bytes_in
        bytes_to_clients += session.bytes_out
    return Snapshot(
        replica=gw.replica_id,
        time=time.time(),
        started_at=gw.started_at,
        ready=gw.ready,
        draining=gw.draining,
        store=store.kind,
        mode=mode,
        live_replicas=store.live_replicas(),
        # Stores that talk to a server count failed calls; the embedded one has none.
        store_errors_total=sum(s.errors_total for s in stores),
        departures_total=sum(s.departures_total for s in stores),
        tokens_available=store.tokens_available(),
        rate_per_second=rate.per_second if rate else None,
        rate_burst=rate.burst if rate else None,
        accepted_total=stats.accepted_total,
        admitted_total=stats.admitted_total,
        rejected=rejected,
        bad_requests=dict(stats.bad_requests),
        closed_by_gateway=dict(stats.closed_by_gateway),
        affinity_fallbacks=stats.affinity_fallbacks,
        bytes_from_clients=bytes_from_clients,
        bytes_to_clients=bytes_to_clients,
        sessions_here=len(gw.sessions),
        queued=gw.queued,
        backends=backends,
        routes=routes,
    )


def _pool_snapshot(route: str, pool: BackendPool, store: AdmissionStore) -> list[BackendSnapshot]:
    everywhere = store.global_counts()
    here = store.local_counts()
    now = time.monotonic()
    backends = []
    for backend in pool:
        ejected = now < backend.ejected_until
        backends.append(
            BackendSnapshot(
                route=route,
                id=backend.id,
                address=backend.address,
                healthy=backend.healthy and not ejected,
                ejected=ejected,
                draining=backend.draining,
                active=everywhere.get(backend.id, 0),
                active_here=here.get(backend.id, 0),
                max_connections=backend.cap(pool.default_cap),
                admitted_total=backend.admitted_total,
                rejected_total=backend.rejected_total,
                connect_failures_total=backend.connect_failures_total,
                ejections_total=backend.ejections,
                sessions_here=len(backend.connections),
            )
        )
    return backends


def clusters_json(snap: Snapshot) -> dict[str, Any]:
    """The ``/clusters`` document: per backend, global and local counts against caps."""
    return {
        "replica": snap.replica,
        "state": {"store": snap.store, "mode": snap.mode},
        "routes": [_route_json(snap, route) for route in snap.routes],
        "backends": [
            {
                "route": b.route,
                "id": b.id,
                "address": b.address,
                "healthy": b.healthy,
                "active": b.active,
                "active_here": b.active_here,
                "max_connections": b.max_connections,
                "admitted_total": b.admitted_total,
                "rejected_total": b.rejected_total,
            }
            for b in snap.backends
        ],
    }


def overview_json(snap: Snapshot, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the dashboard and ``wsgate status`` show, with recent per-second rates."""
    return {
        "replica": snap.replica,
        "time": round(snap.time, 3),
        "uptime": round(snap.time - snap.started_at, 1),
        "ready": snap.ready,
        "draining": snap.draining,
        "state": {
            "store": snap.store,
            "mode": snap.mode,
            "live_replicas": snap.live_replicas,
            "errors_total": snap.store_errors_total,
            "departures_total": snap.departures_total,
        },
        "connect_rate": _rate_json(snap.rate_per_second, snap.rate_burst, snap.tokens_available),
        "totals": {
            "accepted_total": snap.accepted_total,
            "admitted_total": snap.admitted_total,
            "rejected_total": snap.rejected_total,
            "rejected": snap.rejected,
            "bad_requests": {str(status): n for status, n in sorted(snap.bad_requests.items())},
            "closed_by_gateway": snap.closed_by_gateway,
            "affinity_fallbacks": snap.affinity_fallbacks,
            "active": snap.active,
            "active_here": snap.active_here,
            "capacity": snap.capacity,
            "sessions_here": snap.sessions_here,
            "queued": snap.queued,
            "bytes_from_clients": snap.bytes_from_clients,
            "bytes_to_clients": snap.bytes_to_clients,
        },
        "routes": [
            {
                **_route_json(snap, route),
                "rejected": route.rejected,
                "connect_rate": _rate_json(
                    route.rate_per_second, route.rate_burst, route.tokens_available
                ),
            }
            for route in snap.routes
        ],
        "backends": [
            {
                "route": b.route,
                "id": b.id,
                "address": b.address,
                "healthy": b.healthy,
                "ejected": b.ejected,
                "draining": b.draining,
                "active": b.active,
                "active_here": b.active_here,
                "max_connections": b.max_connections,
                "admitted_total": b.admitted_total,
                "rejected_total": b.rejected_total,
                "connect_failures_total": b.connect_failures_total,
                "sessions_here": b.sessions_here,
            }
            for b in snap.backends
        ],
        "history": {"interval": RateHistory.INTERVAL, "points": history},
    }


def _route_json(snap: Snapshot, route: RouteSnapshot) -> dict[str, Any]:
    """A route's match and its totals, its backends' counts added up."""
    backends = [b for b in snap.backends if b.route == route.name]
    return {
        "name": route.name,
        "match": {"host": route.host, "path_prefix": route.path_prefix},
        "mode": route.mode,
        "active": sum(b.active for b in backends),
        "active_here": sum(b.active_here for b in backends),
        "capacity": sum(b.max_connections for b in backends if not b.draining),
        "backends": len(backends),
        "healthy_backends": sum(1 for b in backends if b.healthy and not b.draining),
        "queued": route.queued,
        "admitted_total": route.admitted_total,
        "rejected_total": sum(route.rejected.values()),
    }


def stats_text(snap: Snapshot) -> str:
    """The ``/stats`` page: the same figures as ``name: value`` lines."""
    lines: list[tuple[str, object]] = [
        ("replica", snap.replica),
        ("ready", int(snap.ready)),
        ("draining", int(snap.draining)),
        ("uptime_seconds", round(snap.time - snap.started_at, 1)),
        ("state.store", snap.store),
        ("state.mode", snap.mode),
        ("state.live_replicas", snap.live_replicas),
        ("state.errors_total", snap.store_errors_total),
        ("state.departures_total", snap.departures_total),
    ]
    if snap.rate_per_second is not None:
        lines += [
            ("connect_rate.per_second", snap.rate_per_second),
            ("connect_rate.burst", snap.rate_burst),
            ("connect_rate.tokens_available", _round(snap.tokens_available)),
        ]
    lines += [
        ("connections.accepted_total", snap.accepted_total),
        ("connections.admitted_total", snap.admitted_total),
        ("connections.rejected_total", snap.rejected_total),
    ]
    lines += [(f"connections.rejected.{reason}", n) for reason, n in snap.rejected.items()]
    lines += [
        ("connections.active", snap.active),
        ("connections.active_here", snap.active_here),
        ("connections.capacity", snap.capacity),
        ("connections.websocket_sessions_here", snap.sessions_here),
        ("connections.queued", snap.queued),
        ("connections.affinity_fallbacks", snap.affinity_fallbacks),
    ]
    lines += [(f"bad_requests.{s}", n) for s, n in sorted(snap.bad_requests.items())]
    lines += [(f"closed_by_gateway.{why}", n) for why, n in sorted(snap.closed_by_gateway.items())]
    lines += [
        ("bytes.from_clients", snap.bytes_from_clients),
        ("bytes.to_clients", snap.bytes_to_clients),
    ]
    for route in snap.routes:
        data = _route_json(snap, route)
        prefix = f"route.{route.name}"
        lines += [
            (f"{prefix}.host", route.host or "*"),
            (f"{prefix}.path_prefix", route.path_prefix),
            (f"{prefix}.mode", route.mode),
        ]
        lines += [
            (f"{prefix}.{key}", data[key])
            for key in ("active", "active_here", "capacity", "queued", "admitted_total")
        ]
        lines += [(f"{prefix}.rejected.{reason}", n) for reason, n in route.rejected.items()]
    for b in snap.backends:
        # The default route's backends keep the names they had before routes.
        prefix = f"backend.{b.id}"
        if b.route != DEFAULT_ROUTE:
            prefix = f"route.{b.route}.{prefix}"
        lines += [
            (f"{prefix}.address", b.address),
            (f"{prefix}.healthy", int(b.healthy)),
            (f"{prefix}.ejected", int(b.ejected)),
            (f"{prefix}.draining", int(b.draining)),
            (f"{prefix}.active", b.active),
            (f"{prefix}.active_here", b.active_here),
            (f"{prefix}.max_connections", b.max_connections),
            (f"{prefix}.admitted_total", b.admitted_total),
            (f"{prefix}.rejected_total", b.rejected_total),
            (f"{prefix}.connect_failures_total", b.connect_failures_total),
            (f"{prefix}.ejections_total", b.ejections_total),
        ]
    return "".join(f"{name}: {value}\n" for name, value in lines)


def _rate_json(
    per_second: float | None, burst: int | None, tokens: float | None
) -> dict[str, Any] | None:
    """A connect-rate bucket as the JSON views show it; None when there is no limit."""
    if per_second is None:
        return None
    return {"per_second": per_second, "burst": burst, "tokens_available": _round(tokens)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class RateHistory:
    """Per-second admission and rejection rates over the last ``span`` seconds.

    Fed with the cumulative counters about once a second; each sample becomes one
    point with the rates since the previous sample.
    """

    INTERVAL = 1.0

    def __init__(self, span: float = 300.0):
        self._points: deque[dict[str, Any]] = deque(maxlen=max(1, int(span / self.INTERVAL)))
        self._last: tuple[float, int, dict[str, int]] | None = None

    def sample(self, now: float, admitted_total: int, rejected: Mapping[str, int]) -> None:
        """Record the counters as they are at ``now`` (unix seconds)."""
        counts = dict(rejected)
        last = self._last
        self._last = (now, admitted_total, counts)
        if last is None:
            return
        then, admitted_then, rejected_then = last
        elapsed = now - then
        if elapsed <= 0:
            self._last = last
            return
        by_reason = {
            reason: round((n - rejected_then.get(reason, 0)) / elapsed, 3)
            for reason, n in counts.items()
            if n != rejected_then.get(reason, 0)
        }
        self._points.append(
            {
                "t": round(now, 3),
                "admitted": round((admitted_total - admitted_then) / elapsed, 3),
                "rejected": by_reason,
            }
        )

    def points(self, since: float | None = None) -> list[dict[str, Any]]:
        """The points after ``since`` (all of them when None), oldest first."""
        if since is None:
            return list(self._points)
        return [p for p in self._points if p["t"] > since]
