"""``wsgate load --threshold``: pass/fail rules on the report's figures, without I/O.

A threshold is one comparison, written as k6 writes its thresholds:
``connect_p99<100ms``, ``rejected_rate<0.01``, ``established>=8``,
``unanswered==0``. Each names one figure of the end-of-run report
(:data:`FIGURES`); times are in milliseconds unless a unit says otherwise
(``us``, ``ms``, ``s``, ``m``), rates are fractions (``0.01``) or percentages
(``1%``). The run exits with status 99 when one fails (k6's code), and the
summary says which failed and by how much.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from wsgate.config import ConfigError

__all__ = [
    "FIGURES",
    "THRESHOLD_FAILED_EXIT",
    "Figure",
    "Kind",
    "Threshold",
    "Verdict",
    "evaluate",
    "figure_value",
    "format_verdicts",
    "parse_threshold",
]

# k6 exits with 99 when a threshold fails; CI scripts written for k6 expect it.
THRESHOLD_FAILED_EXIT = 99


class Kind(Enum):
    """What a figure measures, and so how its limit is written and shown."""

    TIME = "time"  # milliseconds
    COUNT = "count"
    RATE = "rate"  # a fraction of 1
    SPEED = "speed"  # per second


@dataclass(frozen=True)
class Figure:
    """One figure a threshold may name: how to read it from the report."""

    name: str
    kind: Kind
    read: Callable[[Mapping[str, Any]], float]
    storm: bool = False  # only a --storm run reports it
    doc: str = ""


def _latency(which: str, percentile: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda report: float(report["latency_ms"][which][percentile])


def _connections(key: str) -> Callable[[Mapping[str, Any]], float]:
    def read(report: Mapping[str, Any]) -> float:
        value = report["connections"][key]
        return float(sum(value.values()) if isinstance(value, Mapping) else value)

    return read


def _share_of_attempts(key: str) -> Callable[[Mapping[str, Any]], float]:
    def read(report: Mapping[str, Any]) -> float:
        attempted = report["connections"]["attempted"]
        return _connections(key)(report) / attempted if attempted else 0.0

    return read


def _messages(key: str) -> Callable[[Mapping[str, Any]], float]:
    return lambda report: float(report["messages"][key])


def _storm(key: str, scale: float = 1.0) -> Callable[[Mapping[str, Any]], float]:
    def read(report: Mapping[str, Any]) -> float:
        value = report["storm"][key]
        # A storm that never recovered has no recovery time: it fails every bound.
        return float("inf") if value is None else float(value) * scale

    return read


def _figures() -> dict[str, Figure]:
    figures = [
        Figure("attempted", Kind.COUNT, _connections("attempted"), doc="connect attempts"),
        Figure("established", Kind.COUNT, _connections("established"), doc="sessions opened"),
        Figure("peak_open", Kind.COUNT, _connections("peak_open"), doc="most open at once"),
        Figure("open_at_end", Kind.COUNT, _connections("open_at_end")),
        Figure("reconnects", Kind.COUNT, _connections("reconnects")),
        Figure("rejected", Kind.COUNT, _connections("rejected"), doc="refusals, any status"),
        Figure("rejected_rate", Kind.RATE, _share_of_attempts("rejected"), doc="of attempts"),
        Figure("failed", Kind.COUNT, _connections("failed"), doc="timeouts, resets, ..."),
        Figure("failed_rate", Kind.RATE, _share_of_attempts("failed"), doc="of attempts"),
        Figure("closed_by_server", Kind.COUNT, _connections("closed_by_server")),
        Figure("sent", Kind.COUNT, _messages("sent")),
        Figure("received", Kind.COUNT, _messages("received")),
        Figure("unanswered", Kind.COUNT, _messages("unanswered")),
        Figure("messages_per_second", Kind.SPEED, _messages("per_second")),
        Figure("storm_recovery", Kind.TIME, _storm("recovery_s", 1000.0), storm=True),
        Figure("storm_dropped", Kind.COUNT, _storm("dropped"), storm=True),
        Figure("storm_rejected", Kind.COUNT, _storm("rejected"), storm=True),
    ]
    for which in ("connect", "rtt"):
        for percentile in ("p50", "p90", "p99", "max"):
            figures.append(Figure(f"{which}_{percentile}", Kind.TIME, _latency(which, percentile)))
    return {figure.name: figure for figure in figures}


FIGURES: dict[str, Figure] = _figures()

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_EXPRESSION = re.compile(
    r"^\s*(?P<name>[a-z][a-z0-9_]*)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>us|µs|ms|s|m|%)?\s*$"
)
_TIME_UNITS = {None: 1.0, "us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_CLOSED_CODE = re.compile(r"^closed_(\d{4})$")


def _closed_with(code: str) -> Figure:
    def read(report: Mapping[str, Any]) -> float:
        return float(report["connections"]["closed_by_server"].get(code, 0))

    return Figure(f"closed_{code}", Kind.COUNT, read, doc=f"sessions the server closed with {code}")


@dataclass(frozen=True)
class Threshold:
    """``figure op limit``; the limit in the figure's own unit (ms for times)."""

    expression: str
    figure: Figure
    op: str
    limit: float

    def passes(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.limit)


