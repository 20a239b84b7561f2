"""Every way a session or request ends frees its slot only when the backend can no
longer count it.

Each test holds a backend at its cap while a connection ends in one particular
way, keeps trying new connections during the ending, and asserts on the
backend's own peak count (``/stats``): it never exceeds the cap. Each also
asserts that the slot does come back, so that refusing everything cannot pass.

The hard endings are those with bytes still owed to the backend: a "flooder"
client with a tiny receive buffer sends large frames without reading, so the
backend stalls writing its echoes, stops reading, and the gateway holds bytes
for it that it flushes (for up to its close grace) after the client side ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from gwtools import close_all, open_one, wait_until
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway

CAP = 2
UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# A masked binary frame of 1 MiB; the payload is random, so masked or not it is noise.
FRAME = b"\x82\xff" + struct.pack("!Q", 1 << 20) + os.urandom(4) + os.urandom(1 << 20)


def flooder(port: int) -> socket.socket:
    """A session whose client reads nothing: it is answered 101, then only sends."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: nothing after the head is read
        assert chunk, "the gateway closed before answering"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def flood(sock: socket.socket, seconds: float) -> int:
    """Send frames for ``seconds`` (as far as the peers take them); return bytes sent."""
    sock.setblocking(False)
    sent = 0
    view = memoryview(FRAME)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(view[sent % len(FRAME) :])
        except BlockingIOError:
            time.sleep(0.01)
    return sent


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Prober:
    """Tries a new session every ``interval`` seconds and keeps those admitted."""

    def __init__(self, gateway: GatewayProcess, interval: float = 0.1):
        self.url = gateway.ws_url
        self.interval = interval
        self.admitted: list[tuple[float, ClientConnection]] = []
        self.refused = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                ws = await open_one(self.url)
            except (InvalidStatus, OSError, TimeoutError):
                self.refused += 1
            else:
                self.admitted.append((time.monotonic(), ws))
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await close_all([ws for _, ws in self.admitted])


async def held_at_cap_while(
    gateway: GatewayProcess,
    backend: BackendProcess,
    ending: Callable[[], Awaitable[float]],
    *,
    watch: float,
) -> float:
    """Keep trying sessions while ``ending`` runs and ``watch`` seconds after it;
    assert the backend never held more than CAP. ``ending`` returns when it ended.

    Returns how long after the ending a probe was first admitted.
    """
    prober = Prober(gateway)
    prober.start()
    try:
        await wait_until(lambda: len(prober.admitted) >= 1, within=10)
        before = len(prober.admitted)
        ended = await ending()
        await asyncio.sleep(watch)
        stats = backend.stats()
        assert stats["peak_connections"] <= CAP, stats
        later = [when for when, _ in prober.admitted[before:]]
        assert later, "the slot never came back"
        return later[0] - ended
    finally:
        await prober.stop()


@pytest.fixture
def one_backend(procs: ProcessGroup) -> BackendProcess:
    [backend] = start_backends(procs, 1)
    return backend


def gateway_for(procs: ProcessGroup, backend: BackendProcess, **config: object) -> GatewayProcess:
    return start_gateway(procs, [backend], limits={"max_connections_per_backend": CAP}, **config)


async def stalled_flooder(gateway: GatewayProcess) -> socket.socket:
    """A flooder that has stalled its backend: bytes are owed to it from now on."""
    sock = await asyncio.to_thread(flooder, gateway.port)
    await asyncio.to_thread(flood, sock, 2.0)
    return sock


@pytest.mark.slow
async def test_client_reset_with_bytes_owed_to_the_backend(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """The relay flushes to the backend for up to its linger; the slot waits for that.

    (A client's EOF is read only once every byte before it has been handed to the
    backend's socket: at an EOF nothing is owed, and the backend socket closes at once.)
    """
    gateway = gateway_for(procs, one_backend)
    sock = await stalled_flooder(gateway)

    async def leave() -> float:
        reset(sock)
        return time.monotonic()

    try:
        await held_at_cap_while(gateway, one_backend, leave, watch=7.0)
    finally:
        sock.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        pytest.param({"max_connection_duration": "3s"}, id="max_connection_duration"),
        pytest.param({"timeouts": {"idle": "2s"}}, id="idle_timeout"),
    ],
)
async def test_gateway_ending_a_stalled_session(
    procs: ProcessGroup, one_backend: BackendProcess, config: dict[str, object]
) -> None:
    gateway = gateway_for(procs, one_backend, rebalance={"interval": "200ms"}, **config)
    sock = await stalled_flooder(gateway)

    async def stay_silent() -> float:
        return time.monotonic()  # the gateway ends it, on its own clock

    try:
        await held_at_cap_while(gateway, one_backend, stay_silent, watch=14.0)
    finally:
        sock.close()


