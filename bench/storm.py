"""``python -m bench.storm``: a reconnect storm when one of two gateway replicas dies.

10,000 sessions are held across two wsgate replicas sharing one Redis (each
replica ``serve --workers 2``, so no process holds more than 10,000 sockets),
in front of demo backends whose caps add up to exactly the sessions held. When
the backends count them all, one replica (its supervisor and workers) is
SIGKILLed. Its clients fail over to the survivor, which refuses them (503 with
``Retry-After``) until it sees the dead replica's connections to Redis closed
(``departure_check``; with ``--departure-check 0``, until its lease lapses) and
takes its slots back; they come back through ``wsgate load --storm`` (Retry-After honoured,
jittered and capped backoff). The figure: the time until every session is open
again, by the load's clock and by the backends' own counts; the refusals and
their Retry-After; and every backend's highest count against its cap.

Beside it, the same storm through two HAProxy replicas (two processes each on
one port) in front of the same kind of backends: HAProxy shares no cap, so its
figure is the reconnect rate alone.

    python -m bench.storm [--smoke] [--sessions 10000] [--out bench/results/storm]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.results import write_results
from bench.suite import machine
from wsgate.runtime import raise_open_files_limit
from wsgate.testbed.processes import (
    ProcessGroup,
    RedisServer,
    find_pids,
    free_port,
    wait_for_port,
    wsgate_argv,
)
from wsgate.testbed.topology import BackendProcess, free_port_run, start_backends, start_gateway

__all__ = ["StormPlan", "main", "reconnect_rate"]

RESULTS = Path(__file__).resolve().parent / "results" / "storm"
HAPROXY = "/usr/sbin/haproxy"
_SAMPLE = 0.25  # seconds between looks at the backends' counts


@dataclass(frozen=True)
class StormPlan:
    sessions: int
    backends: int
    workers: int  # processes per replica
    clients: int  # simulated clients, one source address each
    lease_ttl: str
    departure_check: str
    retry_after: str
    hold: float  # seconds every session is held before the kill
    timeout: float  # seconds each phase may take
    smoke: bool

    @property
    def cap(self) -> int:
        return self.sessions // self.backends


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="200 sessions: proves it works")
    parser.add_argument("--sessions", type=int, help="sessions held (default 10000)")
    parser.add_argument("--backends", type=int, help="demo backends (default 10)")
    parser.add_argument("--lease-ttl", help="the replicas' lease (default 15s, the config's)")
    parser.add_argument(
        "--departure-check",
        help="how often replicas look for ended ones (default 500ms, the config's; 0: leases only)",
    )
    parser.add_argument("--retry-after", help="the 503's Retry-After (default 5s, the config's)")
    parser.add_argument("--paths", default="wsgate,haproxy", help="wsgate, haproxy or both")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where latest.md/json go")
    return parser


def plan_from_args(args: argparse.Namespace) -> StormPlan:
    smoke = args.smoke
    sessions = args.sessions or (200 if smoke else 10_000)
    backends = args.backends or (4 if smoke else 10)
    if sessions % backends:
        raise SystemExit("python -m bench.storm: --sessions must be a multiple of --backends")
    return StormPlan(
        sessions=sessions,
        backends=backends,
        # 2 sockets a session: a process must stay under the 20,000 open files allowed.
        workers=1 if sessions <= 4000 else 2,
        clients=min(50, max(2, sessions // 500)),
        lease_ttl=args.lease_ttl or ("2s" if smoke else "15s"),
        departure_check=args.departure_check or "500ms",
        retry_after=args.retry_after or ("1s" if smoke else "5s"),
        hold=1.0 if smoke else 3.0,
        timeout=60.0 if smoke else 180.0,
        smoke=smoke,
    )


def active(backends: list[BackendProcess]) -> int:
    return sum(int(backend.stats()["active_connections"]) for backend in backends)


def reconnect_rate(timeline: list[dict[str, Any]], storm: dict[str, Any]) -> float | None:
    """Sessions reopened per second, from the first one back until all were back.

    This leaves out the wait before the first was let in (a lease, a Retry-After).
    """
    dropped_at, recovered_at = storm["dropped_at_s"], storm["recovered_at_s"]
    if dropped_at is None or recovered_at is None:
        return None
    after = [s for s in timeline if dropped_at <= s["t"] <= recovered_at]
    if not after:
        return None
    lowest = min(int(s["open"]) for s in after)
    bottom = max(i for i, s in enumerate(after) if s["open"] == lowest)
    back = next((s for s in after[bottom:] if s["open"] > lowest), None)
    if back is None or recovered_at <= back["t"]:
        return None
    rate = (int(storm["sessions"]) - lowest) / (float(recovered_at) - float(back["t"]))
    return round(rate, 1)


def _load_argv(plan: StormPlan, urls: list[str], victim: str, report: Path) -> list[str]:
    per_client = plan.sessions // plan.clients
    return wsgate_argv(
        "load", *urls,
        "--clients", str(plan.clients), "--connections", str(per_client),
        "--source-ips", f"127.0.0.2-127.0.0.{1 + plan.clients}",
        "--message-interval", "off", "--connect-timeout", "10s",
        "--storm", "--storm-wait", victim, "--storm-timeout", f"{plan.timeout:g}s",
        "--view", "plain", "--progress-interval", "5s", "--report-json", str(report),
    )  # fmt: skip


def _storm(
    plan: StormPlan,
    group: ProcessGroup,
    backends: list[BackendProcess],
    urls: list[str],
    victim: str,
) -> dict[str, Any]:
    """Hold the sessions, kill every process ``victim`` names, follow the recovery."""
    report_path = group.log_dir / f"load-{len(urls)}-{victim.rsplit('/', 1)[-1]}.json"
    argv = _load_argv(plan, urls, victim, report_path)
    load = group.start("load", argv)
    deadline = time.monotonic() + plan.timeout
    while active(backends) < plan.sessions:
        if load.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the sessions did not all open: {load.output()[-2000:]}")
        time.sleep(_SAMPLE)
    time.sleep(plan.hold)
    pids = find_pids(victim)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    back_at: float | None = None
    lowest = plan.sessions
    while load.popen.poll() is None and time.monotonic() - killed_at < plan.timeout + 30:
        held = active(backends)
        lowest = min(lowest, held)
        if back_at is None and held >= plan.sessions and lowest < plan.sessions:
            back_at = time.monotonic()
        time.sleep(_SAMPLE)
    if load.popen.poll() is None:
        raise RuntimeError("the load did not end after the storm")
    report: dict[str, Any] = json.loads(report_path.read_text())
    counts = [backend.stats() for backend in backends]
    storm = report["storm"]
    return {
        "killed_pids": len(pids),
        "outcome": storm["outcome"],
        "sessions": plan.sessions,
        "lost": storm["dropped"],
        "recovery_s": storm["recovery_s"],
        "recovery_at_backends_s": round(back_at - killed_at, 2) if back_at else None,
        "reconnect_rate_per_s": reconnect_rate(report["timeline"], storm),
        "attempts": storm["attempts"],
        "rejected_by_status": storm["rejected_by_status"],
        "rejected_by_reason": storm["rejected_by_reason"],
        "retry_after_s": storm["retry_after_s"],
        "failed": storm["failed"],
        "backend_peak": max(int(c["peak_connections"]) for c in counts),
        "backend_refused": sum(int(c["refused"]) for c in counts),
        "lowest_at_backends": lowest,
        "load_command": shlex.join(argv[2:]),
    }


def run_wsgate(plan: StormPlan, log_dir: Path) -> dict[str, Any]:
    with ProcessGroup(log_dir / "wsgate") as group:
        redis = RedisServer(group).start()
        backends = start_backends(group, plan.backends, tripwire=plan.cap)
        state = {
            "store": redis.url,
            "lease_ttl": plan.lease_ttl,
            "departure_check": plan.departure_check,
            "namespace": "storm",
        }
        replicas = []
        for index in range(2):
            admin = free_port_run(plan.workers)
            replicas.append(
                start_gateway(
                    group,
                    backends,
                    name=f"replica-{index + 1}",
                    admin_port=admin,
                    flags=["--workers", str(plan.workers)] if plan.workers > 1 else [],
                    state=state,
                    access_log=False,
                    limits={
                        "max_connections_per_backend": plan.cap,
                        "retry_after": plan.retry_after,
                    },
                )
            )
            for worker in range(plan.workers):
                wait_for_port("127.0.0.1", admin + worker)
        result = _storm(
            plan, group, backends, [r.ws_url for r in replicas], replicas[1].config_path
        )
        result["cap"] = plan.cap
        return result


def _haproxy_config(port: int, backends: list[BackendProcess]) -> str:
    servers = "\n".join(f"    server {b.pod_id} {b.address}" for b in backends)
    # Each process holds at most 10,000 sockets, under the 20,000 open files allowed.
    return f"""\
