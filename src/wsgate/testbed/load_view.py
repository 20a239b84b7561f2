"""What a load run shows while it runs: a rich live view on a terminal, plain lines elsewhere.

:func:`watch` is the run's clock: it takes the timeline samples the report and
the plot are drawn from, refreshes the view, and returns when the run is told
to stop. The views themselves are pure functions of the counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from wsgate.testbed.load_plan import LoadPlan
from wsgate.testbed.report import LoadStats, latency_summary

__all__ = ["live_table", "progress_line", "sample_interval", "watch"]


def _counts(mapping: dict[str, int]) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(mapping.items()) if value) or "0"


def progress_line(stats: LoadStats, elapsed: float, per_second: float) -> str:
    """One plain line: the run at a glance (for logs and CI)."""
    opened = "in flight" if stats.mode == "http" else "open"
    per_pod = _counts(dict(stats.open_by_backend if stats.mode != "http" else stats.by_backend))
    return (
        f"t={elapsed:.0f}s {opened} {stats.open}/{stats.target} "
        f"established={stats.established} attempted={stats.attempted} "
        f"rejected[{_counts(dict(stats.rejected))}] failed[{_counts(dict(stats.failed))}] "
        f"reconnects={stats.reconnects} msgs {stats.sent}/{stats.received} ({per_second:.0f}/s) "
        f"pods[{per_pod}]"
    )


def live_table(
    stats: LoadStats, elapsed: float, per_second: float, banner: list[str], title: str
) -> Group:
    """The live view: connections against target, per backend, rejections, messages."""
    http = stats.mode == "http"
    overview = Table.grid(padding=(0, 2))
    overview.add_column(style="bold")
    overview.add_column()
    overview.add_row(
        "in flight" if http else "open",
        f"{stats.open} / {stats.target} (peak {stats.peak_open})",
    )
    overview.add_row("established", f"{stats.established} of {stats.attempted} attempts")
    overview.add_row(
        "rejected",
        _counts(dict(stats.rejected))
        + (f"  ({_counts(dict(stats.rejected_reasons))})" if stats.rejected_reasons else ""),
    )
    if stats.failed:
        overview.add_row("failed", _counts(dict(stats.failed)))
    overview.add_row("reconnects", str(stats.reconnects))
    rtt = latency_summary(stats.rtt)
    overview.add_row(
        "responses" if http else "messages",
        f"{stats.sent} sent, {stats.received} received, {per_second:.0f}/s, "
        f"rtt p50 {rtt['p50']} ms p99 {rtt['p99']} ms",
    )
    backends = Table(title="per backend", title_justify="left", expand=False)
    backends.add_column("pod")
    if not http:
        backends.add_column("open", justify="right")
    backends.add_column("responses" if http else "sessions", justify="right")
    for pod in sorted(set(stats.by_backend) | set(stats.open_by_backend)):
        row = [pod] + ([] if http else [str(stats.open_by_backend.get(pod, 0))])
        backends.add_row(*row, str(stats.by_backend.get(pod, 0)))
    header = Text(f"{title}  {elapsed:.0f}s", style="bold cyan")
    return Group(header, *(Text(line) for line in banner), overview, backends)


def sample_interval(plan: LoadPlan) -> float:
    """Seconds between timeline samples: about 60 a run, finer through a storm."""
    if plan.storm is not None:
        return 0.1
    length = plan.stages.duration if plan.stages is not None else plan.duration
    return 1.0 if length is None or length > 60 else max(0.1, length / 60)


async def watch(
    stats: LoadStats,
    plan: LoadPlan,
    started: float,
    stop: asyncio.Event,
    *,
    view: str = "auto",
    banner: list[str] | None = None,
    progress_interval: float = 2.0,
) -> None:
    """Sample the run and show it until ``stop`` is set."""
    if view == "auto":
        view = "live" if sys.stdout.isatty() else "plain"
    banner = banner or []
    sample_every = sample_interval(plan)
    refresh_every = min(sample_every, 0.25) if view == "live" else sample_every
    title = f"wsgate load -> {', '.join(plan.urls)}"
    last_rate = (time.monotonic(), stats.received)
    per_second = 0.0
    next_sample = next_progress = time.monotonic()
    if view == "plain":
        for line in banner:
            print(line, file=sys.stderr, flush=True)
    live = (
        Live(console=Console(), refresh_per_second=4, transient=False) if view == "live" else None
    )
    with live if live is not None else contextlib.nullcontext():
        while not stop.is_set():
            now = time.monotonic()
            if now - last_rate[0] >= 1.0:
                per_second = (stats.received - last_rate[1]) / (now - last_rate[0])
                last_rate = (now, stats.received)
            if now >= next_sample:
                stats.sample(now - started)
                next_sample += sample_every
            if live is not None:
                live.update(live_table(stats, now - started, per_second, banner, title))
            elif view == "plain" and now >= next_progress:
                print(progress_line(stats, now - started, per_second), file=sys.stderr, flush=True)
                next_progress = now + progress_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), refresh_every)
