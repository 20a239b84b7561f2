"""``python -m bench.storm --smoke``: the storm figure's harness still measures what it says."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench.storm import reconnect_rate

from wsgate.testbed.processes import find_redis_server


def test_the_reconnect_rate_leaves_out_the_wait_before_the_first_return() -> None:
    timeline = [{"t": t / 10, "open": n} for t, n in enumerate([4, 4, 2, 2, 2, 2, 3, 4, 4])]
    storm = {"sessions": 4, "dropped_at_s": 0.15, "recovered_at_s": 0.7}
    # 2 sessions back between 0.6 s (the first) and 0.7 s (the last).
    assert reconnect_rate(timeline, storm) == 20.0
    assert reconnect_rate(timeline, {**storm, "recovered_at_s": None}) is None


@pytest.mark.bench
@pytest.mark.slow
def test_the_storm_smoke_run_recovers_within_the_caps(tmp_path: Path) -> None:
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    paths = (
        "wsgate,haproxy"
        if shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()
        else "wsgate"
    )
    done = subprocess.run(
        [sys.executable, "-m", "bench.storm", "--smoke", "--paths", paths, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    document = json.loads((tmp_path / "latest.json").read_text())
    wsgate = document["results"]["wsgate"]
    assert wsgate["outcome"] == "recovered", wsgate
    assert 0 < wsgate["lost"] < wsgate["sessions"] == 200
    assert wsgate["backend_peak"] <= wsgate["cap"] and wsgate["backend_refused"] == 0
    # The survivor refused the dead replica's clients until its lease lapsed, with Retry-After.
    assert wsgate["rejected_by_status"].get("503", 0) > 0 and wsgate["retry_after_s"]
    assert wsgate["recovery_at_backends_s"] is not None and wsgate["reconnect_rate_per_s"] > 0
    for result in document["results"].values():
        assert 0 < result["recovery_s"] < 60, result
    markdown = (tmp_path / "latest.md").read_text()
    assert "| until all back, load's clock (s) |" in markdown
    assert document["command"].startswith("python -m bench.storm --smoke")
