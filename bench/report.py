"""The figures of one benchmark run, and how they are written out (no I/O here).

A :class:`Report` holds, for every figure (a table row) and every path (a
column), the value of each repetition. Cells show the median and the spread
(min..max); a second table gives each path's median as a ratio to HAProxy's
from the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Figure", "Report", "Scaling", "baseline_of", "percentile", "summary"]

BASELINE = "haproxy"
DIRECT = "direct"


def baseline_of(path: str) -> str:
    """What ``path`` is compared with: HAProxy doing the same work (with TLS or without)."""
    tls_baseline = f"{BASELINE}-tls"
    if path.endswith("-tls") and path != tls_baseline:
        return tls_baseline
    return BASELINE


def percentile(ordered: Sequence[int] | Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (``fraction`` in 0..1)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


@dataclass
class Figure:
    """One row: a measured quantity, its unit, and which way is better."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    runs: dict[str, list[float]] = field(default_factory=dict)
    rounds: dict[str, list[int]] = field(default_factory=dict)  # the round of each run

    def median(self, path: str) -> float | None:
        values = self.runs.get(path)
        return statistics.median(values) if values else None


@dataclass
class Scaling:
    """Relay throughput of 1 and of N gateway workers, each held to the same CPU budget.

    Rounds alternate between the worker counts; :meth:`ratios` pairs the
    figures of each round, so that a slow moment of the machine lands on both
    sides of a ratio.
    """

    budget: float  # CPUs per worker
    setting: str  # what was measured, in words
    status: str = "not run"
    # workers -> round -> (messages/s, CPUs used by all workers together)
    runs: dict[int, dict[int, tuple[float, float]]] = field(default_factory=dict)

    def add(self, workers: int, round_index: int, rate: float, cpus_used: float) -> None:
        self.runs.setdefault(workers, {})[round_index] = (rate, cpus_used)

    def rates(self, workers: int) -> list[float]:
        return [rate for rate, _ in self.runs.get(workers, {}).values()]

    def cpus_used(self, workers: int) -> list[float]:
        return [cpus for _, cpus in self.runs.get(workers, {}).values()]

    def ratios(self, workers: int) -> list[float]:
        """Per round with both figures: the rate with ``workers`` workers over one worker's."""
        one, many = self.runs.get(1, {}), self.runs.get(workers, {})
        return [many[r][0] / one[r][0] for r in sorted(one.keys() & many.keys()) if one[r][0] > 0]

    def to_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for count in sorted(self.runs):
            rates = self.rates(count)
            if not rates:
                continue
            found[str(count)] = {
                "rate": summary(rates),
                "runs": [round(rate, 1) for rate in rates],
                "cpus_used": summary(self.cpus_used(count), 3),
            }
            if count != 1 and self.ratios(count):
                found[str(count)]["ratio_vs_one"] = summary(self.ratios(count), 3)
        return {
            "budget_cpus_per_worker": self.budget,
            "setting": self.setting,
            "status": self.status,
            "workers": found,
        }

    def to_markdown(self) -> list[str]:
        lines = ["## Workers, each held to the same CPU budget", "", f"{self.setting}.", ""]
        lines += [f"Status: {self.status}.", ""]
        if not self.rates(1):
            return lines
        lines += [
            "| workers | relay (msg/s) | CPUs used, all workers | vs 1 worker, same round |",
            "|---:|---:|---:|---:|",
        ]
        for count in sorted(self.runs):
            versus = "1.00x" if count == 1 else _ratio_cell(self.ratios(count))
            rates, used = _cell(self.rates(count), "msg/s"), _cell(self.cpus_used(count), "cpus")
            lines.append(f"| {count} | {rates} | {used} | {versus} |")
        return lines


