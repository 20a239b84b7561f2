"""Fixtures shared by the whole suite: real processes on loopback, stopped even on failure."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from wsgate.testbed.processes import ProcessGroup, RedisServer, find_redis_server


def pytest_configure(config: pytest.Config) -> None:
    # A suite started in the background by a script (`make test &`) inherits SIGINT
    # ignored, and so would every command it starts: the tests that stop a
    # `--watch` command as Ctrl-C does would find it deaf. A handler of our own
    # here is reset to the default in each child, as a terminal's would be.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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
