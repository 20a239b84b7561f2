"""The test bed's ports: each one asked for is a port of its own."""

from __future__ import annotations

import socket

from wsgate.testbed.processes import free_port


def test_ports_asked_for_one_after_the_other_are_all_different_and_bindable() -> None:
    # The kernel often chooses a port again once its probe is closed: among a few
    # hundred probes in a row some repeat, and two of a gateway's ports were once one.
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    held = []
    try:
        for port in ports[-20:]:  # and each was free: all can be bound at once
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", port))
    finally:
        for sock in held:
            sock.close()
