"""The gateway's idle CPU with many backends: health checks only, no traffic.

One process here answers the health checks of every backend (one asyncio
server per port, answering ``200`` to anything), so a thousand backends need
no thousand processes. A real ``wsgate serve`` checks them all every
``--interval``; after it has settled, its CPU time is read from
``/proc/PID/stat`` over ``--seconds``.

    .venv/bin/python -m bench.idle [--backends 1000] [--interval 5s] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_gateway

__all__ = ["main"]

_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Responder:
    """Health answers on many ports, on an event loop of its own thread."""

    def __init__(self, count: int):
        self.count = count
        self.ports: list[int] = []
        self.checks = 0
        self.times: list[float] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Responder:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the health responder did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._listen())
        self._ready.set()
        self._loop.run_forever()

    async def _listen(self) -> None:
        for _ in range(self.count):
            server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
            self.ports.append(server.sockets[0].getsockname()[1])

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.checks += 1
        self.times.append(time.monotonic())
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            writer.write(_ANSWER)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()


def max_in_window(times: list[float], width: float) -> int:
    most, start = 0, 0
    for end, instant in enumerate(times):
        while instant - times[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__)
    parser.add_argument("--backends", type=int, default=1000, help="how many (1000)")
    parser.add_argument("--interval", default="5s", help="health.interval (5s, the default)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured (20)")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before (15)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.backends <= 5000 or args.seconds <= 0 or args.settle < 0:
        parser.exit(2, "--backends must be 1..5000, --seconds positive, --settle >= 0\n")
    responder = Responder(args.backends).start()
    try:
        with ProcessGroup() as group:
            backends = [
                {"address": f"127.0.0.1:{port}", "id": f"pod-{i}"}
                for i, port in enumerate(responder.ports)
            ]
            gateway = start_gateway(
                group, backends, health={"interval": args.interval, "timeout": "1s"},
                access_log=False,
            )  # fmt: skip
            time.sleep(args.settle)
            checks, cpu, started = (
                responder.checks,
                cpu_seconds(gateway.process.pid),
                time.monotonic(),
            )
            time.sleep(args.seconds)
            elapsed = time.monotonic() - started
            used = cpu_seconds(gateway.process.pid) - cpu
            checks = responder.checks - checks
            window = [t for t in responder.times if started <= t < started + elapsed]
    finally:
        responder.stop()
    result = {
        "command": "python -m bench.idle " + " ".join(argv),
        "backends": args.backends,
        "interval": args.interval,
        "gateway_cpu_percent": round(100 * used / elapsed, 1),
        "health_checks_per_second": round(checks / elapsed, 1),
        "cpu_ms_per_check": round(1000 * used / checks, 3) if checks else None,
        # How bunched the checks are: the most begun in any tenth of a second.
        "most_checks_in_100ms": max_in_window(window, 0.1),
    }
    print(
        json.dumps(result, indent=2)
        if args.json
        else "\n".join(f"{k}: {v}" for k, v in result.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
