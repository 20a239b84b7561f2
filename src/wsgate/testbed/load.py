"""``wsgate load``: many real clients against a gateway (or straight at backends).

A run simulates ``--clients`` client pods, each opening ``--connections``
WebSocket sessions one every ``--connect-interval`` (seed 000's client), each
session sending a message every ``--message-interval`` and reading the answer
that names the pod (:mod:`wsgate.testbed.load_ws`). ``--http`` runs seed 004's
long HTTP requests instead (:mod:`wsgate.testbed.load_http`); ``--interactive``
opens a prompt (:mod:`wsgate.testbed.load_shell`). This module holds the flags
and runs the one that was asked for; what the flags mean is decided in
:mod:`wsgate.testbed.load_plan`, what is counted in :mod:`wsgate.testbed.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from wsgate.args import UsageError, count_arg, duration_arg
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging
from wsgate.testbed.health import serve_health
from wsgate.testbed.load_control import follow_stages, run_storm
from wsgate.testbed.load_http import HttpLoad
from wsgate.testbed.load_plan import RECONNECT_CODES, LoadPlan, plan_from_args
from wsgate.testbed.load_shell import interactive
from wsgate.testbed.load_view import watch
from wsgate.testbed.load_ws import WebSocketLoad
from wsgate.testbed.processes import find_pids
from wsgate.testbed.report import LoadStats, build_report, format_report, write_csv, write_plot
from wsgate.testbed.storm import Storm
from wsgate.testbed.thresholds import THRESHOLD_FAILED_EXIT, evaluate

__all__ = ["add_arguments", "exit_status", "run", "run_load", "write_outputs"]

log = logging.getLogger("wsgate.load")


async def run_load(
    plan: LoadPlan,
    *,
    view: str = "auto",
    stop: asyncio.Event | None = None,
    banner: list[str] | None = None,
    progress_interval: float = 2.0,
    health: tuple[str, int] | None = None,
) -> tuple[dict[str, Any], LoadStats]:
    """Run ``plan`` until its duration ends or ``stop`` is set; return the report and counts."""
    stats = LoadStats(mode="http" if plan.http else "websocket", target=plan.target_count)
    stop = stop or asyncio.Event()
    watched = _watched_processes(plan)
    cleanup_health = await serve_health(*health) if health else None
    started = time.monotonic()
    runner = HttpLoad(plan, stats) if plan.http else WebSocketLoad(plan, stats)
    storm = Storm(plan.storm) if plan.storm is not None else None
    steering: asyncio.Task[None] | None = None
    try:
        if isinstance(runner, HttpLoad):
            await runner.start_async()
        else:
            runner.start()
            if plan.stages is not None:
                steering = asyncio.create_task(follow_stages(runner, plan.stages, stop, started))
            elif storm is not None:
                steering = asyncio.create_task(run_storm(runner, storm, stop, started, watched))
        await watch(
            stats,
            plan,
            started,
            stop,
            view=view,
            banner=banner or [],
            progress_interval=progress_interval,
        )
        await runner.stop()
        stats.sample(time.monotonic() - started)
    finally:
        if steering is not None:
            steering.cancel()
            await asyncio.gather(steering, return_exceptions=True)
        if cleanup_health is not None:
            await cleanup_health()
    report = build_report(stats, elapsed=time.monotonic() - started, urls=plan.urls)
    if plan.stages is not None:
        # The live view followed each stage's target; the report names the whole schedule.
        report["target"] = plan.target_count
        report["stages"] = str(plan.stages)
    if storm is not None:
        report["storm"] = storm.report(stats)
    if plan.thresholds:
        report["thresholds"] = [
            verdict.as_json() for verdict in evaluate(list(plan.thresholds), report)
        ]
    return report, stats


def _watched_processes(plan: LoadPlan) -> list[int]:
    """The pids a ``--storm-wait`` run waits for; a name that matches nothing is a usage error."""
    if plan.storm is None or plan.storm.wait_for is None:
        return []
    pids = find_pids(plan.storm.wait_for)
    if not pids:
        raise UsageError(f"--storm-wait: no running process is {plan.storm.wait_for!r}")
    log.warning("Storm: waiting for %s (pid %s) to die", plan.storm.wait_for, pids)
    return pids


def exit_status(report: dict[str, Any]) -> int:
    """99 when a threshold failed (k6's code); 1 when no session opened; else 0."""
    if any(not verdict["passed"] for verdict in report.get("thresholds", [])):
        return THRESHOLD_FAILED_EXIT
    attempted = report["connections"]["attempted"]
    return 1 if attempted and not report["connections"]["established"] else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="+", metavar="URL", help="ws:// URLs (http:// with --http)")
    shape = parser.add_argument_group("shape")
    shape.add_argument(
        "--clients",
        type=count_arg,
        default=1,
        metavar="N",
        help="simulated client pods (default 1)",
    )
    shape.add_argument(
        "--connections",
        type=count_arg,
        default=1,
        metavar="M",
        help="connections per client (default 1)",
    )
    shape.add_argument(
        "--connect-interval",
        type=duration_arg,
        default=0.0,
        metavar="D",
        help="each client opens one new connection every D until it has M (seed: 10s; default 0)",
    )
    shape.add_argument(
        "--connect-rate",
        type=float,
        metavar="R",
        help="at most R connect attempts per second, all clients together",
    )
    shape.add_argument(
        "--message-interval",
        default="10s-20s",
        metavar="A-B",
        help="uniform random wait before each message (default 10s-20s; 0: back-to-back; off)",
    )
    shape.add_argument(
        "--message-size",
        type=count_arg,
        default=64,
        metavar="BYTES",
        help="message size (default 64)",
    )
    shape.add_argument(
        "--duration", type=duration_arg, metavar="D", help="stop after D (default: at Ctrl-C)"
    )
    shape.add_argument(
        "--source-ips",
        metavar="RANGE",
        help="client addresses, e.g. 127.0.0.2-127.0.0.11 (one per client)",
    )
    shape.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header",
    )
    shape.add_argument(
        "--stages",
        metavar="D:N,...",
        help="hold N sessions over time, ramping linearly within each stage, e.g. "
        "30s:1000,1m:1000,10s:0 (k6's stages; ends the run when the last stage does)",
    )
    storm = parser.add_argument_group("reconnect storm")
    storm.add_argument(
        "--storm",
        action="store_true",
        help="hold clients x connections sessions, lose them all at once, and measure "
        "how long until all are back",
    )
    storm.add_argument(
        "--storm-hold",
        type=duration_arg,
        default=5.0,
        metavar="D",
        help="hold every session this long before dropping them (default 5s)",
    )
    storm.add_argument(
        "--storm-wait",
        metavar="PID|NAME",
        help="instead of dropping them, wait for this process (a pid, or text of its "
        "command line) to die, e.g. a gateway replica someone kills",
    )
    storm.add_argument(
        "--storm-timeout",
        type=duration_arg,
        default=120.0,
        metavar="D",
        help="the most each phase may take: opening, waiting, recovering (default 2m)",
    )
    behaviour = parser.add_argument_group("retries and reconnects")
    behaviour.add_argument(
        "--reconnect-codes",
        default=",".join(str(int(code)) for code in sorted(RECONNECT_CODES)),
        metavar="CODES",
        help="close codes that trigger a reconnect (default %(default)s)",
    )
    behaviour.add_argument(
        "--reconnect-delay",
        type=duration_arg,
        default=1.0,
        metavar="D",
        help="mean pause before a reconnect",
    )
    behaviour.add_argument(
        "--backoff-base",
        type=duration_arg,
        default=0.5,
        metavar="D",
        help="first backoff step after a refusal",
    )
    behaviour.add_argument(
        "--backoff-max", type=duration_arg, default=10.0, metavar="D", help="largest backoff step"
    )
    behaviour.add_argument("--connect-timeout", type=duration_arg, default=5.0, metavar="D")
    behaviour.add_argument("--answer-timeout", type=duration_arg, default=10.0, metavar="D")
    behaviour.add_argument(
        "--max-pending",
        type=count_arg,
        default=1000,
        metavar="N",
        help="handshakes in progress at once",
    )
    http = parser.add_argument_group("HTTP mode (seed 004)")
    http.add_argument(
        "--http", action="store_true", help="send long HTTP requests instead of WebSocket sessions"
    )
    http.add_argument(
        "--concurrency",
        type=count_arg,
        metavar="N",
        help="requests in flight (default clients x connections)",
    )
    http.add_argument(
        "--think",
        default="1s-3s",
        metavar="A-B",
        help="pause between a worker's requests (default 1s-3s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="EXPR",
        help="a pass/fail rule on the report, e.g. connect_p99<100ms, rejected_rate<0.01, "
        "established>=8, unanswered==0 (repeatable; exit status 99 when one fails)",
    )
    output.add_argument("--report-json", type=Path, metavar="FILE")
    output.add_argument("--csv", type=Path, metavar="FILE", help="the timeline, one row a sample")
    output.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="open connections and rejections over time"
    )
    output.add_argument(
        "--view",
        choices=["auto", "live", "plain", "none"],
        default="auto",
        help="live view on a terminal, plain lines otherwise",
    )
    output.add_argument("--progress-interval", type=duration_arg, default=2.0, metavar="D")
    output.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="info logs every response with its pod (default warning)",
    )
    other = parser.add_argument_group("other")
    other.add_argument(
        "--health-port", type=int, metavar="PORT", help="serve GET /health on this port"
    )
    other.add_argument("--health-host", default="0.0.0.0", metavar="HOST")
    other.add_argument(
        "--interactive",
        action="store_true",
        help="a prompt: connect N, send TEXT, status, close N, quit",
    )
    other.add_argument(
        "--insecure", action="store_true", help="do not verify TLS certificates (wss://)"
    )
    other.add_argument("--seed", type=int, help="random seed, for repeatable runs")


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=2) + "\n")
    if args.csv:
        write_csv(report, args.csv)
    if args.plot:
        write_plot(report, args.plot)


async def _main(args: argparse.Namespace, plan: LoadPlan) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    health = (args.health_host, args.health_port) if args.health_port else None
    if args.interactive:
        report = await interactive(plan, stop, health=health)
    else:
        if plan.duration is not None:
            loop.call_later(plan.duration, stop.set)
        report, _ = await run_load(
            plan, view=args.view, stop=stop, progress_interval=args.progress_interval, health=health
        )
    print(format_report(report), flush=True)
    write_outputs(report, args)
    return exit_status(report)


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    setup_logging(args.log_level)
    limit = raise_open_files_limit()
    if plan.target_count + 100 > limit:
        log.warning("%d connections wanted but only %d files may be open", plan.target_count, limit)
    try:
        return run_async(_main(args, plan))
    except OSError as error:
        print(f"wsgate load: error: {error}", file=sys.stderr)
        return 2
