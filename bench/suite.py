"""``python -m bench``: every path through every figure, written to bench/results/.

The run starts one echo backend, every path in front of it, and a pool of
driver processes; then it measures:

1. memory per idle connection, once per path on its freshly started process;
2. ``--repetitions`` rounds of relay throughput, round-trip latency and
   connection set-up rate, visiting the paths in a rotated order each round so
   that a slow moment of the machine does not always land on the same path;
3. the most concurrent connections each path holds, once per path;
4. relay throughput of one gateway worker and of ``--scaling-workers``, every
   worker held to the same ``--worker-budget`` of CPU (see bench/budget.py),
   last.

It writes ``latest.md`` and ``latest.json`` in ``--out``. docs/performance.md
explains the method and what the figures mean.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn, TypeVar

from bench.budget import BudgetUnavailable, CpuBudgets
from bench.driver import DriverError, DriverPool, ExchangeTotals, Target
from bench.proxies import (
    BASE_PATHS,
    Endpoint,
    Unavailable,
    parse_path_name,
    pin_tree,
    redis_pid,
    start_echo,
    start_path,
    tree_cpu_seconds,
    tree_rss,
    worker_pids,
)
from bench.report import Report, Scaling, percentile
from bench.results import write_results
from wsgate.runtime import raise_open_files_limit
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["FIGURES", "Plan", "machine", "main", "plan_from_args", "usage_error"]

FIGURES = ("relay", "latency", "setup", "memory", "max-conns", "workers")
# The paced latency window of each round, cut into this many turns per path.
LATENCY_SLICES = 5
T = TypeVar("T")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    paths: tuple[str, ...]
    figures: frozenset[str]
    repetitions: int
    warmup: float
    duration: float
    sizes: tuple[int, ...]
    conns: tuple[int, ...]
    latency_conns: int
    latency_rate: float
    setup_concurrency: int
    idle_conns: int
    max_conns_bound: int
    drivers: int
    echo_processes: int
    out: Path
    smoke: bool
    keep_logs: bool
    pin: bool
    proxy_buffer: int | None
    proxy_budget: float | None  # CPUs per proxy process, None for a whole CPU
    settle: float  # seconds for a process to settle after connections open or close
    scaling_workers: int
    worker_budget: float  # CPUs per gateway worker in the workers figure


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark wsgate side by side with HAProxy and nginx on this machine.",
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="tiny sizes, one repetition: proves the bench works")
    add("--paths", help=f"comma-separated paths (default: {','.join(BASE_PATHS)})")
    add("--figures", help=f"comma-separated figures (default: {','.join(FIGURES)})")
    add("--repetitions", type=int, help="rounds of the rate figures (default 3, smoke 1)")
    add("--duration", type=float, help="seconds measured per figure (default 2.5)")
    add("--warmup", type=float, help="seconds of load before measuring (default 0.5)")
    add("--sizes", help="relay message sizes in bytes (default 64,16384)")
    add("--conns", help="relay connection counts (default 50,1000)")
    add("--latency-rate", type=float, help="paced messages/s for the latency figure (2000)")
    add("--latency-conns", type=int, help="connections for the latency figure (50)")
    add("--setup-concurrency", type=int, help="concurrent connectors for set-up rate (50)")
    add("--idle-conns", type=int, help="idle connections for the memory figure (5000)")
    add("--max-conns-bound", type=int, help="stop the max-connections figure here (30000)")
    add("--drivers", type=int, help="driver processes (default: the load side's CPUs, at least 2)")
    add(
        "--echo-processes",
        type=int,
        help="echo backend processes (default: a third of the load side's CPUs, at least 1)",
    )
    add(
        "--scaling-workers",
        type=int,
        help="worker count compared with one in the workers figure (default 2)",
    )
    add(
        "--worker-budget",
        type=float,
        metavar="CPUS",
        help="CPU time each gateway worker may use in the workers figure (default 0.2)",
    )
    add("--out", type=Path, help="directory for latest.md/latest.json (default bench/results)")
    add(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bind the proxy to its own CPU(s) and the driver and echo to the others "
        "(default: on with 2 CPUs or more)",
    )
    add(
        "--proxy-buffer",
        type=int,
        metavar="BYTES",
        help="HAProxy tune.bufsize and nginx proxy_buffer_size (default: theirs)",
    )
    add(
        "--proxy-budget",
        type=float,
        metavar="CPUS",
        help="hold every proxy process to this much CPU time (a cgroup quota), so that "
        "the proxies, not the load side, limit the rate figures (default: no limit)",
    )
    add("--keep-logs", action="store_true", help="keep the work directory with configs and logs")
    return parser


def usage_error(message: str, prog: str = "python -m bench") -> NoReturn:
    """A mistake in the flags: one line on stderr and exit status 2, as argparse's own."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        usage_error(f"{flag} takes comma-separated integers")
    if not values or min(values) < 1:
        usage_error(f"{flag} takes positive integers")
    return values


