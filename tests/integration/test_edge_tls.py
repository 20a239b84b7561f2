"""TLS on the listener: verified by real clients, rotated under live sessions, refused pairs.

The certificates come from a CA the test makes; clients verify against it, as a
browser verifies against its trust store. Which certificate a handshake got is
told by its serial number, read on the client side.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl

import pytest
from edgetools import client_context, metric, peer_serial, secret_volume, swap_secret
from gwtools import close_all, open_many, open_one, pod_of, wait_until
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from wsgate.testbed.certs import TestCA
from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import GatewayProcess, start_backends, start_gateway

pytestmark = pytest.mark.slow

SESSIONS = 50
SOURCES = [f"127.0.0.{2 + i}" for i in range(5)]


def wss_url(gateway: GatewayProcess) -> str:
    return f"wss://localhost:{gateway.port}/"


def serial_of(ws: ClientConnection) -> int:
    return peer_serial(ws.transport.get_extra_info("ssl_object"))


PROBES: list[int] = []


async def new_serial(gateway: GatewayProcess, ca: TestCA) -> int:
    """The serial a new handshake gets (each probe is one session at the backend)."""
    ws = await open_one(wss_url(gateway), ssl=client_context(ca))
    PROBES.append(1)
    try:
        return serial_of(ws)
    finally:
        await ws.close()


async def test_a_verifying_client_gets_the_certificate_and_the_backend(
    procs: ProcessGroup,
) -> None:
    ca = TestCA()
    pair = ca.issue(procs.log_dir / "tls")
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, tls={"cert": str(pair.cert), "key": str(pair.key)})
    ws = await open_one(wss_url(gateway), ssl=client_context(ca))
    assert serial_of(ws) == pair.serial
    assert ws.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    assert await pod_of(ws) == "pod-a"
    await ws.send(b"\x00" * 100_000)  # a message many TLS records long comes back whole
    assert await ws.recv() == b"\x00" * 100_000
    await ws.close()
    # A client that trusts another CA refuses the gateway: verification is real.
    with pytest.raises(ssl.SSLCertVerificationError):
        await open_one(wss_url(gateway), ssl=client_context(TestCA("another CA")))
    assert backends[0].stats()["total_connections"] == 1
    assert metric(gateway, "wsgate_tls_handshakes_total") == 1
    # That client gave up in the middle of the handshake (a port probe before it did not count).
    assert metric(gateway, "wsgate_tls_handshake_failures_total", reason="closed") == 1
    expiry = metric(gateway, "wsgate_tls_certificate_expiry_seconds")
    assert expiry > 0


async def test_rotation_under_50_live_sessions_drops_none(procs: ProcessGroup) -> None:
    ca = TestCA()
    first, second = ca.issue(procs.log_dir / "a"), ca.issue(procs.log_dir / "b")
    volume = procs.log_dir / "secret"
    cert, key = secret_volume(volume, first)
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        tls={"cert": str(cert), "key": str(key)},
        limits={"max_connections_per_backend": SESSIONS + 10},
    )
    PROBES.clear()
    live = await open_many(wss_url(gateway), SESSIONS, local_ips=SOURCES, ssl=client_context(ca))
    assert live.statuses[101] == SESSIONS
    assert {serial_of(ws) for ws in live.open} == {first.serial}

    swap_secret(volume, second.cert.read_bytes(), second.key.read_bytes(), "..second")
    deadline = asyncio.get_running_loop().time() + 10
    while await new_serial(gateway, ca) != second.serial:
        assert asyncio.get_running_loop().time() < deadline, "the new pair was never served"
        await asyncio.sleep(0.2)
    # Every session set up before goes on, on the certificate it began with.
    answers = await asyncio.gather(*(pod_of(ws) for ws in live.open))
    assert answers == ["pod-a"] * SESSIONS
    assert {serial_of(ws) for ws in live.open} == {first.serial}
    assert backends[0].stats()["active_connections"] == SESSIONS
    assert metric(gateway, "wsgate_tls_reloads_total") == 1

    # A pair whose halves do not match is refused; the good one goes on serving.
    third, other = ca.issue(procs.log_dir / "c"), ca.issue(procs.log_dir / "d")
    swap_secret(volume, third.cert.read_bytes(), other.key.read_bytes(), "..broken")
    await wait_until(lambda: metric(gateway, "wsgate_tls_reload_failures_total") == 1, within=10)
    assert await new_serial(gateway, ca) == second.serial
    refusals = [line for line in gateway.process.output().splitlines() if "refused" in line]
    assert len(refusals) == 1 and "does not match" in refusals[0], refusals
    await asyncio.sleep(2.5)  # more checks of the same bad files: not tried, not logged again
    refusals = [line for line in gateway.process.output().splitlines() if "refused" in line]
    assert len(refusals) == 1
    answers = await asyncio.gather(*(pod_of(ws) for ws in live.open))
    assert answers == ["pod-a"] * SESSIONS
    await close_all(live.open)
    await wait_until(lambda: backends[0].stats()["active_connections"] == 0)
    assert backends[0].stats()["total_connections"] == SESSIONS + len(PROBES)


async def test_files_rewritten_in_place_and_sighup(procs: ProcessGroup) -> None:
    ca = TestCA()
    first, second = ca.issue(procs.log_dir / "a"), ca.issue(procs.log_dir / "b")
    cert, key = procs.log_dir / "tls.crt", procs.log_dir / "tls.key"
    cert.write_bytes(first.cert.read_bytes())
    key.write_bytes(first.key.read_bytes())
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, tls={"cert": str(cert), "key": str(key)})
    assert await new_serial(gateway, ca) == first.serial
    cert.write_bytes(second.cert.read_bytes())
    key.write_bytes(second.key.read_bytes())
    os.kill(gateway.process.pid, signal.SIGHUP)
    # Whichever saw the change first (the signal, or the watch of the files) loaded it.
    await wait_until(lambda: "now serving" in gateway.process.output(), within=10)
    assert await new_serial(gateway, ca) == second.serial
    os.kill(gateway.process.pid, signal.SIGHUP)
    await wait_until(lambda: "tls reload (SIGHUP): unchanged" in gateway.process.output())
    assert await new_serial(gateway, ca) == second.serial
    assert metric(gateway, "wsgate_tls_reloads_total") == 1


async def test_a_tls_session_gives_its_slot_back_once_it_ends(procs: ProcessGroup) -> None:
    """Sessions relayed on the event loop free their slot when the backend's socket is
    closed: at a cap of one, session after session gets in; the backend never holds two."""
    ca = TestCA()
    pair = ca.issue(procs.log_dir / "tls")
    [backend] = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        [backend],
        tls={"cert": str(pair.cert), "key": str(pair.key)},
        limits={"max_connections_per_backend": 1},
    )
    for _ in range(3):
        ws = await open_one(wss_url(gateway), ssl=client_context(ca))
        await ws.close()
        await wait_until(lambda: backend.stats()["active_connections"] == 0, within=10)
        # The slot comes back a moment after the backend saw the close: retry briefly.
        for _attempt in range(50):
            try:
                ws = await open_one(wss_url(gateway), ssl=client_context(ca))
            except InvalidStatus:  # 503 while the release is on its way
                await asyncio.sleep(0.1)
            else:
                await ws.close()
                break
        else:
            pytest.fail("the slot of a finished TLS session never came back")
    stats = backend.stats()
    assert stats["peak_connections"] == 1, stats
