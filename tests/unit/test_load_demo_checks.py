"""The demo's checks on a load report and the backends' counts, without running anything."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from wsgate.testbed.demo import DemoShape, evaluate, format_checks

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
