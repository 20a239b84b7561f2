"""The load report built from counts alone: JSON shape, text, CSV and plot."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from wsgate.testbed.load_view import live_table, progress_line
from wsgate.testbed.report import LoadStats, build_report, format_report, timeline_rows, write_plot


def scripted_run() -> LoadStats:
    stats = LoadStats(mode="websocket", target=6)
    stats.sample(0.0)
    for pod, connect_us in [("pod-a", 900), ("pod-b", 1100), ("pod-a", 1500)]:
        stats.attempted += 1
        stats.opened(connect_us)
        stats.pod_known(pod)
    stats.attempted += 1
    stats.opened(2000)  # closed before its first answer: its pod stays unknown
    stats.closed(None, 1006)
    for _ in range(3):
        stats.attempted += 1
        stats.refused(503, "no_capacity")
    stats.attempted += 1
    stats.refused(429, "rate_limited")
    stats.failed["ECONNREFUSED"] += 1
    for rtt_us in (100, 200, 300, 400, 10_000):
        stats.sent += 1
        stats.received += 1
        stats.rtt.record_value(rtt_us)
    stats.sent += 1
    stats.sample(1.0)
    stats.closed("pod-b", 1012)
    stats.reconnects += 1
    stats.sample(2.0)
    return stats


def test_the_report_has_the_documented_shape_and_totals() -> None:
    report = build_report(scripted_run(), elapsed=2.0, urls=["ws://gw/"])
    connections = report["connections"]
    assert connections["attempted"] == 8
    assert connections["established"] == 4
    assert connections["rejected"] == {"429": 1, "503": 3}
    assert connections["rejected_by_reason"] == {"no_capacity": 3, "rate_limited": 1}
    assert connections["reconnects"] == 1
    assert connections["closed_by_server"] == {"1006": 1, "1012": 1}
    assert connections["open_at_end"] == 2
    assert connections["peak_open"] == 4
    assert report["by_backend"] == {"pod-a": 2, "pod-b": 1, "unknown": 1}
    assert sum(report["by_backend"].values()) == connections["established"]
    assert report["messages"] == {"sent": 6, "received": 5, "unanswered": 1, "per_second": 2.5}
    rtt = report["latency_ms"]["rtt"]
    assert rtt["count"] == 5
    assert rtt["p50"] == 0.3
    assert 9.9 <= rtt["max"] <= 10.01
    assert report["latency_ms"]["connect"]["p50"] in (1.1, 1.101)
    assert [s["open_by_backend"] for s in report["timeline"]] == [
        {},
        {"pod-a": 2, "pod-b": 1},
        {"pod-a": 2},
    ]


def test_an_empty_run_reports_zeros() -> None:
    report = build_report(LoadStats(), elapsed=0.0, urls=["ws://gw/"])
    assert report["latency_ms"]["rtt"] == {
        "count": 0,
        "p50": 0.0,
        "p90": 0.0,
        "p99": 0.0,
        "max": 0.0,
    }
    assert report["by_backend"] == {}
    assert "0 attempted" in format_report(report)


def test_the_text_report_names_backends_and_refusals() -> None:
    text = format_report(build_report(scripted_run(), elapsed=2.0, urls=["ws://gw/"]))
    assert "pod-a: 2, pod-b: 1, unknown: 1" in text
    assert "503: 3" in text and "no_capacity: 3" in text
    assert "1 unanswered" in text


def test_the_csv_has_a_column_per_backend() -> None:
    rows = timeline_rows(build_report(scripted_run(), elapsed=2.0, urls=["ws://gw/"]))
    parsed = list(csv.reader(io.StringIO("\n".join(",".join(r) for r in rows))))
    assert parsed[0][-2:] == ["open:pod-a", "open:pod-b"]
    assert parsed[2][1] == "3"  # open at t=1
    assert parsed[2][-2:] == ["2", "1"]
    assert len(parsed) == 4


def test_the_plot_is_a_png(tmp_path: Path) -> None:
    path = tmp_path / "run.png"
    write_plot(build_report(scripted_run(), elapsed=2.0, urls=["ws://gw/"]), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plain_progress_line_and_the_live_table() -> None:
    stats = scripted_run()
    line = progress_line(stats, 12.3, 42.0)
    assert line.startswith("t=12s open 2/6")
    assert "503=3" in line and "pod-a=2" in line
    assert "\n" not in line
    group = live_table(stats, 12.3, 42.0, ["dashboard: http://x"], "title")
    assert len(group.renderables) == 4
