"""`python -m bench.cost`: instruction counts, or where the CPU time goes, per unit of work."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench.cost import perf_counts_instructions

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("perf") is None or not perf_counts_instructions(),
    reason="perf cannot count instructions here",
)
@pytest.mark.parametrize("work", ["relay", "setup"])
def test_cost_counts_instructions_per_unit_of_work(work: str) -> None:
    argv = [sys.executable, "-m", "bench.cost", "--work", work, "--paths", "wsgate-memory"]
    argv += ["--rounds", "1", "--seconds", "0.3"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    row = re.search(
        r"^\| wsgate-memory \| ([\d.,]+)k \| ([\d.,]+)k \| ([\d.,]+) µs \|$", done.stdout, re.M
    )
    assert row is not None, done.stdout
    user, kernel, cpu_us = (float(value.replace(",", "")) for value in row.groups())
    # Every unit makes system calls (reads and writes at least: thousands of kernel
    # instructions) and some user-space work (Python's for an upgrade, the C relay's
    # few hundred instructions for a round trip).
    assert user > 0.1 and kernel > 1 and cpu_us > 0, row.group(0)


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("perf") is None, reason="perf is not installed")
def test_cost_by_clock_says_where_an_upgrades_time_goes() -> None:
    argv = [sys.executable, "-m", "bench.cost", "--work", "setup", "--paths", "wsgate-memory"]
    argv += ["--rounds", "1", "--seconds", "0.5", "--by", "clock"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = dict(re.findall(r"^\| ([^|]+?) \| ([\d.,]+) \|$", done.stdout, re.M))
    spent = {label: float(value.replace(",", "")) for label, value in rows.items()}
    # The gateway's own code runs per upgrade, and it dials every backend itself:
    # connect(2) is on the list, with what the kernel spent in it.
    assert spent["user space"] > 0 and spent["kernel: connect"] > 0, done.stdout
    # The split shares out the CPU time /proc counted, to the rounding of its rows.
    parts = spent["user space"] + spent["kernel"]
    assert abs(parts - spent["CPU (from /proc)"]) <= 0.2, done.stdout
    # The tracepoints' count: the gateway dials each backend once, with one socket and
    # one connect per upgrade (the driver's upgrades all succeed: one of each, to the
    # rounding of a short round). The listener accepts until accept4 says EAGAIN, so
    # each wake-up ends with one call that takes nothing: how many connections a
    # wake-up finds waiting depends on the machine's speed, between one and all 50.
    calls = done.stdout.split("system calls per upgrade", 1)[1]
    counted = dict(re.findall(r"^\| (\w+) \| ([\d.,]+) \|$", calls, re.M))
    assert 0.9 <= float(counted["socket"]) <= 1.1, calls
    assert 0.9 <= float(counted["connect"]) <= 1.1, calls
    assert 0.9 <= float(counted["accept4"]) <= 2.1, calls
    assert float(counted["all"]) > float(counted["accept4"]) + float(counted["connect"]), calls


def test_cost_refuses_direct_in_one_line() -> None:
    argv = [sys.executable, "-m", "bench.cost", "--paths", "direct"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "python -m bench.cost: error: direct has no proxy to count"


@pytest.mark.bench
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="valgrind is not installed")
def test_cost_by_callgrind_counts_user_instructions_beside_haproxys() -> None:
    argv = [sys.executable, "-m", "bench.cost", "--work", "setup"]
    argv += ["--paths", "wsgate-memory,haproxy", "--rounds", "1", "--seconds", "1"]
    argv += ["--by", "callgrind"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {
        path: (float(count.replace(",", "")) * 1e3, float(ratio))
        for path, count, ratio in re.findall(
            r"^\| (wsgate-memory|haproxy) \| ([\d.,]+)k \| ([\d.]+)x \| — \|$", done.stdout, re.M
        )
    }
    assert set(rows) == {"wsgate-memory", "haproxy"}, done.stdout
    (ours, ratio), (haproxys, one) = rows["wsgate-memory"], rows["haproxy"]
    # An upgrade is thousands of instructions in any proxy (a head read, a head
    # written, a connect), and the ratio is what the two counts say.
    assert ours > 5_000 and haproxys > 5_000, done.stdout
    assert one == 1.0 and abs(ratio - haproxys / ours) < 0.01, done.stdout
