"""``serve --workers N``: N gateway processes on one port, kept running by a supervisor.

Each worker is a full gateway and a replica of its own in the shared state;
the kernel spreads new connections over their SO_REUSEPORT sockets. The
supervisor only forwards signals (SIGTERM/SIGINT drain every worker, SIGHUP
reloads every worker) and starts again a worker that died on its own.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType

__all__ = ["supervise"]

log = logging.getLogger("wsgate.workers")

# A worker that dies this soon after its start is not restarted at once.
RESTART_BACKOFF = 1.0


def supervise(count: int, argv: Sequence[str]) -> int:
    """Run ``count`` workers of ``wsgate <argv>`` until a stop signal; their exit status."""

    def start(index: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "wsgate.cli", *argv, "--worker-index", str(index)]
        # A group of its own: a Ctrl-C in the terminal reaches the supervisor alone,
        # which passes it on once (a second SIGINT would cut the drain short).
        return subprocess.Popen(command, process_group=0)

    workers = {index: start(index) for index in range(count)}
    started = dict.fromkeys(workers, time.monotonic())
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    log.info("supervising %d workers: %s", count, " ".join(str(w.pid) for w in workers.values()))

    worst = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = next((i for i, w in workers.items() if w.pid == pid), None)
        if index is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        workers[index].returncode = code
        if stopping:
            del workers[index]
            worst = max(worst, code) if code > 0 else worst
            continue
        if code == 2:
            # A worker refused its config or address: the others will too, stop.
            log.error("worker %d exited with 2 (a usage error); stopping all workers", index)
            stopping = True
            del workers[index]
            forward(signal.SIGTERM, None)
            worst = 2
            continue
        log.error("worker %d (pid %d) exited with %d; starting it again", index, pid, code)
        if time.monotonic() - started[index] < RESTART_BACKOFF:
            time.sleep(RESTART_BACKOFF)
        workers[index] = start(index)
        started[index] = time.monotonic()
    return worst