global
    nbthread 1
    ulimit-n 20000
    maxconn 9000

defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s

frontend storm
    bind 127.0.0.1:{port}
    default_backend demo

backend demo
    balance leastconn
{servers}
"""


def run_haproxy(plan: StormPlan, log_dir: Path) -> dict[str, Any]:
    binary = HAPROXY if os.access(HAPROXY, os.X_OK) else shutil.which("haproxy")
    if binary is None:
        return {"outcome": f"skipped: {HAPROXY} is not installed (./scripts/setup.sh --bench)"}
    with ProcessGroup(log_dir / "haproxy") as group:
        backends = start_backends(group, plan.backends)
        urls = []
        for index in range(2):
            port = free_port()
            path = group.log_dir / f"haproxy-{index + 1}.cfg"
            path.write_text(_haproxy_config(port, backends))
            # The kernel spreads the port's connections over the processes (SO_REUSEPORT).
            for worker in range(plan.workers):
                group.start(f"haproxy-{index + 1}-{worker}", [binary, "-db", "-f", str(path)])
            wait_for_port("127.0.0.1", port)
            urls.append(f"ws://127.0.0.1:{port}/")
        result = _storm(plan, group, backends, urls, str(group.log_dir / "haproxy-2.cfg"))
        result["cap"] = None
        return result


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:,}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(plan: StormPlan, results: dict[str, dict[str, Any]], command: str) -> str:
    rows = [
        ("outcome", "outcome"),
        ("sessions held", "sessions"),
        ("lost with the killed replica", "lost"),
        ("until all back, load's clock (s)", "recovery_s"),
        ("until all back, backends' counts (s)", "recovery_at_backends_s"),
        ("reconnect rate once let in (sessions/s)", "reconnect_rate_per_s"),
        ("connect attempts meanwhile", "attempts"),
        ("refused meanwhile, by status", "rejected_by_status"),
        ("refused meanwhile, by reason", "rejected_by_reason"),
        ("Retry-After given (s: refusals)", "retry_after_s"),
        ("failed meanwhile", "failed"),
        ("highest backend count (cap)", "backend_peak"),
        ("refused by a backend's tripwire", "backend_refused"),
    ]
    names = {"wsgate": "wsgate, 2 replicas on Redis", "haproxy": "HAProxy, 2 replicas"}
    head = "| | " + " | ".join(names[name] for name in results) + " |"
    lines = [
        "# Reconnect storm: one of two replicas SIGKILLed",
        "",
        f"Run: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; machine: {machine()}",
        f"- Command: `{command}`",
        f"- {plan.sessions:,} sessions from {plan.clients} source addresses over "
        f"{plan.backends} demo backends; {plan.workers} process(es) per replica; wsgate: a cap of "
        f"{plan.cap:,} per backend (the caps add up to the sessions), lease {plan.lease_ttl}, "
        f"departure check {plan.departure_check}, Retry-After {plan.retry_after}; "
        "HAProxy: leastconn, no cap.",
        f"- Held {plan.hold:g} s after the backends counted them all, then every process of "
        "the second replica was SIGKILLed; `wsgate load --storm --storm-wait` measured the "
        "recovery (its command is in latest.json).",
        "",
        head,
        "|---|" + "---:|" * len(results),
    ]
    for label, key in rows:
        cells = [_cell(result.get(key)) for result in results.values()]
        if key == "backend_peak":
            cells = [
                f"{_cell(r.get(key))} ({_cell(r.get('cap'))})" if "cap" in r else "—"
                for r in results.values()
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    raise_open_files_limit()
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - {"wsgate", "haproxy"}
    if unknown or not paths:
        print(f"python -m bench.storm: error: unknown paths {sorted(unknown)}", file=sys.stderr)
        return 2
    runners = {"wsgate": run_wsgate, "haproxy": run_haproxy}
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wsgate-storm-{os.getpid()}"
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        print(f"bench.storm: {path}: {plan.sessions} sessions ...", flush=True)
        try:
            results[path] = runners[path](plan, log_dir)
        except (RuntimeError, TimeoutError, FileNotFoundError) as error:
            results[path] = {"outcome": f"FAILED: {str(error).splitlines()[0][:300]}"}
        print(f"bench.storm: {path}: {results[path].get('outcome')}", flush=True)
    command = shlex.join(
        ["python", "-m", "bench.storm", *(argv if argv is not None else sys.argv[1:])]
    )
    document = {"command": command, "plan": asdict(plan), "results": results}
    text = markdown(plan, results, command)
    write_results(args.out, "latest", text, document)
    print(text)
    failed = [p for p, r in results.items() if str(r.get("outcome", "")).startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
