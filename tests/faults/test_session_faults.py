"""Faults around sessions: a backend lost, a client that stops reading, slow heads, many sessions.

One gateway with the embedded store; the backends' own counts are the truth.
Each scenario ends with every backend at zero and every slot free; the figures
(recovery times, descriptors and RSS before and after) are printed
(``pytest -m faults -s``).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time
from collections import Counter

import pytest
from faultkit import all_free, open_files, rss_kib, served_by_backends
from fleet import CLIENT_IPS, live, never_over
from gwtools import close_all, open_many, open_one, pod_of, raw_request, wait_until
from lifecycle import close_seen
from websockets.asyncio.client import ClientConnection

from wsgate.runtime import raise_open_files_limit
from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import GatewayProcess, start_backends, start_gateway
from wsgate.testbed.wsclient import parse_response_head
from wsgate.wire import Opcode, encode_frame, opening_request

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def echo_time(ws: ClientConnection, text: str = "ping") -> float:
    """How long the backend behind ``ws`` takes to answer one message."""
    started = time.monotonic()
    await ws.send(text)
    async with asyncio.timeout(5):
        await ws.recv()
    return time.monotonic() - started


async def test_a_backend_killed_with_sessions(procs: ProcessGroup) -> None:
    cap = 2
    backends = start_backends(procs, 3, tripwire=cap)
    gateway = start_gateway(
        procs, backends, limits={"max_connections_per_backend": cap},
        health={"interval": "200ms", "timeout": "300ms", "healthy_threshold": 2},
    )  # fmt: skip
    first = await open_many(gateway.ws_url, 3 * cap)
    assert first.statuses == Counter({101: 3 * cap})
    pods = [await pod_of(ws) for ws in first.open]
    victim = backends[1]
    on_victim = [ws for ws, pod in zip(first.open, pods, strict=True) if pod == victim.pod_id]
    assert len(on_victim) == cap

    victim.process.kill()
    killed = time.monotonic()
    closes = await asyncio.gather(*(close_seen(ws, within=10) for ws in on_victim))
    clients_told = max(when for when, _, _ in closes) - killed
    await wait_until(
        lambda: gateway.admin("/clusters")["backends"][1]["active_here"] == 0, within=5
    )
    slots_freed = time.monotonic() - killed
    # The others are full and the victim is gone: nothing more is admitted anywhere.
    meanwhile = await open_many(gateway.ws_url, 3)
    assert meanwhile.statuses[101] == 0, meanwhile.statuses
    assert [live(backends[:1]), live(backends[2:])] == [[cap], [cap]]

    victim.process = procs.start(
        victim.pod_id, victim.process.argv, port=("127.0.0.1", victim.port)
    )
    restarted = time.monotonic()
    back: list[ClientConnection] = []
    while not back and time.monotonic() - restarted < 10:
        back = (await open_many(gateway.ws_url, 1)).open
        await asyncio.sleep(0.05)
    served_again = time.monotonic() - restarted
    try:
        assert back and await pod_of(back[0]) == victim.pod_id
        never_over(backends, cap)
    finally:
        await close_all(first.open + back)
    freed = await all_free([gateway], backends)
    print(
        f"\nbackend SIGKILLed with {cap} sessions: its clients told in {clients_told:.2f}s, "
        f"its slots free in {slots_freed:.2f}s; restarted, a session on it "
        f"{served_again:.2f}s later; all free {freed:.2f}s after the last close"
    )
    # The survivors served exactly what they were given; the new victim one session.
    assert [b.stats()["total_connections"] for b in backends] == [cap, 1, cap]


def _stalled_upgrade(port: int) -> socket.socket:
    """A WebSocket session with a small receive buffer, upgraded by hand, non-blocking."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(opening_request(f"127.0.0.1:{port}", "/", key))
    answer = b""
    while parse_response_head(answer) is None:
        answer += sock.recv(4096)
    parsed = parse_response_head(answer)
    assert parsed is not None and parsed[0].status == 101, answer
    sock.setblocking(False)
    return sock


