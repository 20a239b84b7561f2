"""``--threshold``: pass/fail rules on the report's figures, and the exit status they give."""

from __future__ import annotations

import operator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.config import ConfigError
from wsgate.testbed.load import exit_status
from wsgate.testbed.report import LoadStats, build_report, format_report
from wsgate.testbed.thresholds import FIGURES, Kind, evaluate, parse_threshold


def report_of(**counts: Any) -> dict[str, Any]:
    """A report built the way a run builds it: 10 attempts, 8 sessions, 2 refused."""
    stats = LoadStats(target=10)
    for key, value in counts.items():
        setattr(stats, key, value)
    for _ in range(8):
        stats.opened(connect_microseconds=40_000)
    stats.opened(connect_microseconds=150_000)
    stats.refused(503, "no_capacity", retry_after=1.0)
    stats.refused(429, "rate_limited", retry_after=2.0)
    stats.closed("pod-a", 1012)
    stats.attempted = 11
    stats.sent, stats.received = 20, 19
    return build_report(stats, elapsed=2.0, urls=["ws://127.0.0.1:1/"])


class TestParsing:
    @pytest.mark.parametrize(
        ("text", "figure", "op", "limit"),
        [
            ("connect_p99<100ms", "connect_p99", "<", 100.0),
            ("connect_p99 < 0.1s", "connect_p99", "<", 100.0),
            ("rtt_max<=250us", "rtt_max", "<=", 0.25),
            ("connect_p50<20", "connect_p50", "<", 20.0),  # milliseconds, as k6 writes them
            ("rejected_rate<0.01", "rejected_rate", "<", 0.01),
            ("rejected_rate<1%", "rejected_rate", "<", 0.01),
            ("established>=8", "established", ">=", 8.0),
            ("unanswered==0", "unanswered", "==", 0.0),
            ("closed_1012!=0", "closed_1012", "!=", 0.0),
            ("storm_recovery<5s", "storm_recovery", "<", 5000.0),
        ],
    )
    def test_the_k6_forms(self, text: str, figure: str, op: str, limit: float) -> None:
        threshold = parse_threshold(text)
        assert (threshold.figure.name, threshold.op, threshold.limit) == (figure, op, limit)

    @pytest.mark.parametrize(
        ("text", "complaint"),
        [
            ("connect_p99", "cannot read"),
            ("connect_p99<<3", "cannot read"),
            ("p99<100ms", "no figure 'p99'"),
            ("established>=8ms", "plain number"),
            ("connect_p99<1%", "a time"),
            ("rejected_rate<3s", "a rate"),
            ("established>=-1", "cannot read"),
        ],
    )
    def test_a_bad_expression_is_one_line(self, text: str, complaint: str) -> None:
        with pytest.raises(ConfigError, match=complaint) as caught:
            parse_threshold(text)
        assert str(caught.value).startswith("--threshold")
        assert "\n" not in str(caught.value)


class TestEvaluation:
    def test_figures_are_read_from_the_report(self) -> None:
        report = report_of()
        values = {
            name: FIGURES[name].read(report)
            for name in ("attempted", "established", "rejected", "unanswered", "closed_by_server")
        }
        assert values == {
            "attempted": 11,
            "established": 9,
            "rejected": 2,
            "unanswered": 1,
            "closed_by_server": 1,
        }
        assert FIGURES["rejected_rate"].read(report) == pytest.approx(2 / 11)
        assert FIGURES["connect_p50"].read(report) == pytest.approx(40.0, rel=0.01)
        assert FIGURES["connect_max"].read(report) == pytest.approx(150.0, rel=0.01)
        assert parse_threshold("closed_1012==1").figure.read(report) == 1
        assert parse_threshold("closed_1001==0").figure.read(report) == 0

    def test_failures_say_by_how_much(self) -> None:
        report = report_of()
        expressions = ["connect_p99<100ms", "established>=10", "unanswered==0", "rejected_rate<1"]
        verdicts = evaluate([parse_threshold(e) for e in expressions], report)
        assert [v.passed for v in verdicts] == [False, False, False, True]
        assert verdicts[0].miss == pytest.approx(50.0, rel=0.01)
        assert "over 100 ms" in verdicts[0].describe()
        assert verdicts[1].describe() == "FAILED  established>=10: 9, 1 short of 10"
        assert verdicts[2].describe() == "FAILED  unanswered==0: 1, 1 off 0"
        assert verdicts[3].describe().startswith("ok      rejected_rate<1: 0.1818")

    def test_the_summary_and_the_exit_status(self) -> None:
        report = report_of()
        verdicts = evaluate([parse_threshold("established>=8")], report)
        report["thresholds"] = [v.as_json() for v in verdicts]
        assert exit_status(report) == 0
        verdicts = evaluate([parse_threshold(t) for t in ("established>=8", "sent<5")], report)
        report["thresholds"] = [v.as_json() for v in verdicts]
        assert exit_status(report) == 99
        summary = format_report(report)
        assert "thresholds: 1 of 2 passed" in summary
        assert "FAILED  sent<5: 20, 15 over 5" in summary
        assert report["thresholds"][1] == {
            "threshold": "sent<5",
            "figure": "sent",
            "value": 20.0,
            "limit": 5.0,
            "passed": False,
            "miss": 15.0,
            "summary": "FAILED  sent<5: 20, 15 over 5",
        }

    def test_a_storm_that_never_recovered_fails_its_bound(self) -> None:
        report = report_of()
        report["storm"] = {"recovery_s": None, "dropped": 8, "rejected": 0}
        [verdict] = evaluate([parse_threshold("storm_recovery<60s")], report)
        assert not verdict.passed
        assert verdict.as_json()["value"] is None
        assert "never" in verdict.describe()


_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_OPS |= {"==": operator.eq, "!=": operator.ne}
counts = sorted(name for name, figure in FIGURES.items() if figure.kind is Kind.COUNT)


@given(
    name=st.sampled_from([n for n in counts if not FIGURES[n].storm]),
    op=st.sampled_from(sorted(_OPS)),
    limit=st.integers(0, 30),
)
def test_a_verdict_is_the_comparison_it_names(name: str, op: str, limit: int) -> None:
    report = report_of()
    [verdict] = evaluate([parse_threshold(f"{name}{op}{limit}")], report)
    value = FIGURES[name].read(report)
    assert verdict.passed is _OPS[op](value, limit)
    assert verdict.miss == (0 if verdict.passed else abs(value - limit))
