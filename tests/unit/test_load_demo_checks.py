"""The demo's checks on a load report and the backends' counts, without running anything."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from wsgate.testbed.demo_checks import DemoShape, evaluate, format_checks
from wsgate.testbed.demo_storm import StormTruth, evaluate_storm

PODS = ("pod-a", "pod-b", "pod-c", "pod-d")


def good_run() -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, int]]:
    report = {
        "connections": {
            "attempted": 50,
            "established": 8,
            "rejected": {"503": 40, "429": 2},
            "rejected_by_reason": {"no_capacity": 40, "rate_limited": 2},
            "failed": {},
            "peak_open": 8,
        },
        "by_backend": dict.fromkeys(PODS, 2),
        "messages": {"sent": 30, "received": 30},
    }
    truth = {
        pod: {"peak_connections": 2, "refused": 0, "total_connections": 2, "messages": 7 + (i < 2)}
        for i, pod in enumerate(PODS)
    }
    return report, truth, dict.fromkeys(PODS, 0)


def failures(report: Any, truth: Any, active: Any) -> list[str]:
    return [check.name for check in evaluate(DemoShape(), report, truth, active) if not check.ok]


def test_a_good_run_passes_every_check() -> None:
    checks = evaluate(DemoShape(), *good_run())
    assert [check.ok for check in checks] == [True] * 6
    assert "[PASS]" in format_checks(checks)


def test_a_tripwire_that_fired_fails_the_cap_check() -> None:
    report, truth, active = good_run()
    truth["pod-a"]["refused"] = 1
    report["connections"]["rejected"]["503"] += 1
    report["connections"]["rejected_by_reason"]["backend_full"] = 1
    report["connections"]["attempted"] += 1
    assert failures(report, truth, active) == [
        "no backend ever above its cap of 2",
        "everything else refused by the gateway with 429/503, nothing failed",
    ]


def test_a_backend_above_its_cap_fails() -> None:
    report, truth, active = good_run()
    truth["pod-b"]["peak_connections"] = 3
    assert "no backend ever above its cap of 2" in failures(report, truth, active)


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        (lambda r, t, a: r["messages"].update(received=29), "every message answered"),
        (lambda r, t, a: t["pod-c"].update(total_connections=3), "the load's sessions per backend"),
        (lambda r, t, a: r["connections"]["failed"].update(timeout=1), "everything else refused"),
        (lambda r, t, a: r["connections"].update(peak_open=7), "exactly 8 sessions"),
        (lambda r, t, a: a.update({"gateway:pod-a": 1}), "every slot free"),
    ],
)
def test_each_check_can_fail(change: Any, failed: str) -> None:
    report, truth, active = copy.deepcopy(good_run())
    change(report, truth, active)
    names = failures(report, truth, active)
    assert len(names) == 1 and names[0].startswith(failed), names


class TestStormChecks:
    def report(self, dropped: int, lost: int, outcome: str = "recovered") -> dict[str, Any]:
        return {
            "connections": {"closed_by_server": {"1006": lost}},
            "storm": {"outcome": outcome, "dropped": dropped, "recovery_s": 5.5},
        }

    def truth(self, **counts: int) -> StormTruth:
        truth = StormTruth()
        truth.killed_at = 1.0
        truth.lowest_after_kill = counts.get("lowest", 50)
        truth.held_after_kill = counts.get("held", 100)
        return truth

    def test_a_recovered_storm_within_caps_passes(self) -> None:
        peaks = {"pod-a": {"peak_connections": 25, "refused": 0}}
        checks = evaluate_storm(25, 100, self.report(50, 50), peaks, self.truth())
        assert [ok for _, ok, _ in checks] == [True, True, True]

    def test_each_check_can_fail(self) -> None:
        over = {"pod-a": {"peak_connections": 26, "refused": 1}}
        checks = evaluate_storm(25, 100, self.report(50, 50), over, self.truth())
        assert [ok for _, ok, _ in checks] == [False, True, True]
        peaks = {"pod-a": {"peak_connections": 25, "refused": 0}}
        checks = evaluate_storm(25, 100, self.report(50, 50), peaks, self.truth(held=99))
        assert [ok for _, ok, _ in checks] == [True, False, True]
        checks = evaluate_storm(25, 100, self.report(50, 50, "timed out"), peaks, self.truth())
        assert [ok for _, ok, _ in checks] == [True, True, False]
        checks = evaluate_storm(25, 100, self.report(40, 50), peaks, self.truth())
        assert [ok for _, ok, _ in checks][2] is False
