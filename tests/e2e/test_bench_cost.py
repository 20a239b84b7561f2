"""`python -m bench.cost`: instruction counts per unit of work, from perf, for a proxy."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _perf_counts_instructions() -> bool:
    if shutil.which("perf") is None:
        return False
    probe = subprocess.run(
        ["perf", "stat", "-x,", "-e", "instructions:u", "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0 and "<not supported>" not in probe.stderr


@pytest.mark.slow
@pytest.mark.skipif(not _perf_counts_instructions(), reason="perf cannot count instructions here")
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


def test_cost_refuses_direct_in_one_line() -> None:
    argv = [sys.executable, "-m", "bench.cost", "--paths", "direct"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "python -m bench.cost: error: direct has no proxy to count"
