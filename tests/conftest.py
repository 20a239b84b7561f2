"""Fixtures shared by the whole suite: real processes on loopback, stopped even on failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from wsgate.testbed.processes import ProcessGroup, RedisServer, find_redis_server


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessGroup]:
    """A process group whose members are stopped after the test; logs shown on failure."""
    group = ProcessGroup(tmp_path / "logs")
    try:
        yield group
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for process in group.processes:
                print(f"----- {process.name} -----\n{process.output()[-4000:]}")
        group.stop_all()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def redis_server(procs: ProcessGroup) -> RedisServer:
    """A private redis-server for one test (skips only where none can be found)."""
    if find_redis_server() is None:
        pytest.skip("redis-server is not installed; ./scripts/setup.sh installs it")
    return RedisServer(procs).start()