@dataclass
class Report:
    paths: list[str]
    meta: dict[str, Any]
    status: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    scaling: Scaling | None = None

    def declare(self, key: str, title: str, unit: str, *, higher_is_better: bool) -> None:
        if key not in self.figures:
            self.figures[key] = Figure(key, title, unit, higher_is_better)

    def add(self, key: str, path: str, value: float, round_index: int | None = None) -> None:
        figure = self.figures[key]
        figure.runs.setdefault(path, []).append(value)
        rounds = figure.rounds.setdefault(path, [])
        rounds.append(len(rounds) if round_index is None else round_index)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def derive_added(self, key: str, base_key: str) -> None:
        """What each path adds to the direct path's value of ``base_key`` in the same round."""
        base = self.figures.get(base_key)
        if base is None or DIRECT not in base.runs:
            return
        direct = dict(zip(base.rounds[DIRECT], base.runs[DIRECT], strict=True))
        self.declare(key, f"added over direct: {base.title}", base.unit, higher_is_better=False)
        for path, values in base.runs.items():
            if path == DIRECT:
                continue
            for round_index, value in zip(base.rounds[path], values, strict=True):
                if round_index in direct:
                    self.add(key, path, value - direct[round_index], round_index)

    def ratio(self, key: str, path: str) -> float | None:
        """``path``'s median over HAProxy's; a TLS path's over HAProxy's with TLS."""
        figure = self.figures[key]
        value, baseline = figure.median(path), figure.median(baseline_of(path))
        if value is None or baseline is None or baseline <= 0:
            return None
        return value / baseline

    def headroom(self, key: str) -> tuple[float, str] | None:
        """How far the direct path stands above the best proxied path on ``key``."""
        figure = self.figures.get(key)
        if figure is None:
            return None
        direct = figure.median(DIRECT)
        proxied = [
            (value, path)
            for path in self.paths
            if path != DIRECT and (value := figure.median(path)) is not None
        ]
        if direct is None or not proxied:
            return None
        best, best_path = max(proxied)
        return (direct / best if best > 0 else math.inf), best_path

    # ------------------------------------------------------------ output

    def to_json(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        for key, figure in self.figures.items():
            figures[key] = {
                "title": figure.title,
                "unit": figure.unit,
                "higher_is_better": figure.higher_is_better,
                "paths": {
                    path: {"runs": [round(value, 1) for value in values], **summary(values)}
                    for path, values in figure.runs.items()
                    if values
                },
                "ratio_vs_haproxy": {
                    path: round(ratio, 3)
                    for path in self.paths
                    if path != BASELINE and (ratio := self.ratio(key, path)) is not None
                },
            }
        return {
            "meta": self.meta,
            "paths": {path: self.status.get(path, "not run") for path in self.paths},
            "figures": figures,
            **({"workers": self.scaling.to_json()} if self.scaling is not None else {}),
            "notes": self.notes,
        }

    def to_markdown(self) -> str:
        meta = self.meta
        lines = [
            f"# wsgate benchmark: {meta.get('title', 'latest run')}",
            "",
            f"- When: {meta.get('started', '?')}, {meta.get('elapsed_s', 0):.0f} s;"
            f" machine: {meta.get('machine', '?')}",
            f"- Command: `{meta.get('command', 'python -m bench')}`",
            f"- {meta.get('method', '')}",
            "",
            "Each cell: median of the repetitions, (min..max) when there were several.",
            "",
        ]
        shown = [path for path in self.paths if self.status.get(path, "").startswith("ok")]
        lines.append("| figure | " + " | ".join(shown) + " |")
        lines.append("|---|" + "---:|" * len(shown))
        for figure in self.figures.values():
            if not any(figure.runs.get(path) for path in shown):
                continue
            cells = [_cell(figure.runs.get(path), figure.unit) for path in shown]
            lines.append(
                f"| {figure.title} ({_unit_label(figure.unit)}) | " + " | ".join(cells) + " |"
            )
        others = [path for path in shown if path != BASELINE]
        if BASELINE in shown and others:
            lines += [
                "",
                "## Ratios against HAProxy, same run",
                "",
                "Path median / HAProxy median (a -tls path's / haproxy-tls's, when it ran). "
                "↑: higher is better, ↓: lower is better.",
                "",
                "| figure | " + " | ".join(others) + " |",
                "|---|" + "---:|" * len(others),
            ]
            for key, figure in self.figures.items():
                ratios = [self.ratio(key, path) for path in others]
                if all(ratio is None for ratio in ratios):
                    continue
                arrow = "↑" if figure.higher_is_better else "↓"
                cells = ["—" if ratio is None else f"{ratio:.2f}x" for ratio in ratios]
                lines.append(f"| {figure.title} {arrow} | " + " | ".join(cells) + " |")
        if self.scaling is not None:
            lines += ["", *self.scaling.to_markdown()]
        lines += ["", "## Paths", ""]
        for path in self.paths:
            lines.append(f"- **{path}**: {self.status.get(path, 'not run')}")
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def _unit_label(unit: str) -> str:
    return {"us": "µs", "bytes": "bytes/conn"}.get(unit, unit)


def _number(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "cpus":
        return f"{value:.2f}"
    if unit == "us" and abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _ratio_cell(ratios: list[float]) -> str:
    if not ratios:
        return "—"
    middle = f"{statistics.median(ratios):.2f}x"
    return middle if len(ratios) == 1 else f"{middle} ({min(ratios):.2f}..{max(ratios):.2f})"


def _cell(values: list[float] | None, unit: str) -> str:
    if not values:
        return "—"
    middle = _number(statistics.median(values), unit)
    if len(values) == 1:
        return middle
    return f"{middle} ({_number(min(values), unit)}..{_number(max(values), unit)})"
