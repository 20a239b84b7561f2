"""``wsgate load --stages``, ``--threshold`` and ``--storm`` against real backends and gateways.

The truth is the far side's: the backends' own counts (``/stats``) sampled while
the load runs, and the exit status and report of the real ``wsgate load``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import pytest

from wsgate.testbed.processes import ProcessGroup, RedisServer, wait_for_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess, start_backends, start_gateway


def load(report: Path, *args: str) -> subprocess.Popen[str]:
    argv = wsgate_argv("load", "--view", "plain", "--report-json", str(report), *args)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str]:
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
        raise AssertionError(f"wsgate load did not end in {timeout}s:\n{out}\n{err}") from None
    return run.returncode, out + err


def wait_for_line(stream: IO[str], text: str, within: float) -> str:
    """Read ``stream`` until it holds ``text`` (bounded); what was read.

    Read from the descriptor itself, so no line waits in a buffer select cannot see.
    """
    read = b""
    wanted = text.encode()
    deadline = time.monotonic() + within
    while wanted not in read:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([stream.fileno()], [], [], max(0.0, left))
        assert ready, f"no {text!r} in {within}s; read:\n{read.decode(errors='replace')}"
        chunk = os.read(stream.fileno(), 65536)
        assert chunk, f"the output ended before {text!r}; read:\n{read.decode(errors='replace')}"
        read += chunk
    return read.decode(errors="replace")


def active(backends: list[BackendProcess]) -> int:
    return sum(backend.stats()["active_connections"] for backend in backends)


def sample_while(
    run: subprocess.Popen[str], backends: list[BackendProcess]
) -> list[tuple[float, int]]:
    """(seconds, sessions the backends hold) every 50 ms until the load ends (bounded)."""
    samples = []
    started = time.monotonic()
    while run.poll() is None and time.monotonic() - started < 60:
        samples.append((time.monotonic() - started, active(backends)))
        time.sleep(0.05)
    return samples


@pytest.mark.slow
def test_stages_ramp_up_hold_and_ramp_down_at_the_backends(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backends = start_backends(procs, 2)
    report_path = tmp_path / "report.json"
    run = load(
        report_path, *(f"ws://{b.address}/ws" for b in backends),
        "--clients", "4", "--stages", "3s:12,2s:12,3s:0", "--message-interval", "off",
    )  # fmt: skip
    samples = sample_while(run, backends)
    status, output = finish(run)
    assert status == 0, output
    counts = [count for _, count in samples]
    assert max(counts) == 12, samples  # the target, never more
    first_full = next(i for i, count in enumerate(counts) if count == 12)
    last_full = max(i for i, count in enumerate(counts) if count == 12)
    first_open = next(i for i, count in enumerate(counts) if count > 0)
    # Up: the backends saw sessions arrive over the stage, not all at once.
    assert any(3 <= count <= 9 for count in counts[first_open:first_full]), samples
    assert samples[first_full][0] - samples[first_open][0] > 1.5, samples
    # Held for the middle stage, then down over the last one.
    assert samples[last_full][0] - samples[first_full][0] > 1.0, samples
    assert any(3 <= count <= 9 for count in counts[last_full:]), samples
    gone = next(i for i in range(last_full, len(counts)) if counts[i] == 0)
    assert samples[gone][0] - samples[last_full][0] > 1.5, samples
    assert active(backends) == 0
    report = json.loads(report_path.read_text())
    truth = [backend.stats() for backend in backends]
    assert report["connections"]["established"] == sum(s["total_connections"] for s in truth) == 12
    assert report["target"] == 12


def test_a_threshold_that_must_fail_exits_99_and_says_by_how_much(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backends = start_backends(procs, 2, tripwire=2)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": 2})
    report_path = tmp_path / "report.json"
    run = load(
        report_path, gateway.ws_url,
        "--connections", "6", "--message-interval", "off", "--duration", "2s",
        "--threshold", "established>=6", "--threshold", "unanswered==0",
        "--threshold", "rejected_rate<0.01",
    )  # fmt: skip
    status, output = finish(run)
    assert status == 99, output
    truth = [backend.stats() for backend in backends]
    held = sum(s["total_connections"] for s in truth)
    assert held == 4  # the gateway's cap: 2 backends x 2
    report = json.loads(report_path.read_text())
    verdicts = {v["threshold"]: v for v in report["thresholds"]}
    assert verdicts["established>=6"]["passed"] is False
    assert verdicts["established>=6"]["value"] == held
    assert verdicts["established>=6"]["miss"] == 6 - held
    assert f"FAILED  established>=6: {held}, {6 - held} short of 6" in output
    assert verdicts["unanswered==0"]["passed"] is True
    assert verdicts["rejected_rate<0.01"]["passed"] is False
    assert "thresholds: 1 of 3 passed" in output


def test_a_bad_threshold_is_one_line_and_exit_2() -> None:
    done = subprocess.run(
        wsgate_argv("load", "ws://127.0.0.1:9/", "--threshold", "connect_p99<<100ms"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--threshold" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_close_codes_are_counted_by_code_and_by_backend(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backends = start_backends(procs, 2)
    report_path = tmp_path / "report.json"
    run = load(
        report_path, *(f"ws://{b.address}/ws" for b in backends),
        "--clients", "2", "--connections", "3", "--message-interval", "off", "--duration", "4s",
        "--reconnect-delay", "100ms",
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while active(backends) < 6:
        assert time.monotonic() < deadline and run.poll() is None, finish(run)[1]
        time.sleep(0.05)
    closed = {}
    for backend, code in zip(backends, ("4000", "1012"), strict=True):
        url = f"http://{backend.address}/sessions/close?code={code}&count=2"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5) as r:
            closed[backend.pod_id] = (code, json.loads(r.read())["closed"])
    status, output = finish(run)
    assert status == 0, output
    report = json.loads(report_path.read_text())
    by_backend = report["connections"]["closed_by_backend"]
    assert by_backend == {pod: {code: count} for pod, (code, count) in closed.items()}
    assert report["connections"]["closed_by_server"] == {code: n for code, n in closed.values()}
    # 1012 asks the client to come back; 4000 does not.
    assert report["connections"]["reconnects"] == closed[backends[1].pod_id][1]


@pytest.mark.slow
@pytest.mark.redis
def test_a_storm_after_a_replica_dies_recovers_on_the_survivor_within_caps(
    procs: ProcessGroup, redis_server: RedisServer, tmp_path: Path
) -> None:
    cap = 4
    backends = start_backends(procs, 3, tripwire=cap)
    state = {"store": redis_server.url, "lease_ttl": "1500ms", "timeout": "250ms"}
    gateways = [
        start_gateway(
            procs, backends, name=f"gw-{i}", state=state,
            limits={"max_connections_per_backend": cap, "retry_after": 1},
        )
        for i in range(2)
    ]  # fmt: skip
    for gateway in gateways:
        wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    victim = gateways[1]
    sessions = 3 * cap
    report_path = tmp_path / "report.json"
    run = load(
        report_path, *(g.ws_url for g in gateways),
        "--clients", "4", "--connections", str(sessions // 4), "--message-interval", "off",
        "--source-ips", "127.0.0.2-127.0.0.5", "--reconnect-delay", "200ms",
        "--storm", "--storm-wait", str(victim.process.pid), "--storm-timeout", "30s",
        "--threshold", "storm_recovery<20s", "--plot", str(tmp_path / "storm.png"),
    )  # fmt: skip
    # The backends count a session at its upgrade, the clients at its 101: kill
    # only once both hold all of them, so what the storm reports lost is the victim's.
    assert run.stderr is not None
    wait_for_line(run.stderr, f"Storm: all {sessions} sessions open", within=30)
    assert active(backends) == sessions
    on_victim = sum(b["active_here"] for b in victim.admin("/clusters")["backends"])
    victim.process.signal(signal.SIGKILL)
    samples = sample_while(run, backends)
    status, output = finish(run)
    assert status == 0, output
    truth = [backend.stats() for backend in backends]
    assert max(s["peak_connections"] for s in truth) <= cap, truth
    assert sum(s["refused"] for s in truth) == 0, truth  # the tripwire never fired
    assert sessions in [count for _, count in samples], samples  # all back, as they count it
    report: dict[str, Any] = json.loads(report_path.read_text())
    storm = report["storm"]
    assert storm["outcome"] == "recovered", storm
    # The victim's clients only, as the victim counted them.
    assert 0 < on_victim < sessions
    assert storm["dropped"] == on_victim
    assert report["connections"]["closed_by_server"].get("1006") == on_victim
    assert storm["recovery_s"] is not None and storm["recovery_s"] < 20
    # The survivor refused until the dead replica's lease lapsed, and said when to retry.
    assert storm["rejected"] > 0 and storm["retry_after_s"], storm
    assert (tmp_path / "storm.png").read_bytes()[:4] == b"\x89PNG"