async def _send_until_stuck(sock: socket.socket, limit: int, quiet: float) -> int:
    """Send 256 KiB binary messages (the backend echoes them) until nothing more goes out."""
    frame = encode_frame(Opcode.BINARY, os.urandom(256 * 1024))
    sent, pending, last_progress = 0, memoryview(b""), time.monotonic()
    while sent < limit and time.monotonic() - last_progress < quiet:
        if not pending:
            pending = memoryview(frame)
        try:
            n = sock.send(pending)
        except BlockingIOError:
            await asyncio.sleep(0.02)
            continue
        pending, sent, last_progress = pending[n:], sent + n, time.monotonic()
    return sent


async def test_a_client_that_stops_reading_while_its_backend_sends(procs: ProcessGroup) -> None:
    cap = 1
    backends = start_backends(procs, 2, tripwire=cap)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": cap})
    bystander = await open_one(gateway.ws_url)
    bystander_pod = await pod_of(bystander)
    rss_before = rss_kib(gateway.process)
    sock = _stalled_upgrade(gateway.port)  # on the other backend: one slot each
    sender = asyncio.create_task(_send_until_stuck(sock, limit=256 << 20, quiet=1.0))
    latencies = []
    while not sender.done():  # the bystander is served all along
        latencies.append(await echo_time(bystander))
        await asyncio.sleep(0.1)
    sent = sender.result()
    rss_stalled = rss_kib(gateway.process)
    # Backpressure: the client could send only what the buffers on the way hold (the
    # kernel's, autotuned on loopback, and the backend's), and the gateway held none
    # of it: its relay keeps at most one read per direction.
    assert sent < 256 << 20, sent
    assert rss_stalled - rss_before < 8 * 1024, (rss_before, rss_stalled)

    # The client resets while bytes are still owed to its backend; sessions are
    # tried all the while the gateway winds the stalled one down.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    reset = time.monotonic()
    newcomers: list[ClientConnection] = []
    while not newcomers and time.monotonic() - reset < 10:
        newcomers = (await open_many(gateway.ws_url, 1)).open
        never_over(backends, cap)
        await asyncio.sleep(0.05)
    readmitted = time.monotonic() - reset
    try:
        assert newcomers, "the stalled session's slot never came back"
        assert await pod_of(newcomers[0]) != bystander_pod
        latencies.append(await echo_time(bystander))
    finally:
        await close_all([bystander, *newcomers])
    freed = await all_free([gateway], backends)
    print(
        f"\nclient stopped reading: it got {sent / 2**20:.1f} MiB out before it stalled; "
        f"gateway RSS {rss_before} -> {rss_stalled} KiB; bystander's echo worst "
        f"{max(latencies) * 1000:.0f} ms over {len(latencies)}; after its reset the slot was "
        f"taken again in {readmitted:.2f}s; all free {freed:.2f}s after the last close"
    )
    never_over(backends, cap)
    assert served_by_backends(backends)[0] == 3


async def _partial_head(
    gateway: GatewayProcess, index: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gateway.port, local_addr=(CLIENT_IPS[index % len(CLIENT_IPS)], 0)
    )
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    return reader, writer


async def _dribble(writers: list[asyncio.StreamWriter], until: float, stop: asyncio.Event) -> None:
    """One more byte of the header value on every connection, every half second.

    It stops a second before the gateway's header timeout: a byte arriving just as
    the gateway closes would make its kernel reset the connection, and the client's
    kernel could drop the 408 before it is read.
    """
    while not stop.is_set() and time.monotonic() < until:
        await asyncio.sleep(0.5)
        for writer in writers:
            if not writer.is_closing():
                writer.write(b"a")


