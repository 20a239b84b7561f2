"""What ``wsgate demo`` builds, and the checks of what the backends counted (no I/O).

The demo's verdict is a pure function of the load's report and the backends'
own counts (``/stats``), so the checks are tested on numbers, and a test can
show each one failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["CLIENTS", "CONNECTIONS", "Check", "DemoShape", "evaluate", "format_checks"]

# Seed 000's clients: 10 pods of 5 sessions each.
CLIENTS = 10
CONNECTIONS = 5
_GATEWAY_REASONS = frozenset({"rate_limited", "client_rate_limited", "no_capacity"})


@dataclass(frozen=True)
class DemoShape:
    """What the demo builds, and so what it must observe."""

    backends: int = 4
    cap: int = 2
    tripwire: int = 2
    clients: int = CLIENTS
    connections: int = CONNECTIONS
    connect_rate: float = 1.0  # the gateway's, per second, with a burst of 10
    lease_ttl: str | None = None  # the replicas' lease (the store's default when None)

    @property
    def capacity(self) -> int:
        return self.backends * self.cap

    @property
    def wanted(self) -> int:
        return self.clients * self.connections


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def evaluate(
    shape: DemoShape,
    report: dict[str, Any],
    truth: dict[str, dict[str, Any]],
    active_after: dict[str, int] | None = None,
) -> list[Check]:
    """The demo's checks: the load's report against the backends' own counts (pure)."""
    connections = report["connections"]
    peaks = {pod: stats["peak_connections"] for pod, stats in truth.items()}
    refused = {pod: stats["refused"] for pod, stats in truth.items() if stats["refused"]}
    checks = [
        Check(
            f"no backend ever above its cap of {shape.cap}",
            max(peaks.values(), default=0) <= shape.cap and not refused,
            f"peaks {peaks}"
            + (f"; tripwires fired: {refused} sessions refused by backends" if refused else ""),
        )
    ]
    expected = min(shape.capacity, shape.wanted)
    spread = (
        all(peak == shape.cap for peak in peaks.values())
        if shape.wanted >= shape.capacity
        else True
    )
    checks.append(
        Check(
            f"exactly {expected} sessions held at once, {shape.cap} on every backend",
            connections["peak_open"] == expected and sum(peaks.values()) == expected and spread,
            f"load saw a peak of {connections['peak_open']} open; backends' peaks {peaks}",
        )
    )
    refusals = sum(connections["rejected"].values())
    odd_statuses = {s: n for s, n in connections["rejected"].items() if s not in ("429", "503")}
    # Refusals must come from the gateway's admission, not from a backend's tripwire.
    odd_reasons = {
        reason: n
        for reason, n in connections["rejected_by_reason"].items()
        if reason not in _GATEWAY_REASONS
    }
    expected_refusals = connections["attempted"] - connections["established"]
    checks.append(
        Check(
            "everything else refused by the gateway with 429/503, nothing failed",
            refusals == expected_refusals
            and not odd_statuses
            and not odd_reasons
            and not connections["failed"]
            and (refusals > 0 or shape.wanted <= shape.capacity),
            f"{refusals} refused {connections['rejected']} of {connections['attempted']} attempts"
            + (f"; not by the gateway: {odd_reasons}" if odd_reasons else "")
            + (f"; failed {connections['failed']}" if connections["failed"] else ""),
        )
    )
    counted = {
        pod: stats["total_connections"]
        for pod, stats in truth.items()
        if stats["total_connections"]
    }
    checks.append(
        Check(
            "the load's sessions per backend equal the backends' own counts",
            report["by_backend"] == counted and sum(counted.values()) == connections["established"],
            f"load {report['by_backend']}; backends {counted}",
        )
    )
    messages = report["messages"]
    answered = sum(stats["messages"] for stats in truth.values())
    checks.append(
        Check(
            "every message answered",
            messages["sent"] == messages["received"] == answered and messages["sent"] > 0,
            f"{messages['sent']} sent, {messages['received']} answered, backends saw {answered}",
        )
    )
    if active_after is not None:
        held = {key: n for key, n in active_after.items() if n}
        checks.append(
            Check(
                "every slot free once the clients left",
                not held,
                f"still held: {held}" if held else "0 held at the backends and the gateways",
            )
        )
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = ["checks:"]
    for check in checks:
        mark = "PASS" if check.ok else "FAIL"
        lines.append(f"  [{mark}] {check.name}: {check.detail}")
    return "\n".join(lines)
