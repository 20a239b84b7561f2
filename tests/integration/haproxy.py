"""A real HAProxy (Debian's package) in front of a gateway, for the edge tests."""

from __future__ import annotations

import os
import shutil

import pytest

from wsgate.testbed.processes import Process, ProcessGroup, free_port

__all__ = ["HAPROXY", "start_haproxy"]

HAPROXY = "/usr/sbin/haproxy"


def _binary() -> str:
    if os.access(HAPROXY, os.X_OK):
        return HAPROXY
    found = shutil.which("haproxy")
    if found is None:
        pytest.skip("haproxy is not installed; ./scripts/setup.sh installs it")
    return found


def start_haproxy(
    group: ProcessGroup, gateway_port: int, *, mode: str, server_options: str = ""
) -> tuple[int, Process]:
    """HAProxy on 127.0.0.1 in ``mode`` (tcp or http), its one server the gateway.

    It connects to the gateway from 127.0.0.1, the one address the tests trust.
    """
    port = free_port()
    http_only = "    option forwardfor\n" if mode == "http" else ""
    config = f"""\
global
    nbthread 1

defaults
    mode {mode}
    timeout connect 5s
    timeout client 1m
    timeout server 1m
    timeout tunnel 1m
    timeout http-request 10s

frontend edge
    bind 127.0.0.1:{port}
    default_backend gateway

backend gateway
{http_only}    server gw 127.0.0.1:{gateway_port} source 127.0.0.1 {server_options}
"""
    path = group.log_dir / f"haproxy-{mode}.cfg"
    path.write_text(config)
    process = group.start(
        f"haproxy-{mode}", [_binary(), "-db", "-f", str(path)], port=("127.0.0.1", port)
    )
    return port, process
