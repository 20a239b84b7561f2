"""What a load run counted, and the report built from it (no sockets here).

:class:`LoadStats` is the tally the load generator's I/O layer updates as things
happen; :func:`build_report` turns it into the JSON document of ``--report-json``;
:func:`format_report`, :func:`write_csv` and :func:`write_plot` present that
document. Latencies go to HDR histograms in microseconds, so percentiles stay
exact to three significant digits however many samples there are.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from wsgate.testbed.thresholds import format_verdicts

__all__ = [
    "LoadStats",
    "Sample",
    "build_report",
    "format_report",
    "latency_summary",
    "new_histogram",
    "timeline_rows",
    "write_csv",
    "write_plot",
]

_HIGHEST_MICROSECONDS = 3_600_000_000


def new_histogram() -> HdrHistogram:
    """Microseconds from 1 µs to one hour, three significant digits."""
    return HdrHistogram(1, _HIGHEST_MICROSECONDS, 3)


def latency_summary(histogram: HdrHistogram) -> dict[str, float | int]:
    """p50/p90/p99/max in milliseconds, and the sample count."""
    count = int(histogram.get_total_count())
    if count == 0:
        return {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    return {
        "count": count,
        "p50": round(histogram.get_value_at_percentile(50) / 1000, 3),
        "p90": round(histogram.get_value_at_percentile(90) / 1000, 3),
        "p99": round(histogram.get_value_at_percentile(99) / 1000, 3),
        "max": round(histogram.get_max_value() / 1000, 3),
    }


@dataclass(frozen=True)
class Sample:
    """The run at one instant, for the live view, the CSV and the plot."""

    t: float
    target: int
    open: int
    open_by_backend: dict[str, int]
    attempted: int
    established: int
    rejected: int
    rejected_by_status: dict[str, int]
    sent: int
    received: int


@dataclass
class LoadStats:
    """Everything a load run counts, updated by its I/O layer as things happen.

    For WebSocket runs a connection is a session, ``open`` the sessions open now
    and ``by_backend`` the sessions each pod accepted (the pod named in its
    answers). For ``--http`` runs a connection is a request, ``open`` the
    requests in flight and ``by_backend`` the responses each pod sent.
    """

    mode: str = "websocket"
    target: int = 0
    attempted: int = 0
    established: int = 0
    reconnects: int = 0
    open: int = 0
    peak_open: int = 0
    sent: int = 0
    received: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    closed_by_server: Counter[str] = field(default_factory=Counter)
    # pod -> close code -> sessions the server closed (1006: the connection was lost).
    closed_by_backend: dict[str, Counter[str]] = field(default_factory=dict)
    retry_after: Counter[str] = field(default_factory=Counter)  # seconds -> refusals
    by_backend: Counter[str] = field(default_factory=Counter)
    open_by_backend: Counter[str] = field(default_factory=Counter)
    connect_latency: HdrHistogram = field(default_factory=new_histogram)
    rtt: HdrHistogram = field(default_factory=new_histogram)
    timeline: list[Sample] = field(default_factory=list)

    def opened(self, connect_microseconds: int) -> None:
        self.established += 1
        self.open += 1
        if self.open > self.peak_open:
            self.peak_open = self.open
        self.connect_latency.record_value(max(1, connect_microseconds))

    def pod_known(self, pod: str) -> None:
        """The first answer on an open session named its pod."""
        self.by_backend[pod] += 1
        self.open_by_backend[pod] += 1

    def closed(self, pod: str | None, code: int | None) -> None:
        """A session ended; ``code`` is set when the server closed it (or the connection broke)."""
        self.open -= 1
        if pod is not None:
            self.open_by_backend[pod] -= 1
        if code is not None:
            self.closed_by_server[str(code)] += 1
            self.closed_by_backend.setdefault(pod or "unknown", Counter())[str(code)] += 1

    def refused(self, status: int, reason: str | None, retry_after: float | None = None) -> None:
        self.rejected[str(status)] += 1
        if reason:
            self.rejected_reasons[reason] += 1
        if retry_after is not None:
            self.retry_after[f"{retry_after:g}"] += 1

    def sample(self, t: float) -> Sample:
        snapshot = Sample(
            t=round(t, 3),
            target=self.target,
            open=self.open,
            open_by_backend={pod: n for pod, n in sorted(self.open_by_backend.items()) if n},
            attempted=self.attempted,
            established=self.established,
            rejected=sum(self.rejected.values()),
            rejected_by_status=dict(sorted(self.rejected.items())),
            sent=self.sent,
            received=self.received,
        )
        self.timeline.append(snapshot)
        return snapshot


def build_report(stats: LoadStats, *, elapsed: float, urls: list[str]) -> dict[str, Any]:
    """The ``--report-json`` document."""
    by_backend = dict(sorted((pod, n) for pod, n in stats.by_backend.items() if n))
    unknown = stats.established - sum(by_backend.values())
    if stats.mode == "websocket" and unknown > 0:
        # Sessions that closed (or the run ended) before any answer named a pod.
        by_backend["unknown"] = unknown
    active = elapsed if elapsed > 0 else 1.0
    return {
        "mode": stats.mode,
        "urls": urls,
        "elapsed_s": round(elapsed, 3),
        "target": stats.target,
        "connections": {
            "attempted": stats.attempted,
            "established": stats.established,
            "rejected": dict(sorted(stats.rejected.items())),
            "rejected_by_reason": dict(sorted(stats.rejected_reasons.items())),
            "failed": dict(sorted(stats.failed.items())),
            "reconnects": stats.reconnects,
            "closed_by_server": dict(sorted(stats.closed_by_server.items())),
            "closed_by_backend": {
                pod: dict(sorted(codes.items()))
                for pod, codes in sorted(stats.closed_by_backend.items())
            },
            "retry_after_s": dict(sorted(stats.retry_after.items(), key=lambda i: float(i[0]))),
            "open_at_end": stats.open,
            "peak_open": stats.peak_open,
        },
        "by_backend": by_backend,
        "messages": {
            "sent": stats.sent,
            "received": stats.received,
            "unanswered": max(0, stats.sent - stats.received),
            "per_second": round(stats.received / active, 1),
        },
        "latency_ms": {
            "connect": latency_summary(stats.connect_latency),
            "rtt": latency_summary(stats.rtt),
        },
        "timeline": [
            {
                "t": s.t,
                "target": s.target,
                "open": s.open,
                "open_by_backend": s.open_by_backend,
                "attempted": s.attempted,
                "established": s.established,
                "rejected": s.rejected,
                "rejected_by_status": s.rejected_by_status,
                "sent": s.sent,
                "received": s.received,
            }
            for s in stats.timeline
        ],
    }


def format_report(report: dict[str, Any]) -> str:
    """The end-of-run summary for the terminal."""
    connections = report["connections"]
    messages = report["messages"]
    latency = report["latency_ms"]
    kind = "requests" if report["mode"] == "http" else "connections"
    answered = "responses" if report["mode"] == "http" else "messages"

    def counts(mapping: dict[str, int]) -> str:
        return ", ".join(f"{key}: {value}" for key, value in mapping.items()) or "none"

    def percentiles(summary: dict[str, float]) -> str:
        return (
            f"p50 {summary['p50']} ms, p90 {summary['p90']} ms, "
            f"p99 {summary['p99']} ms, max {summary['max']} ms"
        )

    lines = [
        f"wsgate load: {report['mode']} against {', '.join(report['urls'])} "
        f"for {report['elapsed_s']:.1f} s",
        f"  {kind}: {connections['attempted']} attempted, {connections['established']} "
        f"established, {connections['open_at_end']} open at the end "
        f"(peak {connections['peak_open']}, target {report['target']})",
        f"  rejected: {counts(connections['rejected'])}"
        + (
            f" (reasons: {counts(connections['rejected_by_reason'])})"
            if connections["rejected_by_reason"]
            else ""
        ),
        f"  failed: {counts(connections['failed'])}; reconnects: {connections['reconnects']}; "
        f"closed by server: {counts(connections['closed_by_server'])}",
        *(
            f"    closed by {pod}: {counts(codes)}"
            for pod, codes in connections["closed_by_backend"].items()
        ),
        f"  by backend: {counts(report['by_backend'])}",
        f"  {answered}: {messages['sent']} sent, {messages['received']} received, "
        f"{messages['unanswered']} unanswered ({messages['per_second']}/s)",
        f"  connect latency: {percentiles(latency['connect'])}",
        f"  round trip: {percentiles(latency['rtt'])}",
    ]
    storm = report.get("storm")
    if storm is not None:
        recovery = storm["recovery_s"]
        lines.append(
            f"  storm ({storm['trigger']}): {storm['outcome']}; {storm['dropped']} of "
            f"{storm['sessions']} sessions lost"
            + (f", all back in {recovery:.2f} s" if recovery is not None else "")
            + f"; {storm['attempts']} attempts, rejected: {counts(storm['rejected_by_status'])}"
            + f", Retry-After: {counts(storm['retry_after_s'])}"
        )
    if "thresholds" in report:
        lines.append(format_verdicts(report["thresholds"]))
    return "\n".join(lines)


def timeline_rows(report: dict[str, Any]) -> list[list[str]]:
    """The timeline as CSV rows: one column per counter, then one per backend."""
    pods = sorted({pod for sample in report["timeline"] for pod in sample["open_by_backend"]})
    header = ["t_s", "open", "attempted", "established", "rejected", "sent", "received"]
    rows = [header + [f"open:{pod}" for pod in pods]]
    for sample in report["timeline"]:
        rows.append(
            [str(sample[column]) for column in ("t", *header[1:])]
            + [str(sample["open_by_backend"].get(pod, 0)) for pod in pods]
        )
    return rows


def write_csv(report: dict[str, Any], path: Path) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(timeline_rows(report))
    path.write_text(buffer.getvalue())


def _per_second(times: list[float], totals: list[int], window: float = 1.0) -> list[float]:
    """Rates of a cumulative count over a trailing window of at least ``window`` seconds."""
    rates = []
    start = 0
    for index, now in enumerate(times):
        while start < index and now - times[start + 1] >= window:
            start += 1
        span = now - times[start]
        rates.append((totals[index] - totals[start]) / span if span > 0 else 0.0)
    return rates


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Open connections per backend, and rejections per second, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = report["timeline"]
    times = [sample["t"] for sample in timeline]
    pods = sorted({pod for sample in timeline for pod in sample["open_by_backend"]})
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    if pods:
        # Stacked, so the top edge is the total and each band one backend's share.
        top.stackplot(
            times,
            *[[s["open_by_backend"].get(pod, 0) for s in timeline] for pod in pods],
            labels=pods,
            step="post",
            alpha=0.8,
        )
    else:
        top.step(times, [s["open"] for s in timeline], where="post", color="black")
    if "stages" in report:
        targets = [s.get("target", 0) for s in timeline]
        top.plot(times, targets, color="black", linestyle="--", linewidth=1, label="target")
    if pods or "stages" in report:
        top.legend(loc="upper left", fontsize="small", ncol=4)
    storm = report.get("storm")
    if storm is not None:
        # The loss and the moment every session was back: the storm's recovery time.
        for key, label in (("dropped_at_s", "lost"), ("recovered_at_s", "all back")):
            if storm[key] is not None:
                for axis in (top, bottom):
                    axis.axvline(storm[key], color="red", linestyle=":", linewidth=1)
                top.annotate(label, (storm[key], 0), textcoords="offset points", xytext=(3, 3))
    top.set_ylabel("open " + ("requests" if report["mode"] == "http" else "connections"))
    statuses = sorted({status for s in timeline for status in s["rejected_by_status"]})
    for status in statuses:
        counts = [s["rejected_by_status"].get(status, 0) for s in timeline]
        bottom.step(times, _per_second(times, counts), where="post", label=status)
    if statuses:
        bottom.legend(loc="upper left", fontsize="small", title="status")
    bottom.set_ylabel("rejections / s")
    bottom.set_xlabel("seconds since start")
    title = f"wsgate load against {', '.join(report['urls'])}"
    if storm is not None and storm["recovery_s"] is not None:
        title += f": {storm['dropped']} sessions lost, all back in {storm['recovery_s']:.2f} s"
    figure.suptitle(title, fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
