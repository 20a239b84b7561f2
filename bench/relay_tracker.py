"""What the frame-boundary tracker costs the relay, end to end: messages/s with and without.

Runs the raw echo backend, then ``wsgate serve`` in front of it twice: as shipped
(every backend-to-client chunk goes through :class:`FrameTracker`), and with the
tracker taken out of the relay by a bench-only patch. The driver keeps
``--connections`` sessions in 64-byte ping-pong and counts messages per second.
The two gateways take turns for ``--rounds`` rounds so that noise from the rest
of the machine falls on both alike.

    .venv/bin/python -m bench.relay_tracker [--connections 50] [--seconds 5] [--rounds 3]

The echo backend sends the client's masked frames back as they are, so every
frame the tracker sees has a masking key: the slower of its header paths.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

from bench.driver import DriverPool, Target
from bench.proxies import _bench_env, _wait_ready, tree_cpu_seconds
from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv

__all__ = ["main", "serve_untracked"]


def serve_untracked(argv: Sequence[str]) -> int:
    """``wsgate serve`` with a relay that hands backend chunks on without tracking frames.

    For measurement only: without the tracker a gateway-initiated close may land
    inside a frame.
    """
    from wsgate.cli import main as cli_main
    from wsgate.gateway import proxy

    def data_received(self: proxy._BackendSide, data: bytes) -> None:
        self.bytes += len(data)
        self.write(data)

    proxy._BackendSide.data_received = data_received  # type: ignore[method-assign]
    return cli_main(["serve", *argv])


def _gateway(group: ProcessGroup, name: str, echo: Target, tracked: bool) -> tuple[Target, int]:
    port, admin = free_port(), free_port()
    args = [
        "--listen", f"127.0.0.1:{port}",
        "--backend", f"{echo.host}:{echo.port}",
        "--max-per-backend", "100000",
        "--admin", f"127.0.0.1:{admin}",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    if tracked:
        argv = wsgate_argv("serve", *args)
    else:
        run = f"sys.exit(serve_untracked({args!r}))"
        argv = [sys.executable, "-c", f"import sys; from bench.relay_tracker import *; {run}"]
    process = group.start(name, argv, port=("127.0.0.1", port), env=_bench_env())
    _wait_ready(f"http://127.0.0.1:{admin}/ready", timeout=15.0)
    return Target("127.0.0.1", port), process.pid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_tracker", description=__doc__)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="payload bytes per message")
    args = parser.parse_args(argv)

    with ProcessGroup() as group:
        echo_port = free_port()
        echo = Target("127.0.0.1", echo_port)
        group.start(
            "echo",
            [sys.executable, "-m", "bench.echo", "--listen", f"127.0.0.1:{echo_port}"],
            port=("127.0.0.1", echo_port),
            env=_bench_env(),
        )
        targets = {
            "with tracker": _gateway(group, "tracked", echo, tracked=True),
            "without tracker": _gateway(group, "untracked", echo, tracked=False),
        }
        rates: dict[str, list[float]] = {name: [] for name in targets}
        costs: dict[str, list[float]] = {name: [] for name in targets}
        pool = DriverPool(1)
        try:
            for round_number in range(args.rounds):
                for name, (target, pid) in targets.items():
                    opened = pool.open(target, args.connections)
                    if opened.opened != args.connections:
                        raise SystemExit(f"{name}: opened {opened.opened}: {opened.first_error}")
                    # CPU per message tells the cost even when other work shares the cores.
                    cpu_before = tree_cpu_seconds(pid)
                    totals = pool.exchange(args.size, warmup=0.0, duration=args.seconds)
                    cpu = tree_cpu_seconds(pid) - cpu_before
                    pool.close_all()
                    rates[name].append(totals.rate)
                    per_message = 1e6 * cpu / max(1, totals.completed)
                    costs[name].append(per_message)
                    print(
                        f"round {round_number + 1} {name:>15}: {totals.rate:8.0f} msg/s, "
                        f"{per_message:5.2f} us gateway CPU per message ({totals.errors} errors)",
                        flush=True,
                    )
        finally:
            pool.stop()
    with_tracker = statistics.median(rates["with tracker"])
    without = statistics.median(rates["without tracker"])
    cpu_with = statistics.median(costs["with tracker"])
    cpu_without = statistics.median(costs["without tracker"])
    print(
        f"median of {args.rounds}: with tracker {with_tracker:.0f} msg/s and {cpu_with:.2f} us "
        f"CPU/message; without {without:.0f} msg/s and {cpu_without:.2f} us CPU/message "
        f"(tracker: {100 * (cpu_with / cpu_without - 1):+.1f}% CPU per message)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