def plan_from_args(args: argparse.Namespace) -> Plan:
    smoke = bool(args.smoke)

    def pick(value: T | None, full: T, tiny: T) -> T:
        return value if value is not None else (tiny if smoke else full)

    paths = tuple(p.strip() for p in (args.paths or ",".join(BASE_PATHS)).split(",") if p.strip())
    for path in paths:
        try:
            parse_path_name(path)
        except ValueError as error:
            usage_error(str(error))
    figures = frozenset(f.strip() for f in (args.figures or ",".join(FIGURES)).split(","))
    unknown = figures - set(FIGURES)
    if unknown:
        usage_error(f"unknown figure {sorted(unknown)[0]!r}; choose from {', '.join(FIGURES)}")
    pin = args.pin if args.pin is not None else len(os.sched_getaffinity(0)) >= 2
    # Drivers and echo share the CPUs the proxy does not use; about a third go to the echo.
    load_cpus = (
        len(cpu_split(sorted(os.sched_getaffinity(0)), 1)[0]) if pin else os.cpu_count() or 2
    )
    echo_processes = args.echo_processes or max(1, load_cpus // 3)
    plan = Plan(
        paths=paths,
        figures=figures,
        repetitions=pick(args.repetitions, 3, 1),
        warmup=pick(args.warmup, 0.5, 0.1),
        duration=pick(args.duration, 2.5, 0.3),
        sizes=_ints(args.sizes, "--sizes") if args.sizes else (64, 16384),
        conns=_ints(args.conns, "--conns") if args.conns else ((10, 40) if smoke else (50, 1000)),
        latency_conns=pick(args.latency_conns, 50, 10),
        latency_rate=pick(args.latency_rate, 2000.0, 200.0),
        setup_concurrency=pick(args.setup_concurrency, 50, 10),
        idle_conns=pick(args.idle_conns, 5000, 200),
        max_conns_bound=pick(args.max_conns_bound, 30000, 300),
        drivers=args.drivers or max(2, load_cpus - echo_processes),
        echo_processes=echo_processes,
        out=args.out or (RESULTS / "smoke.tmp" if smoke else RESULTS),
        smoke=smoke,
        keep_logs=bool(args.keep_logs),
        pin=pin,
        proxy_buffer=args.proxy_buffer,
        proxy_budget=args.proxy_budget,
        settle=0.2 if smoke else 1.0,
        scaling_workers=args.scaling_workers or 2,
        worker_budget=args.worker_budget or 0.2,
    )
    if plan.repetitions < 1 or plan.drivers < 1 or plan.echo_processes < 1:
        usage_error("counts must be at least 1")
    if plan.proxy_budget is not None and not 0.01 <= plan.proxy_budget <= 64:
        usage_error("--proxy-budget takes a CPU count from 0.01")
    if plan.scaling_workers < 2 or not 0.01 <= plan.worker_budget <= 64:
        usage_error("--scaling-workers takes 2 or more, --worker-budget a CPU count from 0.01")
    if plan.duration <= 0 or plan.warmup < 0 or plan.latency_rate <= 0:
        usage_error("durations and rates must be positive")
    return plan


def cpu_split(available: Sequence[int], proxy_workers: int) -> tuple[set[int], set[int]]:
    """The CPUs of the load side (driver and echo) and of a proxy with ``proxy_workers``.

    The proxy takes the last CPUs, the load side the rest; where there are not
    enough, they share.
    """
    cpus = sorted(available)
    if len(cpus) < 2:
        return set(cpus), set(cpus)
    proxy = set(cpus[-proxy_workers:]) if proxy_workers < len(cpus) else set(cpus)
    load = set(cpus) - proxy
    return (load or set(cpus)), proxy


def _one_line(error: BaseException) -> str:
    """The first line of an error, and the last line of the output it quotes, if any."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


_STARTED = time.monotonic()


def _say(text: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {text}", flush=True)


class Bench:
    """One run: the plan, the driver pool, the running paths and the report being filled."""

    def __init__(
        self,
        plan: Plan,
        pool: DriverPool,
        report: Report,
        nofile: int,
        budgets: CpuBudgets | None = None,
    ) -> None:
        self.plan = plan
        self.budgets = budgets  # where --proxy-budget holds the proxies
        self.pool = pool
        self.report = report
        self.nofile = nofile
        self.endpoints: dict[str, Endpoint] = {}
        self.size0 = plan.sizes[0]
        self.conns0 = plan.conns[0]
        self.at_bound: list[str] = []
        self.round_index = 0
        self.echo: Target | None = None
        self.load_cpus: set[int] = set()
        self.proxy_cpus: dict[str, set[int]] = {}  # where each pinned proxy runs
        self.redis: list[RedisServer] = []
        # Each driver process holds one socket per connection, within the same limit.
        self.max_conns_bound = min(plan.max_conns_bound, pool.size * (nofile - 64))

    # ------------------------------------------------------------ table rows, in order

    def declare(self) -> None:
        plan, report = self.plan, self.report
        if "relay" in plan.figures:
            for conns in plan.conns:
                for size in plan.sizes:
                    report.declare(
                        f"relay_{size}_{conns}",
                        f"relay {_size_label(size)} x {conns} conns",
                        "msg/s",
                        higher_is_better=True,
                    )
            for conns in plan.conns:
                for size in plan.sizes:
                    report.declare(
                        f"relay_cpu_{size}_{conns}",
                        f"relay {_size_label(size)} x {conns} conns, per proxy CPU-second",
                        "msg/CPU-s",
                        higher_is_better=True,
                    )
            load = f"{_size_label(self.size0)} x {self.conns0} conns, saturated"
            report.declare("loaded_p50", f"round trip p50, {load}", "us", higher_is_better=False)
            report.declare("loaded_p99", f"round trip p99, {load}", "us", higher_is_better=False)
        if "latency" in plan.figures:
            paced = f"{plan.latency_rate:,.0f} msg/s paced, 64 B x {plan.latency_conns} conns"
            for q in ("p50", "p99"):
                title = f"round trip {q}, {paced}"
                report.declare(f"latency_{q}", title, "us", higher_is_better=False)
                report.declare(
                    f"added_{q}", f"latency added over direct, {q}", "us", higher_is_better=False
                )
        if "setup" in plan.figures:
            report.declare(
                "setup",
                f"connection set-up, {plan.setup_concurrency} concurrent",
                "upgrades/s",
                higher_is_better=True,
            )
            report.declare(
                "setup_cpu",
                "connection set-up per proxy CPU-second",
                "upgrades/CPU-s",
                higher_is_better=True,
            )
            report.declare(
                "setup_store_cpu",
                "Redis's own CPU per upgrade (not counted as the proxy's)",
                "us",
                higher_is_better=False,
            )
        if "memory" in plan.figures:
            report.declare(
                "idle_memory",
                f"memory per idle connection, {plan.idle_conns:,} open",
                "bytes",
                higher_is_better=False,
            )
        if "max-conns" in plan.figures:
            report.declare(
                "max_conns",
                f"most concurrent connections held, nofile {self.nofile:,}",
                "conns",
                higher_is_better=True,
            )

    # ------------------------------------------------------------ the run

    def start_paths(self, group: ProcessGroup) -> None:
        echo, echo_pid = start_echo(group, self.plan.echo_processes)
        self.echo = echo
        available = sorted(os.sched_getaffinity(0))
        load_cpus, _ = cpu_split(available, 1)
        self.load_cpus = load_cpus
        if self.plan.pin:
            for pid in [*self.pool.pids, echo_pid]:
                pin_tree(pid, load_cpus)
            self.report.meta["cpus"] = {"load side (driver, echo, redis)": sorted(load_cpus)}
        _say(f"echo backend on {echo}")
        redis = self.redis
        for name in self.plan.paths:
            try:
                endpoint = start_path(
                    name,
                    group,
                    echo,
                    nofile=self.nofile,
                    redis=redis,
                    proxy_buffer=self.plan.proxy_buffer,
                )
                if self.plan.pin:
                    self.pin(endpoint, available, load_cpus, redis)
                if self.budgets is not None and self.plan.proxy_budget and endpoint.pid:
                    for pid in worker_pids(endpoint.pid):
                        self.budgets.confine(pid, self.plan.proxy_budget)
            except Unavailable as error:
                self.report.status[name] = str(error).split(": ", 1)[-1]
                _say(str(error))
                continue
            except (RuntimeError, TimeoutError, OSError) as error:
                self._failed(name, f"did not start: {_one_line(error)}", group)
                continue
            problem = self.preflight(endpoint)
            if problem is not None:
                self._failed(name, f"failed its first echo: {problem}", group)
                continue
            self.endpoints[name] = endpoint
            self.report.status[name] = f"ok: {endpoint.version}"
            self.report.meta.setdefault("argv", {})[name] = endpoint.argv
            _say(f"{name}: ready on {endpoint.target} ({endpoint.version})")

    def pin(
        self,
        endpoint: Endpoint,
        available: list[int],
        load_cpus: set[int],
        redis: list[RedisServer],
    ) -> None:
        for server in redis:
            if server.process is not None:
                pin_tree(server.process.pid, load_cpus)
        if endpoint.pid is None:
            return
        _, workers = parse_path_name(endpoint.name)
        _, proxy_cpus = cpu_split(available, workers)
        pin_tree(endpoint.pid, proxy_cpus)
        self.proxy_cpus[endpoint.name] = proxy_cpus
        self.report.meta.setdefault("cpus", {})[endpoint.name] = sorted(proxy_cpus)
        if proxy_cpus & load_cpus:
            self.report.note(
                f"{endpoint.name} shares CPUs {sorted(proxy_cpus & load_cpus)} with the driver "
                "and echo: this machine has too few CPUs to give it its own"
            )

    def _failed(self, name: str, reason: str, group: ProcessGroup) -> None:
        self.report.status[name] = f"FAILED, {reason}"
        _say(f"{name}: FAILED, {reason}")
        for process in group.processes:
            if process.name == name:
                _say(f"----- last lines of {process.log_path} -----\n{process.output()[-2000:]}")

    def preflight(self, endpoint: Endpoint) -> str | None:
        try:
            opened = self.pool.open(endpoint.target, self.pool.size, timeout=5.0, time_limit=10.0)
            if opened.opened < self.pool.size:
                return opened.first_error or "could not connect"
            check = self.pool.check(timeout=5.0)
            if check.completed < opened.opened:
                if check.first_error is not None:
                    return check.first_error
                # A connection closed by the far side before the check left the round.
                closed = opened.opened - check.connections
                if closed <= 0:
                    return "no echo"
                return (
                    f"{closed} of {opened.opened} connections were closed by the far side "
                    f"after their upgrade, before their first echo"
                )
            return None
        except DriverError as error:
            return str(error).splitlines()[0]
        finally:
            self.pool.close_all()

    def ok_paths(self) -> list[str]:
        return [name for name in self.plan.paths if name in self.endpoints]

    def run(self) -> None:
        plan = self.plan
        names = self.ok_paths()
        if "memory" in plan.figures:
            for name in names:
                self.guarded(name, "memory", partial(self.memory, self.endpoints[name]))
        # Measurement-major order: every path takes one measurement before the next one
        # starts, each time in a rotated order, so that a busy moment of the machine
        # spreads over the paths instead of landing on one path's whole round.
        measurements = self.measurements()
        for rep in range(plan.repetitions):
            self.round_index = rep
            _say(f"-- round {rep + 1}/{plan.repetitions}")
            for index, measure in enumerate(measurements):
                shift = (rep + index) % len(names) if names else 0
                measure([self.endpoints[name] for name in names[shift:] + names[:shift]])
        self.report.derive_added("added_p50", "latency_p50")
        self.report.derive_added("added_p99", "latency_p99")
        if "max-conns" in plan.figures:
            for name in names:
                self.guarded(name, "max-conns", partial(self.max_conns, self.endpoints[name]))

    def scaling(self, group: ProcessGroup) -> None:
        """Relay 64 B with 1 and with N gateway workers, every worker held to one CPU budget.

        On a machine with fewer cores than workers plus load side, this is what
        tells whether a second worker's CPU turns into throughput: SO_REUSEPORT
        spreads the connections, and nothing the workers share (Redis, the
        backend) holds them back.
        """
        plan = self.plan
        workers = plan.scaling_workers
        size, conns = self.size0, self.conns0
        proxy_cpus = cpu_split(sorted(os.sched_getaffinity(0)), 1)[1] if plan.pin else None
        where = f"all on CPU {','.join(map(str, sorted(proxy_cpus)))}" if proxy_cpus else "unpinned"
        scaling = self.report.scaling = Scaling(
            budget=plan.worker_budget,
            setting=(
                f"wsgate with the Redis store, relay {_size_label(size)} x {conns} conns; "
                f"each worker process held to {plan.worker_budget:g} CPU by a cgroup quota "
                f"({where}), so {workers} workers may use {workers * plan.worker_budget:g} CPU"
            ),
        )
        if self.echo is None:
            scaling.status = "skipped, the echo backend did not start"
            return
        names = {1: "wsgate-redis", workers: f"wsgate-redis-w{workers}"}
        try:
            budgets = CpuBudgets(f"wsgate-bench-{os.getpid()}-workers")
            with budgets:
                endpoints: dict[int, Endpoint] = {}
                for count, name in names.items():
                    endpoint = start_path(
                        name, group, self.echo, nofile=self.nofile, redis=self.redis
                    )
                    if proxy_cpus is not None:
                        pin_tree(endpoint.pid or 0, proxy_cpus)
                    pids = worker_pids(endpoint.pid or 0)
                    if len(pids) != count:
                        raise RuntimeError(f"{name}: found {len(pids)} worker processes")
                    for pid in pids:
                        budgets.confine(pid, plan.worker_budget)
                    endpoints[count] = endpoint
                    _say(f"workers figure: {name} ready, {len(pids)} worker(s) confined")
                # Twice the rounds of the other figures: a ratio of two noisy rates
                # wants more pairs than one rate wants samples.
                for rep in range(2 * plan.repetitions):
                    self.round_index = rep
                    order = sorted(endpoints) if rep % 2 == 0 else sorted(endpoints, reverse=True)
                    for count in order:
                        endpoint = endpoints[count]
                        step = partial(self._scaled_relay, scaling, count, size=size)
                        self.guarded(
                            endpoint.name,
                            "workers",
                            partial(self.on_connections, conns, step, endpoint),
                        )
        except (BudgetUnavailable, Unavailable) as error:
            # Unavailable reads "<path>: skipped, <why>"; BudgetUnavailable is the why alone.
            why = str(error).split(": skipped, ", 1)[-1]
            scaling.status = f"skipped, {why}"
            _say(f"workers figure: {scaling.status}")
            return
        except (RuntimeError, TimeoutError, OSError) as error:
            scaling.status = f"FAILED, {_one_line(error)}"
            _say(f"workers figure: {scaling.status}")
            return
        scaling.status = "ok"
        ratios = scaling.ratios(workers)
        if ratios:
            _say(f"workers figure: {workers} workers / 1 = {sorted(ratios)} per round")

    def _scaled_relay(self, scaling: Scaling, count: int, endpoint: Endpoint, *, size: int) -> None:
        plan = self.plan
        cpu_before = self._proxy_cpu(endpoint)  # the supervisor's tree: every worker
        totals = self.pool.exchange(size, warmup=plan.warmup, duration=plan.duration)
        cpu = self._proxy_cpu(endpoint) - cpu_before
        self._exchange_notes(endpoint, "workers", totals)
        # CPU over the whole exchange (warm-up, window, drain), as a rate.
        used = cpu / (plan.warmup + plan.duration + 0.05)
        scaling.add(count, self.round_index, totals.rate, used)
        _say(f"  {endpoint.name}: {totals.rate:,.0f} msg/s using {used:.2f} CPU")

    def guarded(self, name: str, what: str, step: Callable[[], None]) -> None:
        try:
            step()
        except DriverError as error:
            self.report.note(f"{name}, {what}: the driver failed: {str(error).splitlines()[0]}")
            _say(f"{name} {what}: driver failed: {error}")
            self.pool.close_all()

    def measurements(self) -> list[Callable[[list[Endpoint]], None]]:
        """One round's measurements, each taken on the paths in the order given."""
        plan = self.plan
        found: list[Callable[[list[Endpoint]], None]] = []
        if "relay" in plan.figures:
            for conns in plan.conns:
                for size in plan.sizes:
                    label = f"relay {_size_label(size)} x {conns}"
                    step = partial(self.relay, size=size, conns=conns)
                    found.append(
                        partial(self.each, label, partial(self.on_connections, conns, step))
                    )
        if "latency" in plan.figures:
            found.append(self.latency)
        if "setup" in plan.figures:
            found.append(partial(self.each, "set-up", self.setup))
        return found

    def each(self, label: str, measure: Callable[[Endpoint], None], paths: list[Endpoint]) -> None:
        """A measurement taken on one path after another."""
        for endpoint in paths:
            self.guarded(endpoint.name, label, partial(measure, endpoint))

    def on_connections(
        self, conns: int, step: Callable[[Endpoint], None], endpoint: Endpoint
    ) -> None:
        """Open ``conns`` connections to ``endpoint``, run ``step`` on them, close them."""
        try:
            if self._open(endpoint, conns):
                step(endpoint)
        finally:
            self.pool.close_all()

    def _open(self, endpoint: Endpoint, conns: int) -> bool:
        """Open ``conns`` more connections to ``endpoint``; False (and a note) if some failed."""
        opened = self.pool.open(endpoint.target, conns, timeout=10.0, time_limit=60.0)
        if opened.opened < conns:
            self.report.note(
                f"{endpoint.name}: opened {opened.opened} of {conns} connections "
                f"({opened.first_error}); a measurement was skipped"
            )
            return False
        return True

    def _exchange_notes(self, endpoint: Endpoint, what: str, totals: ExchangeTotals) -> None:
        if totals.errors:
            self.report.note(
                f"{endpoint.name}, {what}: {totals.errors} connection(s) failed "
                f"(first: {totals.first_error})"
            )

    def _proxy_cpu(self, endpoint: Endpoint) -> float:
        return tree_cpu_seconds(endpoint.pid) if endpoint.pid is not None else 0.0

    def _per_cpu_second(self, endpoint: Endpoint, key: str, count: int, cpu: float) -> str:
        """Record ``count`` per CPU-second of the proxy; robust to CPU taken by others."""
        if endpoint.pid is None or cpu <= 0:
            return ""
        self.report.add(key, endpoint.name, count / cpu)
        return f", {count / cpu:,.0f} per proxy CPU-s"

    def relay(self, endpoint: Endpoint, *, size: int, conns: int) -> None:
        plan = self.plan
        cpu_before = self._proxy_cpu(endpoint)
        totals = self.pool.exchange(size, warmup=plan.warmup, duration=plan.duration)
        cpu = self._proxy_cpu(endpoint) - cpu_before
        what = f"relay {_size_label(size)} x {conns}"
        self._exchange_notes(endpoint, what, totals)
        ordered = sorted(totals.latencies_ns)
        p50, p99 = percentile(ordered, 0.50) / 1e3, percentile(ordered, 0.99) / 1e3
        self.report.add(f"relay_{size}_{conns}", endpoint.name, totals.rate)
        if size == self.size0 and conns == self.conns0 and ordered:
            self.report.add("loaded_p50", endpoint.name, p50)
            self.report.add("loaded_p99", endpoint.name, p99)
        efficiency = self._per_cpu_second(endpoint, f"relay_cpu_{size}_{conns}", totals.total, cpu)
        _say(
            f"  {endpoint.name}: {what}: {totals.rate:,.0f} msg/s{efficiency} "
            f"(p50 {p50:,.0f} µs, p99 {p99:,.0f} µs)"
        )

    def latency(self, paths: list[Endpoint]) -> None:
        """Paced round trips on every path, in short slices taken in turn.

        Every path has its connections open for the whole measurement, and the
        paths take turns of ``2 * duration / LATENCY_SLICES`` seconds each: a
        stall of the machine (a descheduled vCPU costs milliseconds) then lands
        on every path alike instead of on one path's whole window, and each
        path's percentiles pool ``2 * duration`` seconds of samples.
        """
        self.share_load_cpus(paths, True)
        try:
            self.guarded("every path", "latency", partial(self._paced_turns, paths))
        finally:
            self.pool.close_all()
            self.share_load_cpus(paths, False)

    def _paced_turns(self, paths: list[Endpoint]) -> None:
        plan = self.plan
        interval = plan.latency_conns / plan.latency_rate
        slice_seconds = 2 * plan.duration / LATENCY_SLICES
        taking = [endpoint for endpoint in paths if self._open(endpoint, plan.latency_conns)]
        samples: dict[str, array[int]] = {endpoint.name: array("q") for endpoint in taking}
        for turn in range(LATENCY_SLICES):
            shift = turn % len(taking) if taking else 0
            for endpoint in taking[shift:] + taking[:shift]:
                totals = self.pool.exchange(
                    64,
                    warmup=min(plan.warmup, 0.1),
                    duration=slice_seconds,
                    interval=interval,
                    port=endpoint.target.port,
                )
                self._exchange_notes(endpoint, "latency", totals)
                samples[endpoint.name].extend(totals.latencies_ns)
        for endpoint in taking:
            ordered = sorted(samples[endpoint.name])
            if not ordered:
                continue
            p50, p99 = percentile(ordered, 0.50) / 1e3, percentile(ordered, 0.99) / 1e3
            self.report.add("latency_p50", endpoint.name, p50, self.round_index)
            self.report.add("latency_p99", endpoint.name, p99, self.round_index)
            _say(
                f"  {endpoint.name}: latency, {len(ordered):,} round trips: "
                f"p50 {p50:,.0f} µs, p99 {p99:,.0f} µs"
            )

    def share_load_cpus(self, paths: list[Endpoint], sharing: bool) -> None:
        """Move pinned proxies onto the load side's CPU(s) for the paced latency, or back.

        A CPU left idle between paced messages sleeps, and on a VM waking it
        can take milliseconds when the host is busy: the proxies' p99 then
        measures the hypervisor. The load side's CPU never sleeps during the
        measurement (the driver and the echo run there), as a proxy's CPU does
        not in production under load; `direct` runs there too.
        """
        for endpoint in paths:
            cpus = self.proxy_cpus.get(endpoint.name)
            if endpoint.pid is not None and cpus is not None:
                pin_tree(endpoint.pid, self.load_cpus if sharing else cpus)

    def setup(self, endpoint: Endpoint) -> None:
        plan = self.plan
        store = redis_pid(endpoint, self.redis)
        store_before = tree_cpu_seconds(store) if store is not None else 0.0
        cpu_before = self._proxy_cpu(endpoint)
        totals = self.pool.handshakes(
            endpoint.target,
            concurrency=plan.setup_concurrency,
            warmup=plan.warmup,
            duration=plan.duration,
        )
        time.sleep(self.plan.settle / 3)  # the proxy's CPU count includes closing them
        cpu = self._proxy_cpu(endpoint) - cpu_before
        if totals.failed:
            self.report.note(
                f"{endpoint.name}, set-up: {totals.failed} attempt(s) failed "
                f"(first: {totals.first_error})"
            )
        self.report.add("setup", endpoint.name, totals.rate)
        efficiency = self._per_cpu_second(endpoint, "setup_cpu", totals.total, cpu)
        if store is not None and totals.total:
            store_us = 1e6 * (tree_cpu_seconds(store) - store_before) / totals.total
            self.report.add("setup_store_cpu", endpoint.name, store_us)
            efficiency += f", Redis {store_us:,.1f} µs CPU per upgrade"
        _say(
            f"  {endpoint.name}: set-up {totals.rate:,.0f} upgrades/s{efficiency} "
            f"({totals.failed} failed)"
        )

    def memory(self, endpoint: Endpoint) -> None:
        if endpoint.pid is None:
            return
        count = self.plan.idle_conns
        time.sleep(self.plan.settle / 3)
        before = tree_rss(endpoint.pid)
        try:
            opened = self.pool.open(endpoint.target, count, concurrency=64, time_limit=90.0)
            check = self.pool.check(timeout=10.0)
            time.sleep(self.plan.settle)
            after = tree_rss(endpoint.pid)
        finally:
            self.pool.close_all(timeout=30.0)
        if check.completed < count:
            self.report.note(
                f"{endpoint.name}, memory: {check.completed} of {count} connections answered "
                f"(first error: {opened.first_error or check.first_error})"
            )
        if check.completed:
            per_conn = (after - before) / check.completed
            self.report.add("idle_memory", endpoint.name, per_conn)
            _say(
                f"{endpoint.name} memory: {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
                f"with {check.completed} idle: {per_conn:,.0f} bytes/conn"
            )
        time.sleep(self.plan.settle / 2)

    def max_conns(self, endpoint: Endpoint) -> None:
        bound = self.max_conns_bound
        started = time.monotonic()
        try:
            opened = self.pool.open(
                endpoint.target,
                bound,
                concurrency=64,
                timeout=3.0,
                time_limit=90.0,
                max_failures=max(10, 40 // self.pool.size),
            )
            check = self.pool.check(timeout=15.0)
        finally:
            self.pool.close_all(timeout=30.0)
        held = check.completed
        self.report.add("max_conns", endpoint.name, held)
        if held >= bound:
            self.at_bound.append(endpoint.name)
        elif opened.first_error:
            self.report.note(
                f"{endpoint.name}, max connections: past {held:,}: {opened.first_error}"
            )
        _say(
            f"{endpoint.name} max connections: {held:,} held ({opened.failed} refused, "
            f"{time.monotonic() - started:.1f} s)"
        )
        time.sleep(self.plan.settle)

    def final_notes(self) -> None:
        if self.at_bound:
            self.report.note(
                f"{', '.join(self.at_bound)}: held all {self.max_conns_bound:,} connections "
                "the bench asked for (its bound), so their true maximum is higher"
            )
        self._scaling_headroom()
        for key in self.report.figures:
            if not key.startswith("relay_"):
                continue
            found = self.report.headroom(key)
            if found is None:
                continue
            factor, best = found
            title = self.report.figures[key].title
            verdict = (
                "the driver and echo leave room above every proxy"
                if factor >= 1.3
                else "TOO CLOSE: the driver or the echo backend may limit the proxied figures"
            )
            self.report.note(
                f"{title}: direct is {factor:.2f}x the best proxied path ({best}); {verdict}."
            )

    def _scaling_headroom(self) -> None:
        """Whether the load side could have driven the workers figure faster than it went."""
        scaling = self.report.scaling
        relay = self.report.figures.get(f"relay_{self.size0}_{self.conns0}")
        direct = relay.median("direct") if relay is not None else None
        if scaling is None or direct is None:
            return
        rates = scaling.rates(self.plan.scaling_workers)
        if not rates:
            return
        factor = direct / max(statistics.median(rates), 1.0)
        verdict = (
            "the load side leaves room above it"
            if factor >= 1.3
            else "TOO CLOSE: the load side may limit the workers figure"
        )
        self.report.note(
            f"Workers figure: direct is {factor:.2f}x the rate of "
            f"{self.plan.scaling_workers} budgeted workers; {verdict}."
        )


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Linux {platform.release()}"


def _meta(plan: Plan, nofile: int, argv: Sequence[str]) -> dict[str, object]:
    return {
        "title": "smoke run" if plan.smoke else "latest run",
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "machine": machine(),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "nofile": nofile,
        "drivers": plan.drivers,
        "echo_processes": plan.echo_processes,
        "repetitions": plan.repetitions,
        "warmup_s": plan.warmup,
        "duration_s": plan.duration,
        "load_before": os.getloadavg(),
        "proxy_buffer": plan.proxy_buffer or "defaults (HAProxy 16 KiB, nginx one page)",
        "proxy_budget_cpus": plan.proxy_budget,
        "method": (
            f"{plan.drivers} driver processes (raw asyncio protocols on uvloop) and one echo "
            "backend on the same machine as the proxy"
            + (
                ", the proxy bound to its own CPU and the driver and echo to the other(s)"
                if plan.pin
                else ", sharing all CPUs with it"
            )
            + (
                f", every proxy process held to {plan.proxy_budget:g} CPU by a cgroup quota"
                if plan.proxy_budget
                else ""
            )
            + "; per proxy CPU-second rows divide what was relayed by the CPU time the proxy "
            "process used, which other work on the machine hardly moves"
            + f"; {plan.repetitions} repetition(s) of "
            f"{plan.warmup:g} s warm-up + {plan.duration:g} s measured per rate figure "
            f"({2 * plan.duration:g} s for the paced latency); memory "
            "and max connections measured once per path."
        ),
    }


def _busy_cpu_seconds() -> float:
    """CPU time the whole machine has spent busy (stolen time included) since boot."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (all of them, at the end)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


# Loopback sockets an earlier run left in TIME_WAIT (60 s each) can make a new
# run's connects time out; past this many, a run waits for them first.
TIME_WAIT_MOST = 20_000
TIME_WAIT_PATIENCE = 75.0


def time_wait_sockets(sockstat: str) -> int:
    """The TCP sockets in TIME_WAIT, from the text of /proc/net/sockstat (0 if absent)."""
    for line in sockstat.splitlines():
        if line.startswith("TCP:"):
            fields = line.split()[1:]
            counts = dict(zip(fields[::2], fields[1::2], strict=False))
            return int(counts.get("tw", 0))
    return 0


def settle_time_wait(
    count: Callable[[], int],
    *,
    most: int = TIME_WAIT_MOST,
    patience: float = TIME_WAIT_PATIENCE,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[int, float]:
    """Wait (up to ``patience`` seconds) until at most ``most`` sockets are in TIME_WAIT.

    Returns how many there were at the start and how long it waited.
    """
    first = left = count()
    started = clock()
    if left > most:
        _say(f"{left:,} sockets in TIME_WAIT from an earlier run: waiting for them to drain")
    while left > most and clock() - started < patience:
        sleep(1.0)
        left = count()
    return first, clock() - started


def time_wait_now() -> int:
    """The TCP sockets in TIME_WAIT on this machine now."""
    try:
        return time_wait_sockets(Path("/proc/net/sockstat").read_text())
    except OSError:
        return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = plan_from_args(build_parser().parse_args(argv))
    # SIGTERM (a CI timeout, `kill`) stops the run as Ctrl-C does: everything started is stopped.
    signal.signal(signal.SIGTERM, _interrupt)
    nofile = raise_open_files_limit()
    report = Report(list(plan.paths), _meta(plan, nofile, argv))
    waiting, waited = settle_time_wait(time_wait_now)
    if waiting > TIME_WAIT_MOST:
        left = time_wait_now()
        report.note(
            f"{waiting:,} sockets were in TIME_WAIT from an earlier run; the run waited "
            f"{waited:.0f} s for them to drain and began with {left:,}"
        )
    started = time.monotonic()
    busy_before, own_before = _busy_cpu_seconds(), _own_cpu_seconds()
    workdir = Path(tempfile.mkdtemp(prefix="wsgate-bench-"))
    # Fork the drivers before any other child exists, so they inherit nothing of them.
    budgets: CpuBudgets | None = None
    if plan.proxy_budget is not None:
        try:
            budgets = CpuBudgets(f"wsgate-bench-{os.getpid()}-proxies")
            budgets.create()
        except BudgetUnavailable as error:
            usage_error(f"--proxy-budget: {error}")
    pool = DriverPool(plan.drivers)
    bench = Bench(plan, pool, report, nofile, budgets)
    bench.declare()
    try:
        with ProcessGroup(workdir) as group:
            bench.start_paths(group)
            bench.run()
            if "workers" in plan.figures:
                bench.scaling(group)
    except KeyboardInterrupt:
        _say("interrupted: everything started is stopped, no results written")
        return 130
    finally:
        pool.stop()
        if budgets is not None:
            budgets.release()
        if plan.keep_logs:
            _say(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - started
    others = (_busy_cpu_seconds() - busy_before) - (_own_cpu_seconds() - own_before)
    capacity = elapsed * len(os.sched_getaffinity(0))
    report.meta["elapsed_s"] = round(elapsed, 1)
    report.meta["load_after"] = os.getloadavg()
    report.meta["other_cpu_s"] = round(max(0.0, others), 1)
    report.note(
        f"Other work on this machine used {max(0.0, others):,.0f} CPU-seconds during the run "
        f"({max(0.0, others) / capacity:.0%} of all its CPUs); it shows in the spread."
    )
    bench.final_notes()
    markdown = report.to_markdown()
    write_results(plan.out, "latest", markdown, report.to_json())
    _say("\n" + markdown)
    _say(f"written: {plan.out / 'latest.md'} and {plan.out / 'latest.json'}")
    failed = [name for name, status in report.status.items() if status.startswith("FAILED")]
    return 1 if failed or ("direct" in plan.paths and "direct" not in bench.endpoints) else 0
