"""Helpers for tests of the gateway's life cycle: reload, drain, discovery, rebalancing."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from gwtools import wait_until
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from wsgate.testbed.processes import ProcessGroup, free_port, wait_for_port, wsgate_argv
from wsgate.testbed.topology import GatewayProcess

__all__ = [
    "close_seen",
    "exited",
    "logged",
    "ready_status",
    "rewrite",
    "start_discovering",
    "started",
    "write",
]


def start_discovering(
    group: ProcessGroup,
    discovery: dict[str, Any],
    *,
    name: str = "gateway",
    flags: list[str] | None = None,
    **config: Any,
) -> GatewayProcess:
    """``wsgate serve`` whose backends come from discovery (``{"file": ...}``, ``{"dns": ...}``),
    started as ``start_gateway`` starts one, admin API included."""
    port = free_port()
    admin_port = free_port()
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port}",
        "backends": discovery,
        "health": {"interval": "200ms", "timeout": "500ms"},
    }
    data.update(config)
    path = group.log_dir / f"{name}.yaml"
    write(path, yaml.safe_dump(data))
    argv = wsgate_argv("serve", "-c", str(path), *(flags or []))
    process = group.start(name, argv, port=("127.0.0.1", port))
    return started(GatewayProcess(name, port, admin_port, process, data, str(path)))


def started(gateway: GatewayProcess) -> GatewayProcess:
    """The gateway once its admin API listens too."""
    wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    return gateway


def write(path: str | Path, content: str) -> None:
    Path(path).write_text(content)


def rewrite(gateway: GatewayProcess, **changes: Any) -> None:
    """Write the gateway's config file again with ``changes`` on top."""
    data = dict(gateway.config)
    data.update(changes)
    write(gateway.config_path, yaml.safe_dump(data))


async def logged(gateway: GatewayProcess, text: str, times: int = 1, within: float = 5) -> None:
    await wait_until(lambda: gateway.process.output().count(text) >= times, within=within)


def ready_status(gateway: GatewayProcess) -> int:
    try:
        with urllib.request.urlopen(gateway.admin_url + "/ready", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


async def close_seen(
    ws: ClientConnection, within: float = 20
) -> tuple[float, int | None, str | None]:
    """Read until the server closes; return (when, its close code, its reason)."""
    try:
        async with asyncio.timeout(within):
            while True:
                await ws.recv()
    except ConnectionClosed:
        pass
    received = ws.protocol.close_rcvd
    if received is None:
        return time.monotonic(), None, None
    return time.monotonic(), received.code, received.reason


async def exited(gateway: GatewayProcess, within: float) -> tuple[float, int]:
    """Wait for the gateway process to exit; return (when, its exit code)."""
    deadline = time.monotonic() + within
    while gateway.process.popen.poll() is None:
        assert time.monotonic() < deadline, "the gateway did not exit in time"
        await asyncio.sleep(0.02)
    return time.monotonic(), gateway.process.popen.returncode
