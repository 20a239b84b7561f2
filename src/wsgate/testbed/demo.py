"""``wsgate demo``: the whole system on one machine, run against the seed scenario and checked.

It starts 4 demo backends (each with a tripwire at 2 sessions), a gateway (cap 2
per backend, 1 connect/s with a burst of 10, least connections, health checks)
and runs seed 000's clients through it: 10 clients x 5 sessions, one new session
every 10 s per client, a message every 10-20 s. ``--speed`` divides every client
time, so ``--speed 2`` runs the same scenario twice as fast. At the end the
backends' own counts are the truth the checks compare with:

- no backend ever held more than its cap, and no tripwire fired;
- every slot was used: the gateway admitted exactly as many sessions as fit;
- everything else was refused with 429 or 503, and nothing failed otherwise;
- the load's count per backend equals each backend's own count;
- every message was answered;
- every slot was free again once the clients left.

The run exits non-zero when a check fails. ``--replicas N`` puts N gateways on
one private redis-server; ``--keep`` leaves everything up to explore.
``--storm`` runs a reconnect storm instead (:mod:`wsgate.testbed.demo_storm`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from wsgate.args import UsageError, duration_arg, positive_arg
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging
from wsgate.testbed.demo_checks import (
    CLIENTS,
    CONNECTIONS,
    Check,
    DemoShape,
    evaluate,
    format_checks,
)
from wsgate.testbed.demo_storm import STORM_SHAPE_ARGS, evaluate_storm, storm_scenario
from wsgate.testbed.load import run_load
from wsgate.testbed.load_plan import Interval, LoadPlan, parse_target
from wsgate.testbed.processes import (
    ProcessGroup,
    RedisServer,
    find_redis_server,
    free_port,
    wsgate_argv,
)
from wsgate.testbed.report import format_report, write_csv, write_plot
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends

__all__ = ["add_arguments", "run"]

_CONNECT_INTERVAL = 10.0
_MESSAGE_INTERVAL = Interval(10.0, 20.0)
_ADMIN_PORT = 9901
_LISTEN_PORT = 8080


def _port(preferred: int) -> int:
    """The usual port when it is free (so the README's URLs work), else any free port."""
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def _ready(gateway: GatewayProcess) -> bool:
    try:
        with urllib.request.urlopen(gateway.admin_url + "/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _gateway_active(gateways: list[GatewayProcess]) -> dict[str, int]:
    held: dict[str, int] = {}
    for gateway in gateways:
        with contextlib.suppress(OSError, ValueError, KeyError):
            for backend in gateway.admin("/clusters")["backends"]:
                # This replica's own count: exact, where "active" is the last shared count seen.
                held[f"{gateway.name}:{backend['id']}"] = int(backend["active_here"])
    return held


def _settle(backends: list[BackendProcess], within: float = 5.0) -> dict[str, int]:
    """Backends' open sessions once closes have landed (bounded wait)."""
    deadline = time.monotonic() + within
    while True:
        active = {b.pod_id: int(b.stats()["active_connections"]) for b in backends}
        if not any(active.values()) or time.monotonic() > deadline:
            return active
        time.sleep(0.05)


def _start_gateway(group: ProcessGroup, name: str, config: dict[str, Any]) -> GatewayProcess:
    path = group.log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = int(config["listen"].rsplit(":", 1)[1])
    admin_port = int(config["admin"].rsplit(":", 1)[1])
    process = group.start(name, wsgate_argv("serve", "-c", str(path)), port=("127.0.0.1", port))
    return GatewayProcess(name, port, admin_port, process, config, str(path))


def build(
    group: ProcessGroup, args: argparse.Namespace, shape: DemoShape
) -> tuple[list[BackendProcess], list[GatewayProcess]]:
    state: str | dict[str, str] = "memory"
    if args.replicas > 1:
        if find_redis_server() is None:
            raise UsageError(
                f"--replicas {args.replicas} needs redis-server to share state, and none was "
                "found on PATH; install it (./scripts/setup.sh) or run with --replicas 1"
            )
        state = RedisServer(group).start().url
        if shape.lease_ttl is not None:
            state = {"store": state, "lease_ttl": shape.lease_ttl}
    backends = start_backends(group, shape.backends, tripwire=shape.tripwire)
    gateways = []
    for index in range(args.replicas):
        name = "gateway" if args.replicas == 1 else f"gateway-{index + 1}"
        config = {
            "listen": f"127.0.0.1:{_port(_LISTEN_PORT + index)}",
            "admin": f"127.0.0.1:{_port(_ADMIN_PORT + index)}",
            "state": state,
            "backends": [{"address": b.address, "id": b.pod_id} for b in backends],
            "balance": "least_conn",
            "limits": {
                "max_connections_per_backend": args.gateway_cap or shape.cap,
                "connect_rate": {"per_second": shape.connect_rate, "burst": 10},
            },
            "health": {"path": "/health", "interval": "1s", "timeout": "500ms"},
        }
        gateways.append(_start_gateway(group, name, config))
    deadline = time.monotonic() + 15
    while not all(_ready(gateway) for gateway in gateways):
        if time.monotonic() > deadline:
            raise RuntimeError("the gateway did not become ready within 15 s; see its log")
        time.sleep(0.1)
    return backends, gateways


def plan_for(args: argparse.Namespace, gateways: list[GatewayProcess]) -> LoadPlan:
    scale = 1.0 / args.speed
    return LoadPlan(
        targets=[parse_target(gateway.ws_url, http=False) for gateway in gateways],
        clients=CLIENTS,
        connections=CONNECTIONS,
        connect_interval=_CONNECT_INTERVAL * scale,
        message_interval=_MESSAGE_INTERVAL.scaled(scale),
        duration=args.duration * scale,
        source_ips=[f"127.0.0.{n}" for n in range(2, 2 + CLIENTS)],
        backoff_base=0.5,
        backoff_max=5.0,
        seed=args.seed,
    )


async def _scenario(
    args: argparse.Namespace, backends: list[BackendProcess], gateways: list[GatewayProcess]
) -> tuple[dict[str, Any], bool]:
    """Run the clients; ``True`` when the run was cut short by Ctrl-C."""
    plan = plan_for(args, gateways)
    stop = asyncio.Event()
    interrupted = False

    def interrupt() -> None:
        nonlocal interrupted
        interrupted = True
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    assert plan.duration is not None
    loop.call_later(plan.duration, stop.set)
    banner = [
        f"dashboard: {gateways[0].admin_url}/dashboard"
        + "".join(f"  {g.admin_url}/dashboard" for g in gateways[1:]),
        f"gateway{'s' if len(gateways) > 1 else ''}: {', '.join(g.ws_url for g in gateways)}"
        f"   backends: {', '.join(b.pod_id + '@' + b.address for b in backends)}",
        f"scenario: {plan.clients} clients x {plan.connections} sessions, one every "
        f"{plan.connect_interval:g}s, a message every {_MESSAGE_INTERVAL.low / args.speed:g}-"
        f"{_MESSAGE_INTERVAL.high / args.speed:g}s, for {plan.duration:g}s (speed {args.speed:g})",
    ]
    report, _ = await run_load(plan, view=args.view, stop=stop, banner=banner)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(signum)
    return report, interrupted


async def _wait_for_interrupt() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


def demo(args: argparse.Namespace) -> int:
    shape = DemoShape(**STORM_SHAPE_ARGS) if args.storm else DemoShape()
    if args.storm:
        args.replicas = max(2, args.replicas)
    log_dir = Path(args.log_dir) if args.log_dir else None
    with ProcessGroup(log_dir) as group:
        print(
            f"wsgate demo: starting {shape.backends} backends and {args.replicas} "
            f"gateway(s); logs in {group.log_dir}",
            flush=True,
        )
        try:
            backends, gateways = build(group, args, shape)
        except (RuntimeError, TimeoutError) as error:
            head, _, output = str(error).partition("\n")
            tail = "\n".join(output.splitlines()[-15:])
            print(f"wsgate demo: error: {head}" + (f"\n{tail}" if tail else ""), file=sys.stderr)
            return 1
        if args.storm:
            report, storm_truth = run_async(storm_scenario(args, backends, gateways, shape.wanted))
            interrupted = False
        else:
            report, interrupted = run_async(_scenario(args, backends, gateways))
        signal.signal(signal.SIGTERM, _raise_interrupt)  # the loop put the default back
        print(format_report(report), flush=True)
        if args.report_json:
            Path(args.report_json).write_text(json.dumps(report, indent=2) + "\n")
        if args.csv:
            write_csv(report, Path(args.csv))
        if args.plot:
            write_plot(report, Path(args.plot))
        if interrupted:
            print("wsgate demo: interrupted; stopping everything (no checks)", flush=True)
            return 130
        if args.storm:
            truth = {backend.pod_id: backend.stats() for backend in backends}
            outcome = evaluate_storm(shape.cap, shape.wanted, report, truth, storm_truth)
            checks = [Check(*check) for check in outcome]
        else:
            checks = _checks(shape, report, backends, gateways)
        print(format_checks(checks), flush=True)
        failed = [check for check in checks if not check.ok]
        print(
            f"wsgate demo: {'FAILED' if failed else 'passed'} "
            f"({len(checks) - len(failed)} of {len(checks)} checks passed)",
            flush=True,
        )
        if args.keep:
            print(
                "wsgate demo: everything is still running (dashboard "
                f"{gateways[0].admin_url}/dashboard, logs in {group.log_dir}); Ctrl-C stops it all",
                flush=True,
            )
            run_async(_wait_for_interrupt())
        return 1 if failed else 0


def _checks(
    shape: DemoShape,
    report: dict[str, Any],
    backends: list[BackendProcess],
    gateways: list[GatewayProcess],
) -> list[Check]:
    active = _settle(backends)
    deadline = time.monotonic() + 3
    held = _gateway_active(gateways)
    while any(held.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        held = _gateway_active(gateways)
    active.update(held)
    truth = {backend.pod_id: backend.stats() for backend in backends}
    return evaluate(shape, report, truth, active)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speed",
        type=positive_arg,
        default=1.0,
        metavar="X",
        help="run the client scenario X times faster (default 1)",
    )
    parser.add_argument(
        "--duration",
        type=duration_arg,
        default=60.0,
        metavar="D",
        help="scenario length before --speed (default 60s)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="gateways sharing a private redis-server",
    )
    parser.add_argument(
        "--storm",
        action="store_true",
        help="a reconnect storm instead: 100 sessions on 2 replicas, one SIGKILLed "
        "(see wsgate.testbed.demo_storm)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="leave everything running after the report"
    )
    parser.add_argument("--view", choices=["auto", "live", "plain", "none"], default="auto")
    parser.add_argument("--report-json", metavar="FILE")
    parser.add_argument("--csv", metavar="FILE")
    parser.add_argument("--plot", metavar="FILE.png")
    parser.add_argument("--log-dir", metavar="DIR", help="keep the processes' logs here")
    parser.add_argument("--seed", type=int, help="random seed for the clients")
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    # For the test that proves the checks can fail: a gateway cap above the backends' tripwire.
    parser.add_argument("--gateway-cap", type=int, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise UsageError("--replicas must be at least 1")
    setup_logging(args.log_level)
    raise_open_files_limit()
    # SIGTERM outside the event loop unwinds like Ctrl-C, so the processes are stopped.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return demo(args)
    except KeyboardInterrupt:
        print("wsgate demo: interrupted; everything stopped", file=sys.stderr)
        return 130
