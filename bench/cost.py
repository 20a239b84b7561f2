"""What a proxy spends per upgrade or per relayed message: instructions, or where its time goes.

Runs the raw echo backend and the chosen paths of the bench in front of it
(wsgate with either store, HAProxy, nginx), each proxy on its own CPU in turn,
and has ``perf stat`` count the proxy's instructions in user space and in the
kernel while the driver works it:

- ``--work setup``: 50 connectors in closed loops of upgrades (connect,
  handshake, ``101``, close); the unit is one upgrade;
- ``--work relay``: ``--conns`` connections in 64 B ping-pong; the unit is one
  round trip (two messages through the proxy).

Seconds on this VM swing by up to 2x from one minute to the next (the proxy's
CPU runs at one of two speeds), and every rate figure of the main bench swings
with it. Instruction counts do not: they resolve differences of a few percent
between proxies, and between two versions of one.

Where the CPU has no counters to offer (``--by clock``, the default there),
``perf record`` samples the proxy's CPU clock instead, with call chains, and
the run says where each path's CPU time per unit went: its own code in user
space, and the kernel's share by system call (:mod:`bench.samples`). That is
what tells a proxy that makes more system calls, or wakes more threads, from
one that runs more code. Either way the run also counts the system calls per
unit, by name, from the kernel's tracepoints: exact, whatever the CPU's speed.

``--by callgrind`` counts instructions where the CPU has no counters: each
proxy runs under valgrind's callgrind (the same code, many times slower), its
counting switched on for the work alone, and the run says the user-space
instructions per unit (the kernel's are not seen) and their ratio to
HAProxy's. The counts repeat from run to run whatever else the machine does;
a proxy that slow finds more work waiting at each wake-up, so what it pays
per batch (a wait, a report, a call to Redis) is shared by more units than at
full speed.

    .venv/bin/python -m bench.cost [--work setup|relay] [--paths wsgate-memory,haproxy]
                                   [--rounds 5] [--seconds 2.5]
                                   [--by instructions|clock|callgrind]

Needs ``perf`` (Debian's linux-perf, installed by ``scripts/setup.sh --bench``),
or valgrind for ``--by callgrind``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench.driver import DriverPool
from bench.proxies import (
    BASE_PATHS,
    TLS_PATHS,
    Endpoint,
    Launch,
    Unavailable,
    parse_path_name,
    pin_tree,
    redis_pid,
    start_echo,
    start_path,
    tree_cpu_seconds,
)
from bench.samples import OUTSIDE_CALLS, USER, tally
from bench.suite import cpu_split, settle_time_wait, time_wait_now, usage_error
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["main", "perf_counts_instructions"]

PROG = "python -m bench.cost"
EVENTS = ("instructions:u", "instructions:k")
# System calls counted one by one (the kernel's tracepoints): those a proxy makes
# per connection or per message; the rest are summed from raw_syscalls.
CALLS = (
    "accept4", "socket", "connect", "setsockopt", "getsockname", "getpeername", "fcntl",
    "read", "write", "recvfrom", "sendto", "recvmsg", "sendmsg", "readv", "writev",
    "epoll_wait", "epoll_pwait", "epoll_ctl", "io_uring_enter", "futex", "shutdown", "close",
)  # fmt: skip
ALL_CALLS = "raw_syscalls:sys_enter"
# Under valgrind a proxy runs many times slower (its first units of work are
# translated as they run: its warm-up is as long as the rounds').
CALLGRIND_START = 300.0
CALLGRIND_SLOWDOWN = 50.0
SAMPLE_HZ = 2999  # off the timer's tick, so samples do not beat with it
SHOWN_CALLS = 8  # system calls named in the clock table; the rest are summed


def _perf_on(pid: int, events: Sequence[str] = EVENTS) -> subprocess.Popen[str]:
    argv = ["perf", "stat", "-x,", "-e", ",".join(events), "-p", str(pid)]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)


def _counts(perf: subprocess.Popen[str]) -> dict[str, int]:
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=10)
    counts: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


def _paths(text: str) -> list[str]:
    paths = [path.strip() for path in text.split(",") if path.strip()]
    for path in paths:
        try:
            kind, _ = parse_path_name(path)
        except ValueError as error:
            usage_error(str(error), PROG)
        if kind == "direct":
            usage_error("direct has no proxy to count", PROG)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", choices=("setup", "relay"), default="setup")
    plain = [p for p in BASE_PATHS[1:] if p not in TLS_PATHS]
    parser.add_argument("--paths", default=",".join(plain), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--conns", type=int, default=50, help="connections (relay)")
    parser.add_argument("--concurrency", type=int, default=50, help="connectors (setup)")
    parser.add_argument(
        "--by",
        choices=("instructions", "clock", "callgrind"),
        help="count instructions, sample where the CPU time goes, or count user-space "
        "instructions under valgrind (default: instructions where perf can count them)",
    )
    args = parser.parse_args(argv)
    paths = _paths(args.paths)
    if min(args.rounds, args.conns, args.concurrency) < 1 or args.seconds <= 0:
        usage_error("counts and seconds must be positive", PROG)
    if args.by == "callgrind":
        if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
            usage_error("valgrind is not installed (apt-get install valgrind)", PROG)
    elif shutil.which("perf") is None:
        usage_error("perf is not installed (scripts/setup.sh --bench)", PROG)
    counts_instructions = args.by == "callgrind" or perf_counts_instructions()
    if args.by is None:
        args.by = "instructions" if counts_instructions else "clock"
        if not counts_instructions:
            print("perf cannot count instructions here: sampling the CPU clock instead")
    elif args.by == "instructions" and not counts_instructions:
        usage_error("perf cannot count instructions here (try --by clock)", PROG)

    unit = "upgrade" if args.work == "setup" else "round trip"
    settle_time_wait(time_wait_now)  # an earlier run's sockets can make connects time out
    load_cpus, proxy_cpus = cpu_split(sorted(os.sched_getaffinity(0)), 1)
    found: dict[str, list[_Round]] = {path: [] for path in paths}
    pool = DriverPool(2)
    try:
        with ProcessGroup() as group:
            echo, echo_pid = start_echo(group)
            redis: list[RedisServer] = []
            proxies: list[Endpoint] = []
            counting = group.log_dir / "callgrind"  # the dumps, under --by callgrind
            if args.by == "callgrind":
                counting.mkdir()
            for path in paths:
                under = _under_callgrind(counting / path) if args.by == "callgrind" else None
                try:
                    proxies.append(
                        start_path(path, group, echo, nofile=4096, redis=redis, under=under)
                    )
                except Unavailable as error:
                    print(str(error))
            for pid in [*pool.pids, echo_pid, *(r.process.pid for r in redis if r.process)]:
                pin_tree(pid, load_cpus)
            for proxy in proxies:
                assert proxy.pid is not None
                pin_tree(proxy.pid, proxy_cpus)

            for round_number in range(args.rounds):
                shift = round_number % max(1, len(proxies))
                for proxy in proxies[shift:] + proxies[:shift]:
                    store = redis_pid(proxy, redis)
                    entry: _Round | None
                    if args.by == "callgrind":
                        entry = _measure_callgrind(proxy, pool, args, store, counting / proxy.name)
                    else:
                        entry = _measure(proxy, pool, args, store)
                    if entry is None:
                        raise SystemExit(f"{PROG}: {proxy.name}: perf found nothing to count")
                    found[proxy.name].append(entry)
                    print(
                        f"round {round_number + 1} {proxy.name}: {_said(entry, unit)}", flush=True
                    )
    finally:
        pool.stop()
    if args.by == "clock":
        _print_time(found, unit, args.rounds)
    elif args.by == "callgrind":
        _print_user_instructions(found, unit, args.rounds)
    else:
        _print_instructions(found, unit, args.rounds)
    _print_calls(found, unit, args.rounds)
    return 0


def _said(entry: _Round, unit: str) -> str:
    store = f" (Redis: {entry.store_us:,.1f} µs)" if entry.store_us is not None else ""
    if entry.instructions is not None:
        user, kernel = entry.instructions
        if kernel is None:  # callgrind: user space only, and no CPU time worth telling
            return f"{user / 1e3:,.1f}k user instructions per {unit}{store}"
        spent = f"{user / 1e3:,.1f}k user + {kernel / 1e3:,.1f}k kernel instructions, "
    else:
        spent = f"{entry.time_us.get(USER, 0.0):,.1f} µs in user space, "
    return f"{spent}{entry.cpu_us:,.1f} µs CPU per {unit}{store}"


def _work(pool: DriverPool, proxy: Endpoint, args: argparse.Namespace, seconds: float) -> int:
    """Units of work done: upgrades, or round trips on the connections already open."""
    if args.work == "setup":
        return pool.handshakes(
            proxy.target, concurrency=args.concurrency, warmup=0.0, duration=seconds
        ).total
    return pool.exchange(64, warmup=0.0, duration=seconds).total


class _Round:
    """One round on one proxy, per unit of work: what it cost and, by clock, where."""

    def __init__(self, cpu_us: float, store_us: float | None):
        self.cpu_us = cpu_us
        self.store_us = store_us
        self.instructions: tuple[float, float | None] | None = None  # user, kernel
        self.time_us: dict[str, float] = {}  # µs by use (bench.samples)
        self.calls: dict[str, float] = {}  # system calls by name, and "all"


def perf_counts_instructions() -> bool:
    """Whether perf can count instructions here (a VM often has no counters)."""
    probe = subprocess.run(
        ["perf", "stat", "-x,", "-e", EVENTS[0], "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0 and "<not supported>" not in probe.stderr


def _record_on(pid: int, out: Path) -> subprocess.Popen[str]:
    argv = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(SAMPLE_HZ), "-g"]
    argv += ["-p", str(pid), "-o", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _recorded(perf: subprocess.Popen[str], out: Path) -> str:
    perf.send_signal(signal.SIGINT)
    perf.communicate(timeout=30)
    script = subprocess.run(
        ["perf", "script", "-i", str(out), "-F", "tid,ip,sym"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return script.stdout


def _open_for_relay(proxy: Endpoint, pool: DriverPool, args: argparse.Namespace) -> None:
    """Open the connections a relay round works on (a set-up round opens its own)."""
    if args.work == "relay":
        opened = pool.open(proxy.target, args.conns)
        if opened.opened < args.conns:
            raise SystemExit(f"{PROG}: {proxy.name}: opened {opened.opened} of {args.conns}")


def _measure(
    proxy: Endpoint, pool: DriverPool, args: argparse.Namespace, store: int | None
) -> _Round | None:
    """One round on one proxy: instructions (user, kernel) or time by use, and CPU µs
    per unit of work, and the CPU µs of the Redis server ``store`` it admits through."""
    assert proxy.pid is not None
    _open_for_relay(proxy, pool, args)
    clock = args.by == "clock"
    with tempfile.TemporaryDirectory(prefix="wsgate-cost-") as scratch:
        recording = Path(scratch) / "perf.data"
        try:
            _work(pool, proxy, args, 0.3)  # warm: the first units find caches cold
            store_before = tree_cpu_seconds(store) if store is not None else 0.0
            cpu_before = tree_cpu_seconds(proxy.pid)
            perf = _record_on(proxy.pid, recording) if clock else _perf_on(proxy.pid)
            calls = _perf_on(proxy.pid, [ALL_CALLS, *(f"syscalls:sys_enter_{c}" for c in CALLS)])
            time.sleep(0.1)  # perf attached before the first unit of work
            units = _work(pool, proxy, args, args.seconds)
            time.sleep(0.1)  # and the closes counted too
            cpu = tree_cpu_seconds(proxy.pid) - cpu_before
            store_cpu = tree_cpu_seconds(store) - store_before if store is not None else None
            if clock:
                samples = tally(_recorded(perf, recording))
            else:
                counts = _counts(perf)
            calls_counted = _counts(calls)
        finally:
            pool.close_all()
    if units == 0:
        return None
    found = _Round(1e6 * cpu / units, 1e6 * store_cpu / units if store_cpu is not None else None)
    for event, count in calls_counted.items():
        name = "all" if event == ALL_CALLS else event.removeprefix("syscalls:sys_enter_")
        found.calls[name] = count / units
    if clock:
        if samples.total == 0:
            return None
        for use in samples.by_use:
            found.time_us[use] = found.cpu_us * samples.share(use)
    else:
        if not counts:
            return None
        found.instructions = (counts.get(EVENTS[0], 0) / units, counts.get(EVENTS[1], 0) / units)
    return found


def _under_callgrind(out: Path) -> Launch:
    """A proxy run under callgrind, counting nothing until it is told to."""
    wrapper = (
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
        f"--callgrind-out-file={out}.%p",
    )  # fmt: skip
    return Launch(wrapper, start_timeout=CALLGRIND_START, slowdown=CALLGRIND_SLOWDOWN)


def _callgrind(pid: int, *options: str) -> None:
    subprocess.run(
        ["callgrind_control", *options, str(pid)],
        capture_output=True,
        check=True,
        timeout=120,
    )


def callgrind_total(dump: str) -> int:
    """The instructions a callgrind dump counted (its ``totals:``, else its ``summary:``)."""
    found: dict[str, int] = {}
    for line in dump.splitlines():
        key, _, value = line.partition(":")
        count = value.split()[:1]
        if key in ("totals", "summary") and count and count[0].isdigit():
            found[key] = int(count[0])
    if not found:
        raise ValueError("no totals in the callgrind dump")
    return found.get("totals", found.get("summary", 0))


def _measure_callgrind(
    proxy: Endpoint, pool: DriverPool, args: argparse.Namespace, store: int | None, out: Path
) -> _Round:
    """One round on a proxy under callgrind: its user instructions per unit of work."""
    assert proxy.pid is not None
    _open_for_relay(proxy, pool, args)
    try:
        _callgrind(proxy.pid, "--instr=on")
        _work(pool, proxy, args, args.seconds)  # warm: code is translated as it first runs
        time.sleep(0.5)
        _callgrind(proxy.pid, "--zero")
        store_before = tree_cpu_seconds(store) if store is not None else 0.0
        units = _work(pool, proxy, args, args.seconds)
        time.sleep(1.0)  # the closes counted too
        before = set(out.parent.glob(f"{out.name}.*"))
        _callgrind(proxy.pid, "--dump")
        store_cpu = tree_cpu_seconds(store) - store_before if store is not None else None
        _callgrind(proxy.pid, "--instr=off")
        dumps = sorted(
            set(out.parent.glob(f"{out.name}.*")) - before, key=lambda p: p.stat().st_mtime
        )
    finally:
        pool.close_all()
    if units == 0:
        raise SystemExit(f"{PROG}: {proxy.name}: no {args.work} work was done under callgrind")
    if not dumps:
        raise SystemExit(f"{PROG}: {proxy.name}: callgrind wrote no counts ({out}.*)")
    found = _Round(0.0, 1e6 * store_cpu / units if store_cpu is not None else None)
    found.instructions = (callgrind_total(dumps[-1].read_text()) / units, None)
    return found


def _print_user_instructions(found: dict[str, list[_Round]], unit: str, rounds: int) -> None:
    """User-space instructions per unit (callgrind), and each path's ratio to HAProxy's."""
    user = {
        path: statistics.median(e.instructions[0] for e in entries if e.instructions)
        for path, entries in found.items()
        if entries
    }
    reference = user.get("haproxy")
    print(f"\nuser-space instructions per {unit}, median of {rounds} rounds (callgrind):\n")
    print("| path | instructions | HAProxy's / the path's | Redis's own CPU |")
    print("|---|---:|---:|---:|")
    for path, count in user.items():
        ratio = f"{reference / count:.2f}x" if reference else "—"
        print(f"| {path} | {count / 1e3:,.1f}k | {ratio} | {_median_store(found[path])} |")


def _print_instructions(found: dict[str, list[_Round]], unit: str, rounds: int) -> None:
    print(f"\nper {unit}, median of {rounds} rounds:\n")
    print("| path | user instructions | kernel instructions | CPU | Redis's own CPU |")
    print("|---|---:|---:|---:|---:|")
    for path, entries in found.items():
        if entries:
            counted = [e.instructions for e in entries if e.instructions is not None]
            user = statistics.median(c[0] for c in counted)
            kernel = statistics.median(c[1] or 0.0 for c in counted)
            print(
                f"| {path} | {user / 1e3:,.1f}k | {kernel / 1e3:,.1f}k "
                f"| {_median_cpu(entries)} | {_median_store(entries)} |"
            )


def _print_time(found: dict[str, list[_Round]], unit: str, rounds: int) -> None:
    """µs per unit by use, each the median over rounds; the calls most spent in named."""
    ran = {path: entries for path, entries in found.items() if entries}
    medians: dict[str, dict[str, float]] = {}
    for path, entries in ran.items():
        uses = set().union(*(e.time_us for e in entries))
        medians[path] = {u: statistics.median(e.time_us.get(u, 0.0) for e in entries) for u in uses}
    overall: Counter[str] = Counter()
    for spent in medians.values():
        for use, us in spent.items():
            overall[use] += round(us * 1000)
    calls = [u for u, _ in overall.most_common() if u not in (USER, OUTSIDE_CALLS)]
    shown = calls[:SHOWN_CALLS]
    print(f"\nCPU µs per {unit}, median of {rounds} rounds, from CPU-clock samples:\n")
    print("| | " + " | ".join(ran) + " |")
    print("|---|" + "---:|" * len(ran))

    def row(label: str, values: list[float]) -> None:
        print(f"| {label} | " + " | ".join(f"{v:,.1f}" for v in values) + " |")

    row("CPU (from /proc)", [statistics.median(e.cpu_us for e in ran[p]) for p in ran])
    row(USER, [medians[p].get(USER, 0.0) for p in ran])
    row("kernel", [sum(v for u, v in medians[p].items() if u != USER) for p in ran])
    for use in shown:
        row(f"kernel: {use}", [medians[p].get(use, 0.0) for p in ran])
    rest = [u for u in calls if u not in shown]
    row("kernel: other system calls", [sum(medians[p].get(u, 0.0) for u in rest) for p in ran])
    row(
        f"kernel: {OUTSIDE_CALLS.removeprefix('kernel, ')}",
        [medians[p].get(OUTSIDE_CALLS, 0.0) for p in ran],
    )
    print("| Redis's own CPU | " + " | ".join(_median_store(ran[p]) for p in ran) + " |")


def _print_calls(found: dict[str, list[_Round]], unit: str, rounds: int) -> None:
    """System calls per unit, each the median over rounds (none where perf counted none)."""
    ran = {path: entries for path, entries in found.items() if entries and entries[0].calls}
    if not ran:
        return
    per_path = {
        path: {
            name: statistics.median(e.calls.get(name, 0.0) for e in entries)
            for name in ("all", *CALLS)
        }
        for path, entries in ran.items()
    }
    shown = [c for c in CALLS if any(per_path[p][c] >= 0.05 for p in ran)]
    shown.sort(key=lambda c: -max(per_path[p][c] for p in ran))
    print(f"\nsystem calls per {unit}, median of {rounds} rounds (the kernel's tracepoints):\n")
    print("| | " + " | ".join(ran) + " |")
    print("|---|" + "---:|" * len(ran))
    for name in ("all", *shown):
        print(f"| {name} | " + " | ".join(f"{per_path[p][name]:,.2f}" for p in ran) + " |")


def _median_cpu(entries: list[_Round]) -> str:
    return f"{statistics.median(e.cpu_us for e in entries):,.1f} µs"


def _median_store(entries: list[_Round]) -> str:
    stores = [e.store_us for e in entries if e.store_us is not None]
    return f"{statistics.median(stores):,.1f} µs" if stores else "—"


if __name__ == "__main__":
    sys.exit(main())
