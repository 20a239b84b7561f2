"""``wsgate demo`` end to end: it passes, its checks can fail, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from wsgate.testbed.processes import ProcessGroup, find_redis_server, wsgate_argv


def run_demo(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsgate_argv("demo", "--speed", "20", "--view", "plain", *args),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_the_demo_passes_at_high_speed(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_demo("--report-json", str(tmp_path / "demo.json"), "--seed", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 40
    assert "wsgate demo: passed (6 of 6 checks passed)" in done.stdout
    assert "dashboard: http://127.0.0.1:" in done.stderr
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["by_backend"] == {"pod-a": 2, "pod-b": 2, "pod-c": 2, "pod-d": 2}
    assert report["connections"]["attempted"] >= 50
    assert report["messages"]["sent"] == report["messages"]["received"] > 0


@pytest.mark.slow
def test_the_checks_fail_when_a_backend_tripwire_fires() -> None:
    done = run_demo("--gateway-cap", "3")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[FAIL] no backend ever above its cap of 2" in done.stdout
    assert "tripwires fired" in done.stdout
    assert "wsgate demo: FAILED" in done.stdout


@pytest.mark.slow
def test_replicas_share_the_caps_through_a_private_redis(tmp_path: Path) -> None:
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    done = run_demo("--replicas", "2", "--report-json", str(tmp_path / "demo.json"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "passed (6 of 6 checks passed)" in done.stdout
    report = json.loads((tmp_path / "demo.json").read_text())
    assert sum(report["by_backend"].values()) == 8
    assert len(report["urls"]) == 2


@pytest.mark.slow
def test_ctrl_c_stops_every_process_it_started(procs: ProcessGroup) -> None:
    demo = procs.start("demo", wsgate_argv("demo", "--view", "plain", "--log-level", "warning"))
    deadline = time.monotonic() + 30
    while "dashboard:" not in demo.output():
        assert demo.popen.poll() is None, demo.output()
        assert time.monotonic() < deadline, demo.output()
        time.sleep(0.1)
    started = children_of(demo.pid)
    assert len(started) >= 5, started  # 4 backends and a gateway
    os.kill(demo.pid, signal.SIGINT)
    assert demo.popen.wait(30) == 130, demo.output()
    assert "interrupted" in demo.output()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in started):
        assert time.monotonic() < deadline, [pid for pid in started if alive(pid)]
        time.sleep(0.1)


def test_replicas_must_be_positive() -> None:
    done = subprocess.run(
        wsgate_argv("demo", "--replicas", "0"), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "wsgate demo: error: --replicas must be at least 1"


@pytest.mark.slow
def test_the_storm_demo_recovers_within_the_caps(tmp_path: Path) -> None:
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    plot = tmp_path / "storm.png"
    done = run_demo(
        "--storm", "--report-json", str(tmp_path / "storm.json"), "--plot", str(plot),
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wsgate demo: passed (3 of 3 checks passed)" in done.stdout
    report = json.loads((tmp_path / "storm.json").read_text())
    storm = report["storm"]
    assert storm["outcome"] == "recovered" and 0 < storm["dropped"] < 100
    # Until the dead replica's lease lapsed its slots were full: the survivor said when to retry.
    assert storm["rejected_by_status"].get("503", 0) > 0 and storm["retry_after_s"]
    assert [s["open"] for s in report["timeline"]].count(100) > 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
