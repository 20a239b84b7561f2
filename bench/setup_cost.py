"""What one connection set-up costs a proxy, in instructions: steadier than seconds.

Runs the raw echo backend and one path of the bench in front of it (wsgate with
either store, HAProxy or nginx), the proxy on its own CPU, and drives closed
loops of upgrades (connect, handshake, ``101``, close) while ``perf stat``
counts the proxy's instructions in user space and in the kernel. Instruction
counts barely move when other work shares the machine, so they resolve changes
of a few percent that upgrades per second cannot on a noisy VM.

    .venv/bin/python -m bench.setup_cost [--path wsgate-memory] [--rounds 5] [--seconds 2.5]

Needs ``perf`` (Debian's linux-perf) with hardware counters; the run says so
in one line where they are missing.
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

from bench.driver import DriverPool, Target
from bench.proxies import (
    BASE_PATHS,
    Unavailable,
    pin_tree,
    start_echo,
    start_path,
    tree_cpu_seconds,
)
from bench.suite import cpu_split
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["count_instructions", "main"]

EVENTS = ("instructions:u", "instructions:k")


def count_instructions(pid: int) -> subprocess.Popen[str]:
    """Start ``perf stat`` on ``pid``; :func:`_read_counts` stops it and reads the counts."""
    argv = ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-p", str(pid)]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)


def _read_counts(perf: subprocess.Popen[str]) -> dict[str, int]:
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate(timeout=10)
    counts: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].strip().isdigit():
            counts[fields[2]] = int(fields[0])
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setup_cost", description=__doc__)
    parser.add_argument("--path", choices=BASE_PATHS[1:], default="wsgate-memory")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.5)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    if shutil.which("perf") is None:
        print("python -m bench.setup_cost: perf is not installed (apt-get install linux-perf)")
        return 2
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        print("python -m bench.setup_cost: rounds, seconds and concurrency must be positive")
        return 2

    load_cpus, proxy_cpus = cpu_split(sorted(os.sched_getaffinity(0)), 1)
    user: list[float] = []
    kernel: list[float] = []
    cpu_us: list[float] = []
    pool = DriverPool(2)
    try:
        with ProcessGroup() as group:
            echo, echo_pid = start_echo(group)
            redis: list[RedisServer] = []
            try:
                proxy = start_path(args.path, group, echo, nofile=4096, redis=redis)
            except Unavailable as error:
                print(f"python -m bench.setup_cost: {error}")
                return 2
            assert proxy.pid is not None
            for pid in [*pool.pids, echo_pid, *(r.process.pid for r in redis if r.process)]:
                pin_tree(pid, load_cpus)
            pin_tree(proxy.pid, proxy_cpus)
            target = Target(proxy.target.host, proxy.target.port)
            pool.handshakes(target, concurrency=args.concurrency, warmup=0.2, duration=1.0)
            for round_number in range(args.rounds):
                cpu_before = tree_cpu_seconds(proxy.pid)
                perf = count_instructions(proxy.pid)
                time.sleep(0.1)  # perf attached before the first upgrade
                totals = pool.handshakes(
                    target, concurrency=args.concurrency, warmup=0.0, duration=args.seconds
                )
                time.sleep(0.1)  # and the closes counted too
                counts = _read_counts(perf)
                cpu = tree_cpu_seconds(proxy.pid) - cpu_before
                if not counts or totals.total == 0:
                    print(
                        "python -m bench.setup_cost: perf counted nothing (no hardware counters?)"
                    )
                    return 1
                user.append(counts.get(EVENTS[0], 0) / totals.total)
                kernel.append(counts.get(EVENTS[1], 0) / totals.total)
                cpu_us.append(1e6 * cpu / totals.total)
                print(
                    f"round {round_number + 1}: {totals.total:,} upgrades "
                    f"({totals.failed} failed), "
                    f"{user[-1] / 1e3:,.0f}k user + {kernel[-1] / 1e3:,.0f}k kernel instructions "
                    f"and {cpu_us[-1]:.0f} µs CPU per upgrade",
                    flush=True,
                )
    finally:
        pool.stop()
    print(
        f"median of {args.rounds}, {args.path}: "
        f"{statistics.median(user) / 1e3:,.0f}k user + {statistics.median(kernel) / 1e3:,.0f}k "
        f"kernel instructions, {statistics.median(cpu_us):.0f} µs CPU per upgrade"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
