"""What the gateway counts, as plain numbers the admin API and metrics read.

Counters are plain integers bumped on the data path (an attribute add costs
next to nothing), and so are the two histograms: a :class:`Buckets` is a list
of counts and a sum, observed once per connection or decision. The metrics
collector turns them into Prometheus families when it is scraped, on a
registry of this gateway's own. (prometheus_client's own ``Histogram`` takes a
lock per bucket and per sum on each observation, and an upgrade made two:
about a tenth of the Python an upgrade ran on the memory store, in a profile.)
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

__all__ = ["Buckets", "Stats"]

_DURATION_BUCKETS = (0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 10800, float("inf"))
_ADMISSION_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, float("inf"),
)  # fmt: skip


class Buckets:
    """A histogram as plain numbers: a count per upper bound (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        if not bounds or bounds[-1] != float("inf") or list(bounds) != sorted(bounds):
            raise ValueError("bounds must rise and end with +Inf")
        self.bounds = tuple(bounds)
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound at or above the value: Prometheus's buckets are "le".
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(bound, observations at or below it), as a Prometheus histogram's buckets are."""
        found, total = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            total += count
            found.append((bound, total))
        return found


KINDS = ("websocket", "http")


class Stats:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # How long finished connections lasted, by kind; how long admissions took.
        self.connection_duration = {kind: Buckets(_DURATION_BUCKETS) for kind in KINDS}
        self.admission_latency = Buckets(_ADMISSION_BUCKETS)
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
        self.connection_duration[kind].observe(seconds)
