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

__all__ = ["Figure", "Report", "percentile", "summary"]

BASELINE = "haproxy"
DIRECT = "direct"


def percentile(ordered: Sequence[int] | Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of already sorted values (``fraction`` in 0..1)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(fraction * len(ordered)))
    return float(ordered[min(rank, len(ordered)) - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 1),
        "min": round(min(values), 1),
        "max": round(max(values), 1),
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
class Report:
    paths: list[str]
    meta: dict[str, Any]
    status: dict[str, str] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

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
        figure = self.figures[key]
        value, baseline = figure.median(path), figure.median(BASELINE)
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
                "Path median / HAProxy median. ↑: higher is better, ↓: lower is better.",
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
    if unit == "us" and abs(value) < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _cell(values: list[float] | None, unit: str) -> str:
    if not values:
        return "—"
    middle = _number(statistics.median(values), unit)
    if len(values) == 1:
        return middle
    return f"{middle} ({_number(min(values), unit)}..{_number(max(values), unit)})"
