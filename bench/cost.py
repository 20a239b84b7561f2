"""What a proxy spends per upgrade or per relayed message, in instructions.

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

    .venv/bin/python -m bench.cost [--work setup|relay] [--paths wsgate-memory,haproxy]
                                   [--rounds 5] [--seconds 2.5]

Needs ``perf`` (Debian's linux-perf, installed by ``scripts/setup.sh --bench``)
with hardware counters; the run says so in one line where they are missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from bench.driver import DriverPool
from bench.proxies import (
    BASE_PATHS,
    TLS_PATHS,
    Endpoint,
    Unavailable,
    parse_path_name,
    pin_tree,
    redis_pid,
    start_echo,
    start_path,
    tree_cpu_seconds,
)
from bench.suite import cpu_split, settle_time_wait, time_wait_now, usage_error
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["main"]

PROG = "python -m bench.cost"
EVENTS = ("instructions:u", "instructions:k")


def _perf_on(pid: int) -> subprocess.Popen[str]:
    argv = ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-p", str(pid)]
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
    args = parser.parse_args(argv)
    paths = _paths(args.paths)
    if min(args.rounds, args.conns, args.concurrency) < 1 or args.seconds <= 0:
        usage_error("counts and seconds must be positive", PROG)
    if shutil.which("perf") is None:
        usage_error("perf is not installed (scripts/setup.sh --bench)", PROG)

    unit = "upgrade" if args.work == "setup" else "round trip"
    settle_time_wait(time_wait_now)  # an earlier run's sockets can make connects time out
    load_cpus, proxy_cpus = cpu_split(sorted(os.sched_getaffinity(0)), 1)
    found: dict[str, list[tuple[float, float, float, float | None]]] = {path: [] for path in paths}
    pool = DriverPool(2)
    try:
        with ProcessGroup() as group:
            echo, echo_pid = start_echo(group)
            redis: list[RedisServer] = []
            proxies: list[Endpoint] = []
            for path in paths:
                try:
                    proxies.append(start_path(path, group, echo, nofile=4096, redis=redis))
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
                    entry = _measure(proxy, pool, args, redis_pid(proxy, redis))
                    if entry is None:
                        raise SystemExit(f"{PROG}: perf counted nothing (no hardware counters?)")
                    found[proxy.name].append(entry)
                    user, kernel, cpu_us, store_us = entry
                    store = f" (Redis: {store_us:,.1f} µs)" if store_us is not None else ""
                    print(
                        f"round {round_number + 1} {proxy.name}: {user / 1e3:,.1f}k user + "
                        f"{kernel / 1e3:,.1f}k kernel instructions, {cpu_us:,.1f} µs CPU "
                        f"per {unit}{store}",
                        flush=True,
                    )
    finally:
        pool.stop()
    print(f"\nper {unit}, median of {args.rounds} rounds ({args.work}):\n")
    print("| path | user instructions | kernel instructions | CPU | Redis's own CPU |")
    print("|---|---:|---:|---:|---:|")
    for path, entries in found.items():
        if entries:
            user = statistics.median(e[0] for e in entries)
            kernel = statistics.median(e[1] for e in entries)
            cpu_us = statistics.median(e[2] for e in entries)
            stores = [e[3] for e in entries if e[3] is not None]
            store = f"{statistics.median(stores):,.1f} µs" if stores else "—"
            print(
                f"| {path} | {user / 1e3:,.1f}k | {kernel / 1e3:,.1f}k | {cpu_us:,.1f} µs "
                f"| {store} |"
            )
    return 0


def _work(pool: DriverPool, proxy: Endpoint, args: argparse.Namespace, seconds: float) -> int:
    """Units of work done: upgrades, or round trips on the connections already open."""
    if args.work == "setup":
        return pool.handshakes(
            proxy.target, concurrency=args.concurrency, warmup=0.0, duration=seconds
        ).total
    return pool.exchange(64, warmup=0.0, duration=seconds).total


def _measure(
    proxy: Endpoint, pool: DriverPool, args: argparse.Namespace, store: int | None
) -> tuple[float, float, float, float | None] | None:
    """One round on one proxy: instructions (user, kernel) and CPU µs per unit of work,
    and the CPU µs of the Redis server ``store`` it admits through, if any."""
    assert proxy.pid is not None
    if args.work == "relay":
        opened = pool.open(proxy.target, args.conns)
        if opened.opened < args.conns:
            raise SystemExit(f"{PROG}: {proxy.name}: opened {opened.opened} of {args.conns}")
    try:
        _work(pool, proxy, args, 0.3)  # warm: the first upgrades or messages find caches cold
        store_before = tree_cpu_seconds(store) if store is not None else 0.0
        cpu_before = tree_cpu_seconds(proxy.pid)
        perf = _perf_on(proxy.pid)
        time.sleep(0.1)  # perf attached before the first unit of work
        units = _work(pool, proxy, args, args.seconds)
        time.sleep(0.1)  # and the closes counted too
        counts = _counts(perf)
        cpu = tree_cpu_seconds(proxy.pid) - cpu_before
        store_cpu = tree_cpu_seconds(store) - store_before if store is not None else None
    finally:
        pool.close_all()
    if not counts or units == 0:
        return None
    per_unit = (counts.get(EVENTS[0], 0) / units, counts.get(EVENTS[1], 0) / units)
    store_us = 1e6 * store_cpu / units if store_cpu is not None else None
    return (*per_unit, 1e6 * cpu / units, store_us)


if __name__ == "__main__":
    sys.exit(main())
