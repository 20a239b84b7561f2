"""One load process holds 10,000 idle WebSocket sessions, and the demo backend holds them too."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from wsgate.testbed.processes import ProcessGroup, wsgate_argv
from wsgate.testbed.topology import start_backends

SESSIONS = 10_000


@pytest.mark.slow
def test_ten_thousand_idle_sessions_from_one_process(procs: ProcessGroup, tmp_path: Path) -> None:
    (backend,) = start_backends(procs, 1, extra=["--log-level", "warning"])
    report_path = tmp_path / "report.json"
    load = procs.start(
        "load",
        wsgate_argv(
            "load", f"ws://{backend.address}/ws", "--connections", str(SESSIONS),
            "--message-interval", "off", "--view", "plain", "--report-json", str(report_path),
        ),
    )  # fmt: skip
    deadline = time.monotonic() + 45
    while backend.stats()["active_connections"] < SESSIONS:
        assert load.popen.poll() is None, load.output()
        assert time.monotonic() < deadline, backend.stats()
        time.sleep(0.5)
    load.signal(signal.SIGINT)
    assert load.popen.wait(45) == 0, load.output()[-2000:]
    report = json.loads(report_path.read_text())
    truth = backend.stats()
    assert truth["peak_connections"] == SESSIONS
    assert truth["total_connections"] == SESSIONS
    assert truth["active_connections"] == 0
    assert report["connections"]["established"] == SESSIONS
    assert report["connections"]["peak_open"] == SESSIONS
    assert report["connections"]["failed"] == {}
    assert report["by_backend"] == {"pod-a": SESSIONS}
    assert report["messages"]["sent"] == report["messages"]["received"] == truth["messages"]
