"""Prometheus metrics: a collector that reads the gateway when it is scraped.

The data path only bumps plain integers (see :mod:`wsgate.gateway.stats`);
turning them into metric families happens here, once per scrape, from one
:class:`~wsgate.admin.snapshot.Snapshot`, and the two histograms (connection
duration, admission latency) from the gateway's plain buckets
(:class:`~wsgate.gateway.stats.Buckets`). The collector is registered on the
gateway's registry, so ``generate_latest(gw.stats.registry)`` exposes everything.

Names follow the Prometheus conventions: a ``wsgate_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters. Per-backend series carry
``route`` and ``backend`` labels (one backend may serve several routes, each with
its own cap), per-route series a ``route`` label; there is no replica label,
because every replica is scraped on its own and Prometheus adds the ``instance``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from wsgate.admin.snapshot import Snapshot, take_snapshot

if TYPE_CHECKING:
    from wsgate.edge.tls import ServingCertificate
    from wsgate.gateway.edge_listener import EdgeStats
    from wsgate.gateway.server import Gateway
    from wsgate.gateway.stats import Buckets, Stats

__all__ = [
    "CONTENT_TYPE",
    "STORE_MODES",
    "GatewayCollector",
    "edge_families",
    "histogram_families",
    "metric_families",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST
STORE_MODES = ("ok", "degraded")


class GatewayCollector(Collector):
    """Register on ``gw.stats.registry``; every scrape reads the gateway afresh."""

    def __init__(self, gateway: Gateway):
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        gw = self.gateway
        families = metric_families(take_snapshot(gw))
        families += histogram_families(gw.stats)
        families += edge_families(gw.edge_stats, gw.serving_certificate)
        # Each route counts its clients in its own store, against its own cap.
        capped = [r for r in gw.routes if r.spec.limits.max_connections_per_client is not None]
        if capped:
            families.append(
                GaugeMetricFamily(
                    "wsgate_clients_connected",
                    "Client addresses holding connections through this replica, counted "
                    "against limits.max_connections_per_client (summed over the routes).",
                    value=sum(r.store.clients_connected() for r in capped),
                )
            )
        return iter(families)


def render(gateway: Gateway) -> bytes:
    """The text exposition of everything on the gateway's registry."""
    data: bytes = generate_latest(gateway.stats.registry)
    return data


