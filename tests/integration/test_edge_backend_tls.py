"""TLS toward backends: verified by default, per pool or per backend.

A real HAProxy terminates TLS in front of a demo backend with a certificate
from a CA the test makes; the gateway connects to it over TLS, for sessions and
for its health checks, and refuses it when the CA does not match.
"""

from __future__ import annotations

import pytest
from gwtools import open_many, open_one, pod_of, wait_until
from haproxy import _binary

from wsgate.testbed.certs import TestCA
from wsgate.testbed.processes import ProcessGroup, free_port
from wsgate.testbed.topology import BackendProcess, start_backends, start_gateway

pytestmark = pytest.mark.slow


def tls_in_front(procs: ProcessGroup, backend: BackendProcess, ca: TestCA) -> int:
    """HAProxy terminating TLS for ``backend``: the port a TLS client connects to."""
    pair = ca.issue(procs.log_dir / "backend-tls", hosts=("127.0.0.1",))
    combined = procs.log_dir / "backend-tls" / "combined.pem"
    combined.write_bytes(pair.cert.read_bytes() + pair.key.read_bytes())
    port = free_port()
    config = procs.log_dir / "backend-tls.cfg"
    config.write_text(
        f"""\
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m

frontend tls
    bind 127.0.0.1:{port} ssl crt {combined}
    default_backend pod

backend pod
    server pod {backend.address}
"""
    )
    procs.start("backend-tls", [_binary(), "-db", "-f", str(config)], port=("127.0.0.1", port))
    return port


async def test_sessions_and_health_checks_over_verified_tls(procs: ProcessGroup) -> None:
    ca = TestCA()
    [backend] = start_backends(procs, 1)
    port = tls_in_front(procs, backend, ca)
    ca_path = ca.write(procs.log_dir / "backend-ca.pem")
    wrong_ca = TestCA("another CA").write(procs.log_dir / "wrong-ca.pem")
    target = {"address": f"127.0.0.1:{port}", "id": "pod-a"}
    gateway = start_gateway(procs, [target], name="verifying", backend_tls={"ca": str(ca_path)})
    ws = await open_one(gateway.ws_url)
    assert await pod_of(ws) == "pod-a"
    await ws.close()
    assert backend.stats()["total_connections"] == 1

    # A backend's own tls wins over the pool's: here the wrong CA, so nothing reaches it.
    wrong = {**target, "tls": {"ca": str(wrong_ca)}}
    refusing = start_gateway(
        procs, [wrong], name="refusing", backend_tls={"ca": str(ca_path)},
        health={"enabled": False},
    )  # fmt: skip
    outcome = await open_many(refusing.ws_url, 1)
    assert outcome.statuses[502] == 1
    assert backend.stats()["total_connections"] == 1

    # Health checks go over TLS too, verified: the right CA keeps the backend healthy
    # through several rounds, the wrong one takes it out of rotation.
    checked = start_gateway(procs, [wrong], name="checked")
    await wait_until(lambda: not checked.admin("/clusters")["backends"][0]["healthy"], within=10)
    assert (await open_many(checked.ws_url, 1)).statuses[503] == 1
    assert gateway.admin("/clusters")["backends"][0]["healthy"]
    assert backend.stats()["total_connections"] == 1