async def test_a_thousand_partial_heads_while_a_good_client_is_served(
    procs: ProcessGroup,
) -> None:
    raise_open_files_limit()
    slow = 1000
    backends = start_backends(procs, 1, tripwire=2)
    gateway = start_gateway(
        procs, backends, timeouts={"header": "3s"}, limits={"max_connections_per_backend": 2}
    )
    request = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    # Before the baseline: the keep-alive pool then holds its idle backend connection.
    assert (await raw_request("127.0.0.1", gateway.port, request))[0] == 200
    fds_before, _ = await _settled(gateway)
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as background:
        started = time.monotonic()
        connections = await asyncio.gather(*(_partial_head(gateway, i) for i in range(slow)))
        writers = [writer for _, writer in connections]
        background.create_task(_dribble(writers, started + 2.0, stop))
        try:
            await wait_until(lambda: open_files(gateway.process) >= fds_before + slow, within=5)
            opened = time.monotonic() - started
            fds_during = open_files(gateway.process)
            good = time.monotonic()
            ws = await open_one(gateway.ws_url)
            await echo_time(ws, "good")
            ws_served = time.monotonic() - good
            good = time.monotonic()
            status, _, _ = await raw_request("127.0.0.1", gateway.port, request)
            http_served = time.monotonic() - good
            await ws.close()
            assert status == 200

            async def answer(reader: asyncio.StreamReader) -> bytes:
                async with asyncio.timeout(15):
                    return await reader.read()

            answers = await asyncio.gather(*(answer(reader) for reader, _ in connections))
        finally:
            stop.set()
            for _, writer in connections:
                writer.close()
    all_answered = time.monotonic() - started
    await wait_until(lambda: open_files(gateway.process) <= fds_before, within=5)
    fds_after, _ = await _settled(gateway)
    freed = await all_free([gateway], backends)
    print(
        f"\n{slow} partial heads opened in {opened:.2f}s; gateway fds {fds_before} -> "
        f"{fds_during} -> {fds_after}; meanwhile a WebSocket session served in "
        f"{ws_served * 1000:.0f} ms and an HTTP request in {http_served * 1000:.0f} ms; all "
        f"{slow} answered 408 {all_answered:.2f}s after the first connect (header timeout 3s)"
    )
    assert Counter(a.split(b" ", 2)[1] for a in answers) == {b"408": slow}
    stats = backends[0].stats()
    # Only the good client's session and requests reached the backend.
    assert (stats["total_connections"], stats["http_requests"]) == (1, 2)
    assert freed < 1.0


async def _wave(gateway: GatewayProcess, size: int) -> None:
    outcome = await open_many(gateway.ws_url, size, local_ips=CLIENT_IPS)
    try:
        assert outcome.statuses == Counter({101: size}), outcome.statuses
        await asyncio.gather(*(echo_time(ws, f"wave {i}") for i, ws in enumerate(outcome.open)))
    finally:
        await close_all(outcome.open)


async def _settled(gateway: GatewayProcess) -> tuple[int, int]:
    """The gateway's descriptors and RSS (KiB) once nothing is open: the least of a few reads."""
    samples = []
    for _ in range(5):
        await asyncio.sleep(0.2)
        samples.append((open_files(gateway.process), rss_kib(gateway.process)))
    return min(s[0] for s in samples), min(s[1] for s in samples)


async def test_sessions_in_waves_leave_descriptors_and_memory_as_they_were(
    procs: ProcessGroup,
) -> None:
    raise_open_files_limit()
    # Enough sessions that a leak of a kilobyte each stands well above what the
    # allocator's arenas move RSS by (up to about 1.5 MiB between two runs here).
    cap, wave, waves = 200, 500, 12
    backends = start_backends(procs, 4, tripwire=cap)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": cap})
    await _wave(gateway, wave)  # the first wave grows the pools a wave needs
    await all_free([gateway], backends)
    fds_before, rss_before = await _settled(gateway)
    started = time.monotonic()
    for _ in range(waves):
        await _wave(gateway, wave)
        await all_free([gateway], backends)
    took = time.monotonic() - started
    await wait_until(lambda: open_files(gateway.process) <= fds_before, within=5)
    fds_after, rss_after = await _settled(gateway)
    print(
        f"\n{waves} waves of {wave} sessions ({waves * wave}) from {len(CLIENT_IPS)} source "
        f"addresses in {took:.1f}s: gateway fds {fds_before} -> {fds_after}, RSS "
        f"{rss_before} -> {rss_after} KiB ({rss_after - rss_before:+d})"
    )
    never_over(backends, cap)
    assert served_by_backends(backends) == ((waves + 1) * wave, (waves + 1) * wave)
    assert fds_after == fds_before
    # A session that leaked even 1 KiB would add 6,000 KiB here; the allocator's own
    # arenas and the collector's timing move RSS by far less than half that.
    assert rss_after - rss_before < 3072, (rss_before, rss_after)