def histogram_families(stats: Stats) -> list[Metric]:
    """The connection-duration and admission-latency histograms, from their buckets."""

    def add(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
        # "le" as prometheus_client writes it: 1.0, 5e-05, +Inf.
        cumulative = [
            ("+Inf" if bound == float("inf") else repr(float(bound)), n)
            for bound, n in buckets.cumulative()
        ]
        family.add_metric(labels, cumulative, buckets.sum)

    duration = HistogramMetricFamily(
        "wsgate_connection_duration_seconds",
        "How long finished connections (WebSocket sessions, HTTP requests) lasted.",
        labels=["kind"],
    )
    for kind, buckets in stats.connection_duration.items():
        add(duration, [kind], buckets)
    admission = HistogramMetricFamily(
        "wsgate_admission_latency_seconds", "Time to decide one admission in the state store."
    )
    add(admission, [], stats.admission_latency)
    return [duration, admission]


def metric_families(snap: Snapshot) -> list[Metric]:
    """The metric families of one snapshot (the histograms are in histogram_families)."""
    families: list[Metric] = []

    def gauge(name: str, doc: str, value: float) -> None:
        families.append(GaugeMetricFamily(name, doc, value=value))

    def counter(name: str, doc: str, value: float) -> None:
        families.append(CounterMetricFamily(name, doc, value=value))

    info = GaugeMetricFamily(
        "wsgate_replica_info", "This replica's id and state store (always 1).",
        labels=["replica", "store"],
    )  # fmt: skip
    info.add_metric([snap.replica, snap.store], 1)
    families.append(info)
    gauge("wsgate_start_time_seconds", "When this gateway started (unix time).", snap.started_at)
    gauge("wsgate_ready", "1 while this replica takes new connections.", int(snap.ready))
    gauge("wsgate_draining", "1 while this replica drains.", int(snap.draining))

    # Connections, as the listener and the admission step saw them.
    counter(
        "wsgate_connections_accepted_total",
        "Client TCP connections accepted by the listener.",
        snap.accepted_total,
    )
    counter(
        "wsgate_admitted_total",
        "Connections and requests admitted to a backend (a slot was reserved).",
        snap.admitted_total,
    )
    rejected = CounterMetricFamily(
        "wsgate_rejected_total", "Connections and requests answered without a backend, by reason.",
        labels=["reason"],
    )  # fmt: skip
    for reason, count in snap.rejected.items():
        rejected.add_metric([reason], count)
    families.append(rejected)
    bad = CounterMetricFamily(
        "wsgate_bad_requests_total", "Requests refused before admission (malformed, timed out).",
        labels=["status"],
    )  # fmt: skip
    for status, count in sorted(snap.bad_requests.items()):
        bad.add_metric([str(status)], count)
    families.append(bad)
    closed = CounterMetricFamily(
        "wsgate_closed_by_gateway_total",
        "Sessions the gateway closed itself (drain, backend_removed, rebalance, ...).",
        labels=["reason"],
    )
    for reason, count in sorted(snap.closed_by_gateway.items()):
        closed.add_metric([reason], count)
    families.append(closed)
    counter(
        "wsgate_affinity_fallbacks_total",
        "Admissions that could not go to the affine backend and went elsewhere.",
        snap.affinity_fallbacks,
    )
    relayed = CounterMetricFamily(
        "wsgate_relayed_bytes_total",
        "Bytes relayed after the request head: from_clients (to backends) and to_clients.",
        labels=["direction"],
    )
    relayed.add_metric(["from_clients"], snap.bytes_from_clients)
    relayed.add_metric(["to_clients"], snap.bytes_to_clients)
    families.append(relayed)
    gauge(
        "wsgate_websocket_sessions",
        "Live WebSocket sessions relayed by this replica.",
        snap.sessions_here,
    )
    gauge("wsgate_queued_connections", "Connections waiting for a free slot.", snap.queued)

    # Per backend.
    per_backend: list[tuple[str, str, str, type[GaugeMetricFamily | CounterMetricFamily]]] = [
        ("wsgate_backend_active_connections", "active_here",
         "Live connections to the backend held by this replica.", GaugeMetricFamily),
        ("wsgate_backend_global_active_connections", "active",
         "Live connections to the backend held by all replicas (shared state).", GaugeMetricFamily),
        ("wsgate_backend_max_connections", "max_connections",
         "The backend's cap of concurrent connections.", GaugeMetricFamily),
        ("wsgate_backend_healthy", "healthy",
         "1 when health checks pass and the backend is not ejected.", GaugeMetricFamily),
        ("wsgate_backend_ejected", "ejected",
         "1 while passive outlier detection keeps the backend out.", GaugeMetricFamily),
        ("wsgate_backend_draining", "draining",
         "1 when the backend left discovery and only finishes its connections.", GaugeMetricFamily),
        ("wsgate_backend_admitted_total", "admitted_total",
         "Connections and requests admitted to the backend by this replica.", CounterMetricFamily),
        ("wsgate_backend_rejected_total", "rejected_total",
         "no_capacity answers given while the backend was a full candidate.", CounterMetricFamily),
        ("wsgate_backend_connect_failures_total", "connect_failures_total",
         "Failed attempts to connect to the backend (refused, timed out, closed early).",
         CounterMetricFamily),
        ("wsgate_backend_ejections_total", "ejections_total",
         "Times passive outlier detection ejected the backend.", CounterMetricFamily),
    ]  # fmt: skip
    for name, field, doc, kind in per_backend:
        family = kind(name, doc, labels=["route", "backend"])
        for b in snap.backends:
            family.add_metric([b.route, b.id], float(getattr(b, field)))
        families.append(family)
    families += _route_families(snap)

    # The shared state.
    if snap.tokens_available is not None:
        gauge(
            "wsgate_connect_rate_tokens_available",
            "Tokens left in the global connect-rate bucket (as last seen).",
            snap.tokens_available,
        )
    if snap.rate_burst is not None:
        gauge("wsgate_connect_rate_burst", "Size of the connect-rate bucket.", snap.rate_burst)
    mode = GaugeMetricFamily(
        "wsgate_state_mode", "The state store's mode: 1 for the current one (ok or degraded).",
        labels=["mode"],
    )  # fmt: skip
    for name in STORE_MODES:
        mode.add_metric([name], int(snap.mode == name))
    families.append(mode)
    counter(
        "wsgate_state_errors_total",
        "Calls to the shared state store that failed or timed out.",
        snap.store_errors_total,
    )
    counter(
        "wsgate_state_departures_total",
        "Replicas seen to end (their connections to Redis closed) and reaped before their lease.",
        snap.departures_total,
    )
    gauge(
        "wsgate_live_replicas",
        "Gateway replicas holding a live lease in the shared state (1 for memory).",
        snap.live_replicas,
    )
    return families


def edge_families(stats: EdgeStats, serving: ServingCertificate | None) -> list[Metric]:
    """TLS handshakes and certificate, PROXY protocol headers (see docs/edge.md)."""
    families: list[Metric] = []
    families.append(
        CounterMetricFamily(
            "wsgate_proxy_protocol_headers_total",
            "PROXY protocol headers accepted from trusted sources (LOCAL ones included).",
            value=stats.proxy_headers_total,
        )
    )
    errors = CounterMetricFamily(
        "wsgate_proxy_protocol_errors_total",
        "Connections refused for their PROXY header: malformed, too_long, not_proxy "
        "(a trusted source sent none), timeout, untrusted (a source not trusted sent one).",
        labels=["kind"],
    )
    for kind, count in sorted(stats.proxy_errors.items()):
        errors.add_metric([kind], count)
    families.append(errors)
    if serving is None:
        return families
    families.append(
        CounterMetricFamily(
            "wsgate_tls_handshakes_total",
            "TLS handshakes completed on the listener.",
            value=stats.handshakes_total,
        )
    )
    failures = CounterMetricFamily(
        "wsgate_tls_handshake_failures_total",
        "TLS handshakes that failed on the listener, by reason.",
        labels=["reason"],
    )
    for reason, count in sorted(stats.handshake_failures.items()):
        failures.add_metric([reason], count)
    families.append(failures)
    facts = serving.facts
    families.append(
        GaugeMetricFamily(
            "wsgate_tls_certificate_expiry_seconds",
            "When the serving certificate expires (unix time).",
            value=facts.not_after,
        )
    )
    info = GaugeMetricFamily(
        "wsgate_tls_certificate_info",
        "The serving certificate (always 1).",
        labels=["subject", "issuer", "serial"],
    )
    info.add_metric([facts.subject, facts.issuer, f"{facts.serial:x}"], 1)
    families.append(info)
    families.append(
        CounterMetricFamily(
            "wsgate_tls_reloads_total",
            "New certificate pairs taken into use (SIGHUP or the files changed).",
            value=serving.reloads_total,
        )
    )
    families.append(
        CounterMetricFamily(
            "wsgate_tls_reload_failures_total",
            "New certificate pairs refused (unreadable, not parsable, key not matching).",
            value=serving.reload_failures_total,
        )
    )
    return families


def _route_families(snap: Snapshot) -> list[Metric]:
    """Per route: its match, its connections against its capacity, queue, answers."""
    info = GaugeMetricFamily(
        "wsgate_route_info", "A route and what it matches (always 1; host '*' for any).",
        labels=["route", "host", "path_prefix"],
    )  # fmt: skip
    active = GaugeMetricFamily(
        "wsgate_route_active_connections",
        "Live connections on the route's backends, all replicas (shared state).",
        labels=["route"],
    )
    capacity = GaugeMetricFamily(
        "wsgate_route_max_connections",
        "The sum of the caps of the route's backends that are not draining.",
        labels=["route"],
    )
    queued = GaugeMetricFamily(
        "wsgate_route_queued_connections", "Connections waiting for a slot on the route.",
        labels=["route"],
    )  # fmt: skip
    admitted = CounterMetricFamily(
        "wsgate_route_admitted_total", "Connections and requests admitted on the route.",
        labels=["route"],
    )  # fmt: skip
    rejected = CounterMetricFamily(
        "wsgate_route_rejected_total", "Connections and requests the route refused, by reason.",
        labels=["route", "reason"],
    )  # fmt: skip
    tokens = GaugeMetricFamily(
        "wsgate_route_connect_rate_tokens_available",
        "Tokens left in the route's connect-rate bucket (as last seen).",
        labels=["route"],
    )
    for route in snap.routes:
        backends = [b for b in snap.backends if b.route == route.name]
        info.add_metric([route.name, route.host or "*", route.path_prefix], 1)
        active.add_metric([route.name], sum(b.active for b in backends))
        capacity.add_metric(
            [route.name], sum(b.max_connections for b in backends if not b.draining)
        )
        queued.add_metric([route.name], route.queued)
        admitted.add_metric([route.name], route.admitted_total)
        for reason, count in route.rejected.items():
            rejected.add_metric([route.name, reason], count)
        if route.tokens_available is not None:
            tokens.add_metric([route.name], route.tokens_available)
    return [info, active, capacity, queued, admitted, rejected, tokens]
