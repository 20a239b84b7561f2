"""A local topology of demo backends and gateways, as real processes.

Tests, ``wsgate demo`` and the benchmark all build their setups from these
pieces, so that each starts backends and gateways the same way.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import urllib.request
from dataclasses import dataclass
from typing import Any

import yaml

from wsgate.testbed.processes import Process, ProcessGroup, free_port, wait_for_port, wsgate_argv

__all__ = [
    "BackendProcess",
    "GatewayProcess",
    "free_port_run",
    "http_json",
    "start_backends",
    "start_gateway",
]


def http_json(
    url: str, *, method: str = "GET", timeout: float = 5.0, token: str | None = None
) -> Any:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class BackendProcess:
    pod_id: str
    host: str
    port: int
    process: Process

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        """The backend's own count of what it served: the truth tests assert on."""
        data: dict[str, Any] = http_json(f"http://{self.address}/stats")
        return data

    def reset(self) -> None:
        http_json(f"http://{self.address}/stats/reset", method="POST")

    def set_health(self, ok: bool) -> None:
        """Make the backend's /health answer 200 (ok) or 503 (failing)."""
        url = f"http://{self.address}/health/{'ok' if ok else 'fail'}"
        with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5):
            pass


@dataclass
class GatewayProcess:
    name: str
    port: int
    admin_port: int
    process: Process
    config: dict[str, Any]
    config_path: str

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def admin(self, path: str, token: str | None = None) -> Any:
        return http_json(self.admin_url + path, token=token)


def free_port_run(count: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """The first of ``count`` consecutive free ports (``serve --workers`` admin ports).

    The run is picked below the kernel's ephemeral range: ports in that range
    are where outgoing connections leave TIME_WAIT behind (thousands of them
    after a load test), and a listener cannot bind over those.
    """
    ephemeral_start = _ephemeral_range_start()
    lowest = min(20_000, ephemeral_start // 2)
    for _ in range(tries):
        first = random.randrange(lowest, ephemeral_start - count)
        try:
            with contextlib.ExitStack() as held:
                for offset in range(count):
                    sock = held.enter_context(socket.socket())
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listeners do
                    sock.bind((host, first + offset))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports on {host}")


def _ephemeral_range_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def start_backends(
    group: ProcessGroup,
    count: int,
    *,
    tripwire: int | None = None,
    prefix: str = "pod",
    extra: list[str] | None = None,
) -> list[BackendProcess]:
    backends = []
    for index in range(count):
        pod_id = f"{prefix}-{chr(ord('a') + index)}" if count <= 26 else f"{prefix}-{index}"
        port = free_port()
        argv = wsgate_argv("backend", "--port", str(port), "--pod-id", pod_id, *(extra or []))
        if tripwire is not None:
            argv += ["--max-connections", str(tripwire)]
        process = group.start(pod_id, argv, port=("127.0.0.1", port))
        backends.append(BackendProcess(pod_id, "127.0.0.1", port, process))
    return backends


def start_gateway(
    group: ProcessGroup,
    backends: list[BackendProcess] | list[dict[str, Any]],
    *,
    name: str = "gateway",
    flags: list[str] | None = None,
    admin_port: int | None = None,
    prefix: list[str] | None = None,
    **config: Any,
) -> GatewayProcess:
    """Start ``wsgate serve`` with backends named by their pod ids and ``config`` on top.

    A backend may also be a config entry (``{"address": ..., "id": ...}``) with
    no process behind it. ``prefix`` goes before the command
    (``["prlimit", "--nofile=80:80"]``, say).
    """
    port = free_port()
    admin_port = admin_port or free_port()
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port}",
        "backends": [
            b if isinstance(b, dict) else {"address": b.address, "id": b.pod_id} for b in backends
        ],
        "health": {"interval": "200ms", "timeout": "500ms"},
    }
    data.update(config)
    path = group.log_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    argv = [*(prefix or []), *wsgate_argv("serve", "-c", str(path), *(flags or []))]
    process = group.start(name, argv, port=("127.0.0.1", port))
    if data.get("admin"):  # the admin API starts just after the listener
        wait_for_port("127.0.0.1", admin_port, process=process)
    return GatewayProcess(name, port, admin_port, process, data, str(path))