def figure_value(name: str) -> Figure:
    """The figure called ``name`` (``closed_1012`` counts one close code).

    Raises:
        ConfigError: no such figure; the message lists them.
    """
    figure = FIGURES.get(name)
    if figure is not None:
        return figure
    code = _CLOSED_CODE.match(name)
    if code:
        return _closed_with(code.group(1))
    known = ", ".join(sorted(FIGURES))
    raise ConfigError(f"--threshold: no figure {name!r}; known: {known}, closed_<code>")


def parse_threshold(text: str) -> Threshold:
    """``connect_p99<100ms`` as a :class:`Threshold`.

    Raises:
        ConfigError: one line naming what is wrong with the expression.
    """
    match = _EXPRESSION.match(text)
    if match is None:
        raise ConfigError(
            f"--threshold: cannot read {text!r}; write FIGURE OP NUMBER[UNIT] like "
            "connect_p99<100ms, rejected_rate<0.01 or established>=8"
        )
    figure = figure_value(match["name"])
    number = float(match["number"])
    unit = match["unit"]
    if figure.kind is Kind.TIME:
        if unit == "%":
            raise ConfigError(f"--threshold: {text!r}: {figure.name} is a time, not a rate")
        limit = number * _TIME_UNITS[unit]
    elif figure.kind is Kind.RATE:
        if unit not in (None, "%"):
            raise ConfigError(f"--threshold: {text!r}: {figure.name} is a rate like 0.01 or 1%")
        limit = number / 100 if unit == "%" else number
    elif unit is not None:
        raise ConfigError(f"--threshold: {text!r}: {figure.name} is a plain number, no unit")
    else:
        limit = number
    return Threshold(text.strip(), figure, match["op"], limit)


@dataclass(frozen=True)
class Verdict:
    """A threshold held against a report: the figure's value and whether it passed."""

    threshold: Threshold
    value: float
    passed: bool

    @property
    def miss(self) -> float:
        """How far the value is on the wrong side of the limit (0 when it passed)."""
        if self.passed:
            return 0.0
        return abs(self.value - self.threshold.limit)

    def describe(self) -> str:
        threshold = self.threshold
        value = _show(self.value, threshold.figure.kind)
        limit = _show(threshold.limit, threshold.figure.kind)
        if self.passed:
            return f"ok      {threshold.expression}: {value}"
        miss = _show(self.miss, threshold.figure.kind)
        if threshold.op in ("<", "<="):
            how = f"{miss} over {limit}"
        elif threshold.op in (">", ">="):
            how = f"{miss} short of {limit}"
        elif threshold.op == "==":
            how = f"{miss} off {limit}"
        else:
            how = f"equal to {limit}"
        return f"FAILED  {threshold.expression}: {value}, {how}"

    def as_json(self) -> dict[str, Any]:
        def finite(number: float) -> float | None:
            return None if number == float("inf") else round(number, 6)

        return {
            "threshold": self.threshold.expression,
            "figure": self.threshold.figure.name,
            "value": finite(self.value),
            "limit": self.threshold.limit,
            "passed": self.passed,
            "miss": finite(self.miss),
            "summary": self.describe(),
        }


def _show(number: float, kind: Kind) -> str:
    if number == float("inf"):
        return "never"
    if kind is Kind.TIME:
        return f"{number:.6g} ms"
    if kind is Kind.RATE:
        return f"{number:.4g} ({number * 100:.3g}%)"
    if kind is Kind.SPEED:
        return f"{number:.6g}/s"
    return f"{number:.6g}"


def evaluate(thresholds: list[Threshold], report: Mapping[str, Any]) -> list[Verdict]:
    """Every threshold against ``report``, in the order given."""
    verdicts = []
    for threshold in thresholds:
        value = threshold.figure.read(report)
        verdicts.append(Verdict(threshold, value, threshold.passes(value)))
    return verdicts


def format_verdicts(verdicts: list[Mapping[str, Any]]) -> str:
    """The summary's lines for the report's ``thresholds``; a failed one says by how much."""
    failed = sum(not verdict["passed"] for verdict in verdicts)
    head = f"  thresholds: {len(verdicts) - failed} of {len(verdicts)} passed"
    return "\n".join([head, *(f"    {verdict['summary']}" for verdict in verdicts)])
