"""``serve --workers N``: several processes on one port behave as one gateway."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter

from gwtools import close_all, open_many

from wsgate.testbed.processes import ProcessGroup, RedisServer, wait_for_port, wsgate_argv
from wsgate.testbed.topology import free_port_run, http_json, start_backends, start_gateway


async def test_two_workers_share_the_port_and_the_caps(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2, tripwire=2)
    gateway = start_gateway(
        procs,
        backends,
        flags=["--workers", "2"],
        admin_port=free_port_run(2),
        state={"store": redis_server.url, "namespace": "workers"},
        limits={"max_connections_per_backend": 2},
    )
    # Both workers answer on their own admin ports, as replicas of their own.
    for index in (0, 1):
        wait_for_port("127.0.0.1", gateway.admin_port + index)
    ids = {
        http_json(f"http://127.0.0.1:{gateway.admin_port + i}/clusters")["replica"] for i in (0, 1)
    }
    assert len(ids) == 2 and all(replica.endswith(("-w0", "-w1")) for replica in ids)
    outcome = await open_many(gateway.ws_url, 40, local_ips=[f"127.0.0.{i}" for i in range(2, 10)])
    try:
        assert outcome.statuses == Counter({101: 4, 503: 36})
        stats = [b.stats() for b in backends]
        assert [s["active_connections"] for s in stats] == [2, 2]
        assert (
            max(s["peak_connections"] for s in stats) == 2 and sum(s["refused"] for s in stats) == 0
        )
        # The kernel spread the connections over both workers' sockets.
        accepted = [
            http_json(f"http://127.0.0.1:{gateway.admin_port + i}/snapshot")["totals"][
                "accepted_total"
            ]
            for i in (0, 1)
        ]
        # (>= 40: the start-up probe of the port was accepted too.)
        assert sum(accepted) >= 40 and min(accepted) > 0, accepted
    finally:
        await close_all(outcome.open)
    # SIGTERM to the supervisor drains and stops every worker.
    gateway.process.popen.send_signal(signal.SIGTERM)
    assert gateway.process.popen.wait(20) == 0
    assert _processes_running(gateway.config_path) == []


def _processes_running(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return found.stdout.split()


def test_workers_need_a_shared_state() -> None:
    result = subprocess.run(
        wsgate_argv("serve", "--workers", "2", "--backend", "127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "needs a shared state" in result.stderr and "Traceback" not in result.stderr
