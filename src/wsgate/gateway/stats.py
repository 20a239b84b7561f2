"""What the gateway counts, as plain numbers the admin API and metrics read.

Counters are plain integers bumped on the data path (an attribute add costs
next to nothing); the histograms are prometheus_client's, observed once per
connection or decision, on a registry of this gateway's own.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram

__all__ = ["Stats"]

_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 10800, float("inf"))
_ADMISSION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, float("inf"),
)  # fmt: skip


class Stats:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connection_duration = Histogram(
            "wsgate_connection_duration_seconds",
            "How long finished connections (WebSocket sessions, HTTP requests) lasted.",
            ["kind"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.admission_latency = Histogram(
            "wsgate_admission_latency_seconds",
            "Time to decide one admission in the state store.",
            buckets=_ADMISSION_BUCKETS,
            registry=self.registry,
        )
        # Label lookups cost more than the observation: resolve them once.
        self._duration_by_kind = {
            kind: self.connection_duration.labels(kind) for kind in ("websocket", "http")
        }
        self.accepted_total = 0  # client connections accepted by the listener
        self.admitted_total = 0
        self.rejected: Counter[str] = Counter()  # by reason
        self.bad_requests: Counter[int] = Counter()  # by status
        self.closed_by_gateway: Counter[str] = (
            Counter()
        )  # drain / rebalance / excess / max_duration
        self.affinity_fallbacks = 0
        # Bytes of finished connections; live ones are added at read time.
        self.bytes_from_clients = 0
        self.bytes_to_clients = 0

    def observe_duration(self, kind: str, seconds: float) -> None:
        self._duration_by_kind[kind].observe(seconds)
