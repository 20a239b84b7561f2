"""``wsgate demo --storm``: a reconnect storm, live, on two gateway replicas and one Redis.

100 clients hold sessions through two replicas (50 each, 4 backends capped at
25). Once the backends count all 100, the demo SIGKILLs the second replica, as
a crash would. Its clients lose their sessions (1006), fail over to the
survivor, are refused (503, with ``Retry-After``) while the dead replica's
slots still count in Redis, and are let in as soon as the survivor has seen its
connections to Redis closed (a departure) and reclaimed them. The load
(``wsgate load --storm --storm-wait PID``) times the recovery; the live view and
the plot show the sessions per backend through it. The checks compare with the backends' own counts:

- no backend ever held more than its cap, and no tripwire fired;
- all 100 sessions were held at the backends again after the crash;
- the storm recovered, every session lost was lost by the killed replica.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from typing import Any

from wsgate.testbed.load import run_load
from wsgate.testbed.load_plan import RECONNECT_CODES, Interval, LoadPlan, parse_target
from wsgate.testbed.storm import StormPlan
from wsgate.testbed.topology import BackendProcess, GatewayProcess
from wsgate.wire import CloseCode

__all__ = ["STORM_SHAPE_ARGS", "StormTruth", "evaluate_storm", "storm_scenario"]

# The demo's shape for a storm: DemoShape(**STORM_SHAPE_ARGS).
STORM_SHAPE_ARGS: dict[str, Any] = {
    "backends": 4,
    "cap": 25,
    "tripwire": 25,
    "clients": 10,
    "connections": 10,
    "connect_rate": 200.0,
    "lease_ttl": "5s",
}
_HOLD = 5.0  # seconds all sessions are held before the crash
_STORM_TIMEOUT = 60.0


class StormTruth:
    """What the backends counted through the storm, sampled by the demo itself."""

    def __init__(self) -> None:
        self.killed_at: float | None = None
        self.held_after_kill: int = 0  # the most sessions the backends held after the crash
        self.lowest_after_kill: int | None = None


async def _active(backends: list[BackendProcess]) -> int:
    counts = await asyncio.gather(*(asyncio.to_thread(b.stats) for b in backends))
    return sum(int(stats["active_connections"]) for stats in counts)


async def _crash_when_held(
    backends: list[BackendProcess],
    victim: GatewayProcess,
    sessions: int,
    truth: StormTruth,
    stop: asyncio.Event,
) -> None:
    """SIGKILL ``victim`` once the backends have held every session for a while; then watch."""
    held_since: float | None = None
    while not stop.is_set():
        active = await _active(backends)
        now = time.monotonic()
        if truth.killed_at is None:
            held_since = (held_since or now) if active >= sessions else None
            if held_since is not None and now - held_since >= _HOLD:
                victim.process.signal(signal.SIGKILL)
                truth.killed_at = now
        else:
            truth.held_after_kill = max(truth.held_after_kill, active)
            lowest = truth.lowest_after_kill
            truth.lowest_after_kill = active if lowest is None else min(lowest, active)
        await asyncio.sleep(0.1)


def storm_plan(args: argparse.Namespace, gateways: list[GatewayProcess], sessions: int) -> LoadPlan:
    clients = STORM_SHAPE_ARGS["clients"]
    return LoadPlan(
        targets=[parse_target(gateway.ws_url, http=False) for gateway in gateways],
        clients=clients,
        connections=sessions // clients,
        message_interval=Interval(1.0, 2.0),
        source_ips=[f"127.0.0.{n}" for n in range(2, 2 + clients)],
        reconnect_codes=RECONNECT_CODES | {CloseCode.ABNORMAL_CLOSURE},
        reconnect_delay=0.5,
        backoff_base=0.5,
        backoff_max=5.0,
        seed=args.seed,
        storm=StormPlan(
            sessions=sessions,
            hold=0.0,
            timeout=_STORM_TIMEOUT,
            wait_for=str(gateways[-1].process.pid),
        ),
    )


async def storm_scenario(
    args: argparse.Namespace,
    backends: list[BackendProcess],
    gateways: list[GatewayProcess],
    sessions: int,
) -> tuple[dict[str, Any], StormTruth]:
    """Hold ``sessions``, crash the last replica, run until they are all back."""
    plan = storm_plan(args, gateways, sessions)
    truth = StormTruth()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    banner = [
        f"dashboards: {'  '.join(g.admin_url + '/dashboard' for g in gateways)}",
        f"storm: {sessions} sessions over {len(gateways)} replicas; {gateways[-1].name} "
        f"(pid {gateways[-1].process.pid}) is SIGKILLed {_HOLD:g}s after the backends hold "
        f"them all; its slots stay counted in Redis until the survivor sees its "
        f"connections to Redis close (under 2 s; its lease, {STORM_SHAPE_ARGS['lease_ttl']}, "
        "if nothing closed them)",
    ]
    crash = asyncio.create_task(_crash_when_held(backends, gateways[-1], sessions, truth, stop))
    try:
        report, _ = await run_load(plan, view=args.view, stop=stop, banner=banner)
    finally:
        stop.set()
        await asyncio.gather(crash, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return report, truth


def evaluate_storm(
    cap: int, sessions: int, report: dict[str, Any], peaks: dict[str, Any], truth: StormTruth
) -> list[tuple[str, bool, str]]:
    """The storm demo's checks as (name, passed, detail), from the backends' counts (pure)."""
    refused = {pod: s["refused"] for pod, s in peaks.items() if s["refused"]}
    highest = {pod: s["peak_connections"] for pod, s in peaks.items()}
    storm = report.get("storm") or {}
    lost = report["connections"]["closed_by_server"].get("1006", 0)
    return [
        (
            f"no backend ever above its cap of {cap}",
            max(highest.values(), default=0) <= cap and not refused,
            f"peaks {highest}" + (f"; tripwires fired: {refused}" if refused else ""),
        ),
        (
            f"all {sessions} sessions held at the backends again after the crash",
            truth.killed_at is not None and truth.held_after_kill >= sessions,
            f"lowest {truth.lowest_after_kill}, then {truth.held_after_kill} held",
        ),
        (
            "the storm recovered; the sessions lost were the killed replica's",
            storm.get("outcome") == "recovered" and 0 < storm.get("dropped", 0) == lost,
            f"{storm.get('outcome')}: {storm.get('dropped')} lost, {lost} closed with 1006, "
            f"back in {storm.get('recovery_s')} s; {storm.get('rejected')} refusals with "
            f"Retry-After {storm.get('retry_after_s')}",
        ),
    ]
