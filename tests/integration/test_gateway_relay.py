"""What passes through the gateway arrives intact: WebSocket messages and HTTP bodies."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest
from gwtools import open_many, open_one, raw_request, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.frames import Frame, Opcode

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import (
    BackendProcess,
    GatewayProcess,
    http_json,
    start_backends,
    start_gateway,
)

Topology = tuple[GatewayProcess, list[BackendProcess]]


@pytest.fixture
def topology(procs: ProcessGroup) -> tuple[GatewayProcess, list[BackendProcess]]:
    backends = start_backends(procs, 4)
    gateway = start_gateway(
        procs, backends, balance="round_robin", limits={"max_connections_per_backend": 50}
    )
    return gateway, backends


SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000, 1 << 20, 4 << 20]


async def test_messages_of_every_size_arrive_intact(topology: Topology) -> None:
    gateway, _ = topology
    ws = await open_one(gateway.ws_url)
    try:
        for size in SIZES:
            payload = os.urandom(size)
            await ws.send(payload)
            assert await ws.recv() == payload, size
            text = "é" * (size // 2)
            await ws.send(text)
            assert json.loads(await ws.recv())["echo"] == text, size
    finally:
        await ws.close()


async def test_fragmented_messages_and_control_frames(topology: Topology) -> None:
    gateway, _ = topology
    ws = await open_one(gateway.ws_url)
    try:
        parts = [os.urandom(n) for n in (1, 1000, 70000, 3)]
        await ws.send(parts)  # one message in four fragments
        assert await ws.recv() == b"".join(parts)
        await ws.send(["frag", "mented ", "text"])
        assert json.loads(await ws.recv())["echo"] == "fragmented text"
        latency = await (await ws.ping(b"are you there"))
        assert latency >= 0
        # A ping in the middle of a fragmented message (RFC 6455 5.4 allows it).
        protocol = ws.protocol
        protocol.send_frame(Frame(Opcode.BINARY, b"ab", fin=False))
        protocol.send_frame(Frame(Opcode.PING, b"mid"))
        protocol.send_frame(Frame(Opcode.CONT, b"cd", fin=True))
        ws.send_data()
        assert await ws.recv() == b"abcd"
    finally:
        await ws.close()


@pytest.mark.parametrize("code,reason", [(1000, ""), (4001, "client says bye"), (1001, "away")])
async def test_client_close_code_reaches_backend_and_back(
    topology: Topology, code: int, reason: str
) -> None:
    gateway, _ = topology
    ws = await open_one(gateway.ws_url)
    await ws.close(code, reason)
    # The demo backend echoes the close it received: what comes back is what arrived.
    assert ws.close_code == code
    assert ws.close_reason == reason


async def test_backend_close_code_reaches_client(topology: Topology) -> None:
    gateway, backends = topology
    conns = [await open_one(gateway.ws_url) for _ in range(4)]  # one per backend (round robin)
    for backend in backends:
        await asyncio.to_thread(
            _post, f"http://{backend.address}/sessions/close?code=4002&reason=server%20bye&count=1"
        )
    for ws in conns:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4002
        assert ws.close_reason == "server bye"


def _post(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url, method="POST"), timeout=5):
        pass


async def test_many_sessions_in_parallel_keep_their_own_bytes(topology: Topology) -> None:
    gateway, backends = topology
    outcome = await open_many(gateway.ws_url, 40)
    assert outcome.statuses[101] == 40

    async def exchange(ws: ClientConnection, index: int) -> None:
        for round_ in range(20):
            payload = f"{index}:{round_}".encode() * (1 + index * 50)
            await ws.send(payload)
            assert await ws.recv() == payload

    await asyncio.gather(*(exchange(ws, i) for i, ws in enumerate(outcome.open)))
    await asyncio.gather(*(ws.close() for ws in outcome.open))
    await wait_until(lambda: sum(b.stats()["active_connections"] for b in backends) == 0)


# -- plain HTTP -------------------------------------------------------------------------


async def test_keep_alive_client_is_balanced_per_request(topology: Topology) -> None:
    gateway, backends = topology
    accepted_before = gateway.admin("/snapshot")["totals"]["accepted_total"]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        pods: Counter[str] = Counter()
        for _ in range(40):
            async with session.get(gateway.http_url + "/") as response:
                assert response.status == 200
                pods[(await response.json())["pod"]] += 1
    # One client connection the whole time, as the gateway counted it...
    assert gateway.admin("/snapshot")["totals"]["accepted_total"] == accepted_before + 1
    # ... yet every backend served its share.
    assert pods == Counter({b.pod_id: 10 for b in backends})
    assert sum(b.stats()["http_requests"] for b in backends) >= 40


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_and_response_bodies_stream_both_ways(
    topology: Topology, chunked: bool
) -> None:
    gateway, _ = topology
    body = os.urandom(3 << 20)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 100_000):
            yield body[start : start + 100_000]

    async with aiohttp.ClientSession() as session:
        data = pieces() if chunked else io.BytesIO(body)
        async with session.post(gateway.http_url + "/echo", data=data) as response:
            assert response.status == 200
            assert await response.read() == body


async def test_slow_request_holds_a_slot_while_it_runs(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": 1})
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(gateway.http_url + "/slow?min=1.5&max=1.5"))
        await wait_until(lambda: backends[0].stats()["http_in_flight"] == 1)
        # The slot is taken: a WebSocket and another request are both refused.
        refused = await open_many(gateway.ws_url, 1)
        assert refused.statuses == Counter({503: 1})
        async with session.get(gateway.http_url + "/") as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 1
        response = await slow
        assert response.status == 200
        response.release()
        async with session.get(gateway.http_url + "/") as response:
            assert response.status == 200
    assert backends[0].stats()["peak_http_in_flight"] == 1


async def test_unreachable_backend_answers_502_and_releases(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs, backends, limits={"max_connections_per_backend": 1}, health={"interval": "60s"}
    )
    backends[0].process.kill()
    for _ in range(3):  # would be 503 after the first if a slot leaked
        status, headers, body = await raw_request(
            "127.0.0.1", gateway.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert status == 502
        assert json.loads(body)["error"] == "backend_unreachable"
        assert int(headers["retry-after"]) >= 1


async def test_backend_connect_times_out_with_502_and_releases(procs: ProcessGroup) -> None:
    # A listener whose accept queue is full drops every new SYN: connects to it hang.
    with contextlib.ExitStack() as held:
        stuck = held.enter_context(socket.socket())
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        for _ in range(3):
            filler = held.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(stuck.getsockname())
        address = "{}:{}".format(*stuck.getsockname())
        gateway = start_gateway(
            procs,
            [{"address": address, "id": "stuck"}],
            limits={"max_connections_per_backend": 1},
            timeouts={"connect": "300ms"},
            health={"enabled": False},
        )
        port = gateway.port
        upgrade = (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        for _ in range(2):  # would be 503 the second time if the slot leaked
            started = time.monotonic()
            status, _, body = await raw_request("127.0.0.1", port, upgrade)
            took = time.monotonic() - started
            assert status == 502
            assert json.loads(body)["error"] == "backend_unreachable"
            assert 0.25 <= took < 1.5, took
        # A client reset while its request waits for the connect: no failure of the
        # backend (the cancel is not the timeout), and its slot comes back.
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await asyncio.sleep(0.5)
        [backend] = gateway.admin("/snapshot")["backends"]
        assert backend["connect_failures_total"] == 2
        assert backend["active"] == 0


async def test_at_the_open_files_limit_a_session_is_refused_or_kept_never_dropped(
    procs: ProcessGroup,
) -> None:
    """A session that got its 101 keeps relaying, even when the gateway has no
    descriptor to spare; the ones it cannot take are refused before their 101."""
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        # A hard limit the gateway cannot raise: room for a few dozen sessions.
        prefix=["prlimit", "--nofile=80:80"],
        limits={"max_connections_per_backend": 1000},
        health={},  # the default checks, few and far between
        access_log=False,
    )
    url = gateway.ws_url
    kept: list[ClientConnection] = []
    refused = 0
    try:
        for _ in range(80):  # more sessions than 80 descriptors can hold
            try:
                kept.append(await connect(url, open_timeout=2, ping_interval=None))
            except (OSError, TimeoutError, InvalidHandshake):
                refused += 1
                if refused == 3:
                    break
        assert refused == 3 and 5 < len(kept) < 40, (len(kept), refused)
        # Every session that was answered 101 still reaches its backend and back.
        for index, ws in enumerate(kept):
            await ws.send(f"still here {index}")
            reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert reply["echo"] == f"still here {index}"
        stats = http_json(f"http://{backends[0].address}/stats")
        assert stats["active_connections"] == len(kept)
    finally:
        for ws in kept:
            with contextlib.suppress(Exception):
                await ws.close()
    # With the sessions gone, the gateway takes new ones again.
    stats_url = f"http://{backends[0].address}/stats"
    await wait_until(lambda: http_json(stats_url)["active_connections"] == 0)
    ws = await open_one(url)
    await ws.send("again")
    assert json.loads(await asyncio.wait_for(ws.recv(), 5))["echo"] == "again"
    await ws.close()