async def test_backend_closing_while_owed_bytes_to_the_client_frees_the_slot_at_once(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """Flushing to a slow client after the backend left costs no slot."""
    gateway = gateway_for(procs, one_backend)
    sock = await stalled_flooder(gateway)
    # The flooder stops; the backend still has echoes for it that it cannot send.

    async def backend_closes() -> float:
        async with aiohttp.ClientSession() as session:
            url = f"http://{one_backend.address}/sessions/close?count=2"
            async with session.post(url) as response:
                assert response.status == 200
        return time.monotonic()

    try:
        after = await held_at_cap_while(gateway, one_backend, backend_closes, watch=4.0)
    finally:
        sock.close()
    assert after < 4.0


async def test_http_client_leaving_mid_response(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """A request whose client leaves holds its slot until the backend connection is
    closed, and the backend stops counting it then."""
    gateway = gateway_for(procs, one_backend)
    request = b"GET /slow?min=30&max=30 HTTP/1.1\r\nHost: x\r\n\r\n"
    clients = []
    for _ in range(CAP):
        client = socket.create_connection(("127.0.0.1", gateway.port))
        client.sendall(request)
        clients.append(client)
    await wait_until(lambda: one_backend.stats()["http_in_flight"] == CAP)
    one_backend.reset()
    for client in clients:
        reset(client)
    # Probes now: each request either gets a slot or a 503; the backend's own
    # count of requests in flight never passes the cap.
    statuses: list[int] = []
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 2.0
        pending = []
        while time.monotonic() < deadline:
            pending.append(asyncio.create_task(session.get(gateway.http_url + "/slow?min=1&max=1")))
            await asyncio.sleep(0.05)
        for task in pending:
            response = await task
            statuses.append(response.status)
            response.release()
    stats = one_backend.stats()
    assert stats["peak_http_in_flight"] <= CAP, stats
    assert 200 in statuses, statuses


async def test_http_client_ending_its_side_inside_a_body_frees_the_slot(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """A client that half-closes with its request body unfinished can never finish
    it: the gateway ends the exchange at once, and the backend stops counting it."""
    gateway = gateway_for(procs, one_backend)
    clients = []
    for _ in range(CAP):
        client = socket.create_connection(("127.0.0.1", gateway.port))
        # Content-Length 5, four bytes sent: the echo backend answers as the body streams.
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhell")
        clients.append(client)
    await wait_until(lambda: one_backend.stats()["http_in_flight"] == CAP)
    started = time.monotonic()
    for client in clients:
        client.shutdown(socket.SHUT_WR)
    try:
        await wait_until(lambda: one_backend.stats()["http_in_flight"] == 0, within=5.0)
        freed = time.monotonic() - started
        async with aiohttp.ClientSession() as session:  # the slots serve others again
            for _ in range(CAP):
                async with session.get(gateway.http_url + "/after") as response:
                    assert response.status == 200
    finally:
        for client in clients:
            client.close()
    assert freed < 2.0, freed
    assert one_backend.stats()["peak_http_in_flight"] <= CAP


async def test_http_client_ending_its_side_after_a_whole_request_gets_the_answer(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """A half-close after a whole request is a client done sending, not one gone."""
    gateway = gateway_for(procs, one_backend)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5.0) as client:
        client.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        client.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"hello", answer
    assert one_backend.stats()["http_requests"] == 1


async def test_gateway_stop_frees_slots_only_after_closing_toward_the_backend(
    procs: ProcessGroup, one_backend: BackendProcess
) -> None:
    """A gateway told to stop (a drain cut short) with a stalled session: a second
    replica on the same Redis admits into that slot only once the backend lost it."""
    from wsgate.testbed.processes import RedisServer, find_redis_server

    if find_redis_server() is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(procs).start()
    config = {"state": {"store": redis.url, "lease_ttl": "10s"}}
    first = gateway_for(procs, one_backend, name="first", **config)
    second = gateway_for(procs, one_backend, name="second", **config)
    sock = await stalled_flooder(first)

    async def stop_first() -> float:
        first.process.signal(signal.SIGTERM)  # drain...
        await asyncio.sleep(0.2)
        first.process.signal(signal.SIGTERM)  # ...cut short: stop now
        return time.monotonic()

    try:
        await held_at_cap_while(second, one_backend, stop_first, watch=7.0)
    finally:
        sock.close()
