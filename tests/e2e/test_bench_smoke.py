"""`python -m bench --smoke`: every path starts, every figure comes out, the numbers are sane.

This is the benchmark's CI check: tiny sizes and one repetition, so it proves
the harness works, not how fast anything is.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wsgate.testbed.processes import find_redis_server

ROOT = Path(__file__).resolve().parents[2]
SMOKE_BOUND = 300  # the smoke run's --max-conns-bound default


def _run_smoke(out: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(out), *flags]
    bench = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = bench.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        # SIGINT makes the bench stop every process it started before it exits.
        bench.send_signal(signal.SIGINT)
        output, _ = bench.communicate(timeout=30)
        pytest.fail(f"the smoke run took more than 90 s:\n{output[-4000:]}")
    return subprocess.CompletedProcess(argv, bench.returncode, output, "")


@pytest.mark.bench
@pytest.mark.slow
def test_smoke_run_measures_every_path_and_writes_sane_results(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run_smoke(out)
    print(done.stdout)  # all of it (a failed path's log is near the start): shown on failure
    failed = [line for line in done.stdout.splitlines() if "FAILED" in line]
    assert done.returncode == 0, "\n".join(failed) or done.stdout[-4000:]

    data = json.loads((out / "latest.json").read_text())
    markdown = (out / "latest.md").read_text()
    status = data["paths"]
    assert set(status) == {
        "direct", "wsgate-memory", "wsgate-redis", "haproxy", "nginx",
        "wsgate-memory-tls", "haproxy-tls",
    }  # fmt: skip
    assert not [path for path, text in status.items() if text.startswith("FAILED")], status
    # Only a missing binary may skip a path, and it says so.
    must_run = ["direct", "wsgate-memory", "wsgate-memory-tls"]
    must_run += ["wsgate-redis"] if find_redis_server() else []
    for path in must_run:
        assert status[path].startswith("ok"), status[path]
    for path, text in status.items():
        assert text.startswith("ok") or "not installed" in text, (path, text)
    measured = [path for path, text in status.items() if text.startswith("ok")]
    proxies = [path for path in measured if path != "direct"]
    assert "| figure | " + " | ".join(measured) + " |" in markdown

    figures = data["figures"]

    def medians(key: str, paths: list[str]) -> dict[str, float]:
        found = figures[key]["paths"]
        assert set(paths) <= set(found), (key, sorted(found))
        return {path: found[path]["median"] for path in paths}

    for key in ("relay_64_10", "relay_16384_10", "relay_64_40", "relay_16384_40"):
        for path, rate in medians(key, measured).items():
            assert 100 < rate < 10_000_000, (key, path, rate)
    for key in ("latency_p50", "latency_p99", "loaded_p50", "loaded_p99"):
        for path, micros in medians(key, measured).items():
            assert 0 < micros < 1_000_000, (key, path, micros)
    p50, p99 = medians("latency_p50", measured), medians("latency_p99", measured)
    assert all(p50[path] <= p99[path] for path in measured)
    assert set(figures["added_p99"]["paths"]) == set(proxies)
    for path, rate in medians("setup", measured).items():
        assert 10 < rate < 1_000_000, (path, rate)
    # Redis's own CPU, read from its process: beside the paths that admit through it only.
    store_cpu = figures["setup_store_cpu"]["paths"]
    assert set(store_cpu) == {path for path in measured if path.startswith("wsgate-redis")}
    assert all(0 < found["median"] < 100_000 for found in store_cpu.values()), store_cpu
    for path, per_conn in medians("idle_memory", proxies).items():
        assert 0 <= per_conn < 1 << 20, (path, per_conn)
    for path, held in medians("max_conns", measured).items():
        assert held == SMOKE_BOUND, (path, held)
    if "haproxy" in measured:
        assert "## Ratios against HAProxy, same run" in markdown
        assert "wsgate-memory" in figures["relay_64_10"]["ratio_vs_haproxy"]
    # The workers figure runs where the machine lets a process be held to a CPU budget.
    workers = data["workers"]
    assert workers["status"] == "ok" or workers["status"].startswith("skipped"), workers
    if workers["status"] == "ok" and find_redis_server():
        for count in ("1", "2"):
            assert 100 < workers["workers"][count]["rate"]["median"] < 10_000_000, workers
            # The far side of the budget: the kernel's own CPU accounting of the workers.
            budget = workers["budget_cpus_per_worker"] * int(count)
            assert 0 < workers["workers"][count]["cpus_used"]["median"] < 1.5 * budget, workers
        assert "ratio_vs_one" in workers["workers"]["2"], workers


@pytest.mark.bench
@pytest.mark.slow
def test_the_asyncio_floor_runs_when_named_and_sets_up_every_upgrade(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = _run_smoke(out, "--paths", "asyncio-floor", "--figures", "setup")
    assert done.returncode == 0, done.stdout[-4000:]
    data = json.loads((out / "latest.json").read_text())
    assert data["paths"]["asyncio-floor"].startswith("ok"), data["paths"]
    setup = data["figures"]["setup"]["paths"]["asyncio-floor"]
    assert setup["median"] > 0
    assert "asyncio-floor: set-up" in done.stdout and "(0 failed)" in done.stdout, done.stdout
    assert not [n for n in data["notes"] if "failed" in n], data["notes"]
