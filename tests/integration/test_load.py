"""``wsgate load`` against real backends (and a real gateway): its report against their counts."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from wsgate.gateway.access_log import FLUSH_INTERVAL
from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess, http_json, start_backends, start_gateway


def load_argv(report: Path, *args: str) -> list[str]:
    return wsgate_argv("load", "--view", "plain", "--report-json", str(report), *args)


def run_load(report: Path, *args: str, timeout: float = 40.0) -> dict[str, Any]:
    done = subprocess.run(load_argv(report, *args), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def ws_urls(backends: list[BackendProcess]) -> list[str]:
    return [f"ws://{backend.address}/ws" for backend in backends]


def wait_for(predicate: Any, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_the_report_per_backend_and_totals_equal_the_backends_own_counts(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backends = start_backends(procs, 3)
    report = run_load(
        tmp_path / "report.json",
        *ws_urls(backends),
        "--clients", "6", "--connections", "3", "--connect-interval", "100ms",
        "--message-interval", "100ms-300ms", "--duration", "2.5s",
        "--csv", str(tmp_path / "run.csv"), "--plot", str(tmp_path / "run.png"),
    )  # fmt: skip
    truth = {backend.pod_id: backend.stats() for backend in backends}
    assert report["by_backend"] == {pod: s["total_connections"] for pod, s in truth.items()}
    assert report["connections"]["established"] == 18
    assert report["connections"]["attempted"] == 18
    assert sum(s["total_connections"] for s in truth.values()) == 18
    assert all(s["peak_connections"] == 6 for s in truth.values())
    messages = report["messages"]
    assert messages["sent"] == messages["received"] == sum(s["messages"] for s in truth.values())
    assert messages["sent"] > 18  # a hello each, then the scheduled messages
    assert report["latency_ms"]["rtt"]["count"] == messages["received"]
    assert 0 < report["latency_ms"]["connect"]["p50"] <= report["latency_ms"]["connect"]["max"]
    assert all(s["active_connections"] == 0 for s in (b.stats() for b in backends))
    assert (tmp_path / "run.csv").read_text().startswith("t_s,open,")
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"


def test_source_ips_reach_the_backend_as_distinct_client_addresses(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    (backend,) = start_backends(procs, 1)
    report = run_load(
        tmp_path / "report.json",
        *ws_urls([backend]),
        "--clients", "4", "--connections", "2", "--source-ips", "127.0.0.2-127.0.0.5",
        "--message-interval", "off", "--duration", "1s",
    )  # fmt: skip
    assert report["connections"]["established"] == 8
    assert backend.stats()["peers"] == {f"127.0.0.{n}": 2 for n in range(2, 6)}


@pytest.mark.slow
def test_sessions_closed_by_the_server_are_reopened_only_for_the_reconnect_codes(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    (backend,) = start_backends(procs, 1)
    report_path = tmp_path / "report.json"
    load = procs.start(
        "load",
        load_argv(
            report_path, *ws_urls([backend]),
            "--connections", "4", "--message-interval", "200ms", "--duration", "4s",
            "--reconnect-delay", "200ms",
        ),
    )  # fmt: skip
    wait_for(lambda: backend.stats()["active_connections"] == 4)
    for code, count in (("1012", 2), ("1000", 1)):
        http_json(
            f"http://{backend.address}/sessions/close?code={code}&count={count}", method="POST"
        )
        time.sleep(0.2)
    wait_for(lambda: backend.stats()["total_connections"] == 6)
    assert load.popen.wait(30) == 0, load.output()
    report = json.loads(report_path.read_text())
    assert report["connections"]["reconnects"] == 2
    assert report["connections"]["closed_by_server"] == {"1000": 1, "1012": 2}
    assert report["connections"]["established"] == 6
    truth = backend.stats()
    assert truth["total_connections"] == 6
    assert truth["peak_connections"] == 4
    assert report["messages"]["received"] == truth["messages"]


def test_interactive_prompt_driven_through_stdin(procs: ProcessGroup) -> None:
    (backend,) = start_backends(procs, 1)
    script = "connect 3\nstatus\nsend hello there\nclose 2\nstatus\nbogus\nquit\n"
    done = subprocess.run(
        wsgate_argv("load", "--interactive", "--message-interval", "off", *ws_urls([backend])),
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("connect: 3 of 3 open")
    assert "open: 3 (pod-a: 3)" in lines[1]
    answers = [json.loads(line.split(": ", 1)[1]) for line in lines[2:5]]
    assert [a["echo"] for a in answers] == ["hello there"] * 3
    assert {a["pod"] for a in answers} == {"pod-a"}
    assert lines[5].startswith("close: closed 2.")
    assert "open: 1 (pod-a: 1)" in lines[6]
    assert "unknown command 'bogus'" in lines[7]
    truth = backend.stats()
    assert truth["total_connections"] == 3
    assert truth["messages"] == 6  # a hello on each session, then "hello there" on each
    assert truth["active_connections"] == 0


@pytest.mark.slow
def test_http_mode_with_thousands_of_concurrent_slow_requests(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    backends = start_backends(procs, 2)
    urls = [f"http://{b.address}/slow?min=1.5&max=2" for b in backends]
    started = time.monotonic()
    report = run_load(
        tmp_path / "report.json", "--http", *urls,
        "--concurrency", "2000", "--clients", "2", "--think", "0-100ms", "--duration", "3s",
    )  # fmt: skip
    assert time.monotonic() - started < 30
    truth = {backend.pod_id: backend.stats() for backend in backends}
    # Every request in flight at the end was allowed to finish, so the counts agree exactly.
    assert report["by_backend"] == {pod: s["http_requests"] for pod, s in truth.items()}
    assert report["connections"]["established"] == sum(report["by_backend"].values())
    assert all(s["peak_http_in_flight"] >= 950 for s in truth.values()), truth
    assert report["connections"]["peak_open"] == 2000
    assert report["connections"]["failed"] == {}
    # Each request waits at least 1.5 s at the backend, and none outlived the run.
    assert 1500 <= report["latency_ms"]["rtt"]["p50"] <= (time.monotonic() - started) * 1000


def test_the_health_port_answers_while_the_load_runs(procs: ProcessGroup, tmp_path: Path) -> None:
    (backend,) = start_backends(procs, 1)
    port = free_port()
    procs.start(
        "load",
        load_argv(
            tmp_path / "r.json", *ws_urls([backend]),
            "--health-port", str(port), "--health-host", "127.0.0.1", "--duration", "20s",
        ),
        port=("127.0.0.1", port),
    )  # fmt: skip
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        assert (response.status, response.read()) == (200, b"ok")


def test_bad_flags_end_in_one_line(tmp_path: Path) -> None:
    for args in (["http://127.0.0.1:1/"], ["ws://127.0.0.1:1/", "--source-ips", "nope"]):
        done = subprocess.run(
            wsgate_argv("load", *args), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_retry_after_is_honoured_and_rejections_are_counted_through_the_gateway(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    (backend,) = start_backends(procs, 1, tripwire=1)
    gateway = start_gateway(
        procs,
        [backend],
        limits={"max_connections_per_backend": 1, "retry_after": "1s"},
    )
    report = run_load(
        tmp_path / "report.json", gateway.ws_url,
        "--clients", "3", "--source-ips", "127.0.0.2-127.0.0.4", "--message-interval", "off",
        "--backoff-base", "100ms", "--duration", "4s",
    )  # fmt: skip
    time.sleep(FLUSH_INTERVAL * 3)  # the gateway's buffered access-log lines
    refusals: dict[str, list[float]] = {}
    for line in gateway.process.output().splitlines():
        start = line.find("{")
        if start < 0 or '"status":503' not in line:
            continue
        record = json.loads(line[start:])
        refusals.setdefault(record["client"], []).append(record["time"])
    assert report["connections"]["established"] == 1
    assert report["connections"]["rejected"] == {"503": sum(len(t) for t in refusals.values())}
    assert report["connections"]["rejected_by_reason"] == {
        "no_capacity": report["connections"]["rejected"]["503"]
    }
    assert len(refusals) == 2  # the two clients that did not get the one slot
    for times in refusals.values():
        assert len(times) >= 2
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert min(gaps) >= 1.0 - 0.01, gaps  # Retry-After: 1, and then some jitter
    truth = backend.stats()
    assert truth["total_connections"] == 1
    assert truth["refused"] == 0


def test_connect_rate_spaces_attempts_across_all_clients(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    (backend,) = start_backends(procs, 1)
    report = run_load(
        tmp_path / "report.json", *ws_urls([backend]),
        "--clients", "3", "--connections", "2", "--connect-rate", "5",
        "--message-interval", "off", "--duration", "2s",
    )  # fmt: skip
    assert report["connections"]["established"] == 6
    opened = [
        datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in backend.process.output().splitlines()
        if "Active connections:" in line
    ][:6]  # the six opens; the closes all come at the end
    assert len(opened) == 6
    gaps = [later - earlier for earlier, later in itertools.pairwise(sorted(opened))]
    assert min(gaps) >= 0.15, gaps  # 5 per second: one every 200 ms
