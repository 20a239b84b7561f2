"""Hot reload: SIGHUP and --watch-config apply a new config without dropping a connection.

A lowered cap applies to new connections only (the live ones stay, counted at
the backend); a broken file changes nothing and the log says why; keys that
need a restart keep their running values.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from gwtools import close_all, open_many, wait_until
from lifecycle import logged, rewrite, started, write

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway


@pytest.mark.slow
async def test_sighup_lowers_a_cap_for_new_connections_only(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    backend = backends[0]
    gateway = started(start_gateway(procs, backends, limits={"max_connections_per_backend": 4}))
    live = (await open_many(gateway.ws_url, 4)).open
    try:
        assert len(live) == 4
        rewrite(gateway, limits={"max_connections_per_backend": 2})
        gateway.process.signal(signal.SIGHUP)
        await logged(gateway, "config reloaded: limits")
        assert gateway.admin("/config_dump")["limits"]["max_connections_per_backend"] == 2

        # The 4 live sessions stay open and keep talking; nobody new gets in.
        await asyncio.sleep(0.5)
        assert backend.stats()["active_connections"] == 4
        for ws in live:
            await ws.send("still here?")
            assert "still here?" in await ws.recv()
        refused = await open_many(gateway.ws_url, 1)
        assert refused.statuses[503] == 1

        await close_all(live[:3])
        await wait_until(lambda: backend.stats()["active_connections"] == 1)
        again = await open_many(gateway.ws_url, 2)
        assert again.statuses[101] == 1 and again.statuses[503] == 1
        assert backend.stats()["active_connections"] == 2
        await close_all(again.open)
    finally:
        await close_all(live)
    assert "gateway_stopped" not in gateway.process.output()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("limits: {max_connections_per_backend: 1\n", "is not valid YAML"),
        ("limits: {max_connections_per_backend: 0}\n", "limits.max_connections_per_backend"),
        ("balance: fastest\n", "balance"),
    ],
)
async def test_sighup_with_a_broken_file_changes_nothing(
    procs: ProcessGroup, content: str, why: str
) -> None:
    backends = start_backends(procs, 1)
    gateway = started(start_gateway(procs, backends, limits={"max_connections_per_backend": 3}))
    before = gateway.admin("/config_dump")
    write(gateway.config_path, content)
    gateway.process.signal(signal.SIGHUP)
    await logged(gateway, "config reload (SIGHUP) refused, the running config stays")
    line = next(
        line for line in gateway.process.output().splitlines() if "reload (SIGHUP) refused" in line
    )
    assert why in line
    assert gateway.admin("/config_dump") == before
    # The old cap is still the one enforced.
    outcomes = await open_many(gateway.ws_url, 4)
    try:
        assert outcomes.statuses[101] == 3 and outcomes.statuses[503] == 1
    finally:
        await close_all(outcomes.open)


@pytest.mark.slow
async def test_watch_config_applies_changes_and_refuses_restart_keys(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 2)
    gateway = started(
        start_gateway(
            procs,
            backends[:1],
            flags=["--watch-config"],
            limits={"max_connections_per_backend": 1},
            health={"interval": "100ms", "timeout": "500ms", "healthy_threshold": 2},
        )
    )
    live = (await open_many(gateway.ws_url, 1)).open
    try:
        rewrite(
            gateway,
            listen="127.0.0.1:1",
            balance="round_robin",
            backends=[{"address": b.address, "id": b.pod_id} for b in backends],
        )
        await logged(gateway, "config reloaded:")
        output = gateway.process.output()
        assert "listen cannot change while running (restart to apply)" in output
        dump = gateway.admin("/config_dump")
        assert dump["listen"] == f"127.0.0.1:{gateway.port}"
        assert dump["balance"] == "round_robin"
        # The new backend gets connections once its health checks pass.
        await wait_until(
            lambda: any(
                b["id"] == "pod-b" and b["healthy"] for b in gateway.admin("/clusters")["backends"]
            )
        )
        more = await open_many(gateway.ws_url, 2)
        assert more.statuses[101] == 1 and more.statuses[503] == 1
        assert [b.stats()["active_connections"] for b in backends] == [1, 1]
        await close_all(more.open)
    finally:
        await close_all(live)
