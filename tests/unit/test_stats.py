"""The gateway's histograms as plain buckets, and their Prometheus exposition."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from wsgate.admin.metrics import histogram_families
from wsgate.gateway.stats import Buckets, Stats


def test_a_value_on_a_bound_counts_in_that_bucket_and_past_the_last_in_inf() -> None:
    buckets = Buckets((0.1, 1.0, float("inf")))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        buckets.observe(value)
    assert buckets.counts == [2, 2, 1]
    assert buckets.cumulative() == [(0.1, 2), (1.0, 4), (float("inf"), 5)]
    assert buckets.count == 5 and buckets.sum == pytest.approx(8.65)


@pytest.mark.parametrize("bounds", [(), (1.0, 2.0), (2.0, 1.0, float("inf"))])
def test_bounds_must_rise_and_end_with_inf(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bounds"):
        Buckets(bounds)


class _Histograms:
    def __init__(self, stats: Stats):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        return iter(histogram_families(self.stats))


def test_the_exposition_is_a_cumulative_histogram_per_kind() -> None:
    stats = Stats()
    for seconds in (0.005, 0.2, 4000.0):
        stats.observe_duration("websocket", seconds)
    stats.observe_duration("http", 0.05)
    stats.admission_latency.observe(0.00003)
    registry = CollectorRegistry()
    registry.register(_Histograms(stats))
    text = generate_latest(registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ws = (("kind", "websocket"),)
    assert samples[("wsgate_connection_duration_seconds_bucket", (*ws, ("le", "0.01")))] == 1
    assert samples[("wsgate_connection_duration_seconds_bucket", (*ws, ("le", "0.5")))] == 2
    assert samples[("wsgate_connection_duration_seconds_bucket", (*ws, ("le", "3600.0")))] == 2
    assert samples[("wsgate_connection_duration_seconds_bucket", (*ws, ("le", "+Inf")))] == 3
    assert samples[("wsgate_connection_duration_seconds_count", ws)] == 3
    assert samples[("wsgate_connection_duration_seconds_sum", ws)] == pytest.approx(4000.205)
    assert samples[("wsgate_connection_duration_seconds_count", (("kind", "http"),))] == 1
    assert samples[("wsgate_admission_latency_seconds_bucket", (("le", "5e-05"),))] == 1
    assert samples[("wsgate_admission_latency_seconds_count", ())] == 1
