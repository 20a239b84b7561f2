"""The admin API against real processes: what it reports equals what the far sides saw.

Clients here are raw sockets that count every byte after the request head, so
the relayed-bytes counters can be checked exactly, and the backends' own
``/stats`` are the truth for connection counts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from wsgate.testbed.processes import ProcessGroup, free_port, wait_for_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway


# -- helpers --------------------------------------------------------------------------------------
def gateway_with_admin(
    procs: ProcessGroup, backends: list[BackendProcess], **config: Any
) -> GatewayProcess:
    gateway = start_gateway(procs, backends, **config)
    wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    return gateway


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class RawWebSocket:
    """A WebSocket client on a bare socket, counting the bytes after the handshake head."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0
    received: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)

    async def send_text(self, text: str) -> None:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes((0x81, 0x80 | len(payload))) + mask + masked
        self.writer.write(frame)
        self.sent += len(frame)
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            first, second = await self.reader.readexactly(2)
            size = second & 0x7F
            header = 2
            if size == 126:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                header += 2
            elif size == 127:
                (size,) = struct.unpack("!Q", await self.reader.readexactly(8))
                header += 8
            payload = await self.reader.readexactly(size)
        self.received += header + size
        return first & 0x0F, payload

    async def ask(self, text: str) -> dict[str, Any]:
        await self.send_text(text)
        opcode, payload = await self.receive()
        assert opcode == 1
        answer: dict[str, Any] = json.loads(payload)
        self.messages.append(answer)
        return answer

    async def close(self) -> None:
        """Closing handshake, then read to EOF so every byte the gateway relayed is counted."""
        mask = os.urandom(4)
        payload = struct.pack("!H", 1000)
        frame = bytes((0x88, 0x80 | len(payload))) + mask
        frame += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.writer.write(frame)
        self.sent += len(frame)
        async with asyncio.timeout(5):
            while chunk := await self.reader.read(65536):
                self.received += len(chunk)
        self.writer.close()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
    return Answer(int(lines[0].split()[1]), headers, body)


async def open_websocket(port: int) -> RawWebSocket | Answer:
    """The open session, or the answer that refused it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .encode()
    )  # fmt: skip
    answer = await read_answer(reader)
    if answer.status == 101:
        return RawWebSocket(reader, writer)
    writer.close()
    return answer


async def must_open(port: int) -> RawWebSocket:
    result = await open_websocket(port)
    assert isinstance(result, RawWebSocket), result
    return result


async def until_held(http: aiohttp.ClientSession, admin_url: str, held: int) -> None:
    """Until the gateway holds ``held`` slots. It frees a session's slot once its
    socket to the backend is closed, and the client's end of stream can come
    first: the next admission must wait for the gateway's count, not the client's."""
    async with asyncio.timeout(5):
        while True:
            clusters = json.loads(await get_text(http, f"{admin_url}/clusters"))
            if sum(row["active"] for row in clusters["backends"]) == held:
                return
            await asyncio.sleep(0.01)


async def must_refuse(port: int) -> Answer:
    result = await open_websocket(port)
    assert isinstance(result, Answer), "expected a refusal, got a session"
    return result


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metric_samples(text: str) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def parse_stats(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_text(http: aiohttp.ClientSession, url: str, token: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, (url, response.status)
        return await response.text()


# -- the scripted scenario ------------------------------------------------------------------------
async def test_metrics_clusters_and_stats_equal_what_backends_and_clients_saw(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    backends = start_backends(procs, 2)
    # One slot per backend; four tokens that do not come back during the test.
    gateway = gateway_with_admin(
        procs,
        backends,
        limits={
            "max_connections_per_backend": 1,
            "connect_rate": {"per_second": 0.01, "burst": 4},
        },
    )
    port = gateway.port
    refusals: list[Answer] = []
    # The start-up probe that waited for the listener was a connection too.
    before = metric_samples(await get_text(http, f"{gateway.admin_url}/metrics"))
    accepted_before = metric(before, "wsgate_connections_accepted_total")

    # A plain HTTP request: admitted, forwarded, finished.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /hello HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    http_answer = await read_answer(reader)
    writer.close()
    assert http_answer.status == 200
    http_body_bytes = len(http_answer.body)

    first = await must_open(port)
    second = await must_open(port)
    await first.ask("one")
    await second.ask("two")
    refusals.append(await must_refuse(port))  # both backends full: 503
    await first.close()
    await until_held(http, gateway.admin_url, 1)
    third = await must_open(port)  # the last token
    await third.ask("three")
    refusals.append(await must_refuse(port))  # full again: 503
    await second.close()
    await until_held(http, gateway.admin_url, 1)
    refusals.append(await must_refuse(port))  # a slot is free but no token is left: 429

    assert [r.status for r in refusals] == [503, 503, 429]
    assert [json.loads(r.body)["error"] for r in refusals] == [
        "no_capacity", "no_capacity", "rate_limited",
    ]  # fmt: skip
    assert all(int(r.headers["retry-after"]) >= 1 for r in refusals)

    truth = {b.pod_id: b.stats() for b in backends}
    assert sum(t["active_connections"] for t in truth.values()) == 1
    assert sum(t["total_connections"] for t in truth.values()) == 3
    assert sum(t["http_requests"] for t in truth.values()) == 1

    base = gateway.admin_url
    samples = metric_samples(await get_text(http, f"{base}/metrics"))
    clusters = json.loads(await get_text(http, f"{base}/clusters"))
    stats = parse_stats(await get_text(http, f"{base}/stats"))

    # Per backend: the gateway's figures are the backends' own.
    assert [b["id"] for b in clusters["backends"]] == ["pod-a", "pod-b"]
    assert clusters["state"] == {"store": "memory", "mode": "ok"}
    for row in clusters["backends"]:
        pod = row["id"]
        seen = truth[pod]
        admitted_here = seen["total_connections"] + seen["http_requests"]
        assert set(row) == {
            "route", "id", "address", "healthy", "active", "active_here", "max_connections",
            "admitted_total", "rejected_total",
        }  # fmt: skip
        assert row["route"] == "default"
        assert row["address"] == next(b.address for b in backends if b.pod_id == pod)
        assert row["healthy"] is True
        assert row["active"] == row["active_here"] == seen["active_connections"]
        assert row["max_connections"] == 1
        assert row["admitted_total"] == admitted_here
        # Every no_capacity answer found both backends full.
        assert row["rejected_total"] == 2
        assert (
            metric(samples, "wsgate_backend_active_connections", route="default", backend=pod)
            == row["active"]
        )
        assert (
            metric(
                samples, "wsgate_backend_global_active_connections", route="default", backend=pod
            )
            == row["active"]
        )
        assert metric(samples, "wsgate_backend_max_connections", route="default", backend=pod) == 1
        assert metric(samples, "wsgate_backend_healthy", route="default", backend=pod) == 1
        assert (
            metric(samples, "wsgate_backend_admitted_total", route="default", backend=pod)
            == admitted_here
        )
        assert metric(samples, "wsgate_backend_rejected_total", route="default", backend=pod) == 2
        assert (
            metric(samples, "wsgate_backend_connect_failures_total", route="default", backend=pod)
            == 0
        )
        assert stats[f"backend.{pod}.active"] == str(row["active"])
        assert stats[f"backend.{pod}.admitted_total"] == str(admitted_here)
        assert stats[f"backend.{pod}.rejected_total"] == "2"

    # Totals: what the clients saw.
    assert metric(samples, "wsgate_connections_accepted_total") - accepted_before == 7
    assert metric(samples, "wsgate_admitted_total") == 4
    assert metric(samples, "wsgate_rejected_total", reason="no_capacity") == 2
    assert metric(samples, "wsgate_rejected_total", reason="rate_limited") == 1
    assert metric(samples, "wsgate_rejected_total", reason="state_unavailable") == 0
    assert stats["connections.rejected.no_capacity"] == "2"
    assert stats["connections.rejected.rate_limited"] == "1"
    assert stats["connections.admitted_total"] == "4"
    assert metric(samples, "wsgate_websocket_sessions") == 1
    # Two sessions and one request finished; seven decisions were taken.
    assert metric(samples, "wsgate_connection_duration_seconds_count", kind="websocket") == 2
    assert metric(samples, "wsgate_connection_duration_seconds_count", kind="http") == 1
    assert metric(samples, "wsgate_admission_latency_seconds_count") == 7
    # Bytes: finished sessions, the live one so far, and the HTTP response body.
    sessions = [first, second, third]
    from_clients = sum(s.sent for s in sessions)
    to_clients = sum(s.received for s in sessions) + http_body_bytes
    assert metric(samples, "wsgate_relayed_bytes_total", direction="from_clients") == from_clients
    assert metric(samples, "wsgate_relayed_bytes_total", direction="to_clients") == to_clients
    assert stats["bytes.from_clients"] == str(from_clients)
    # The rate bucket is empty; the state is the embedded one.
    assert 0 <= metric(samples, "wsgate_connect_rate_tokens_available") < 0.5
    assert metric(samples, "wsgate_connect_rate_burst") == 4
    assert metric(samples, "wsgate_state_mode", mode="ok") == 1
    assert metric(samples, "wsgate_state_mode", mode="degraded") == 0
    assert metric(samples, "wsgate_state_errors_total") == 0
    assert metric(samples, "wsgate_live_replicas") == 1

    await third.close()
    clusters = json.loads(await get_text(http, f"{base}/clusters"))
    assert [row["active"] for row in clusters["backends"]] == [0, 0]
    assert all(b.stats()["active_connections"] == 0 for b in backends)


async def test_connect_failures_are_counted_per_backend(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    live = start_backends(procs, 1)[0]
    # Nothing listens on the dead one's port (only its address reaches the config).
    dead = BackendProcess("dead", "127.0.0.1", free_port(), live.process)
    gateway = start_gateway(procs, [dead, live], health={"enabled": False}, balance="round_robin")
    wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    session = await must_open(gateway.port)  # tried dead first, then live
    await session.ask("hi")
    samples = metric_samples(await get_text(http, f"{gateway.admin_url}/metrics"))
    assert (
        metric(samples, "wsgate_backend_connect_failures_total", route="default", backend="dead")
        == 1
    )
    assert (
        metric(samples, "wsgate_backend_connect_failures_total", route="default", backend="pod-a")
        == 0
    )
    assert (
        metric(samples, "wsgate_backend_active_connections", route="default", backend="dead") == 0
    )
    assert (
        metric(samples, "wsgate_backend_active_connections", route="default", backend="pod-a") == 1
    )
    assert live.stats()["active_connections"] == 1
    await session.close()


# -- secrets and the token -----------------------------------------------------------------------
PROTECTED = [
    "/", "/metrics", "/clusters", "/stats", "/config_dump", "/snapshot", "/events", "/dashboard",
]  # fmt: skip


@pytest.fixture
def redis_with_password(procs: ProcessGroup) -> str:
    from wsgate.testbed.processes import find_redis_server

    binary = find_redis_server()
    if binary is None:
        pytest.skip("redis-server is not installed; ./scripts/setup.sh installs it")
    port = free_port()
    procs.start(
        "redis-auth",
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "s3cret-redis-pw", "--dir", str(procs.log_dir)],
        port=("127.0.0.1", port),
    )  # fmt: skip
    return f"redis://:s3cret-redis-pw@127.0.0.1:{port}/0"


async def test_the_token_is_enforced_except_on_probes(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    token = "adm1n-t0ken-value"
    gateway = gateway_with_admin(procs, start_backends(procs, 1), admin_token=token)
    base = gateway.admin_url

    for path in ("/ready", "/healthz"):
        async with http.get(base + path) as response:
            assert response.status == 200, path
    for path in PROTECTED:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            async with http.get(base + path, headers=headers) as response:
                assert response.status == 401, (path, headers)
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(base + path, headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200, path
            if path == "/events":
                first = await response.content.readuntil(b"\n\n")
                assert b'"replica"' in first

    # A browser signs in once on the dashboard's form and then carries a cookie.
    # unsafe=True: keep cookies of IP-address hosts, as browsers do.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
        async with browser.post(f"{base}/login", data={"token": "wrong"}) as response:
            assert response.status == 401
        async with browser.post(
            f"{base}/login", data={"token": token}, allow_redirects=False
        ) as response:
            assert response.status == 303
            cookie = response.cookies["wsgate_admin"]
            assert token not in cookie.value
            assert cookie["httponly"]
        async with browser.get(f"{base}/clusters") as response:
            assert response.status == 200
        async with browser.get(f"{base}/dashboard") as response:
            assert response.status == 200
            assert "<canvas" in await response.text()


@pytest.mark.redis
async def test_config_dump_hides_the_redis_password_and_the_token(
    procs: ProcessGroup, http: aiohttp.ClientSession, redis_with_password: str
) -> None:
    token = "adm1n-t0ken-value"
    backends = start_backends(procs, 1)
    gateway = gateway_with_admin(
        procs, backends, admin_token=token,
        state={"store": redis_with_password, "namespace": "admin-test"},
    )  # fmt: skip
    dump_text = await get_text(http, f"{gateway.admin_url}/config_dump", token)
    assert "s3cret-redis-pw" not in dump_text
    assert token not in dump_text
    dump = json.loads(dump_text)
    assert dump["admin_token"] == "<redacted>"
    assert dump["state"]["store"].startswith("redis://:<redacted>@127.0.0.1:")
    assert dump["state"]["namespace"] == "admin-test"
    assert dump["backends"] == [
        {"address": backends[0].address, "id": "pod-a", "max_connections": None, "tls": None}
    ]
    # The password did work: the gateway reached Redis with it.
    clusters = json.loads(await get_text(http, f"{gateway.admin_url}/clusters", token))
    assert clusters["state"] == {"store": "redis", "mode": "ok"}


# -- wsgate status --------------------------------------------------------------------------------
def run_status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsgate_argv("status", *args),
        capture_output=True,
        text=True,
        timeout=20,
        env={**os.environ, "COLUMNS": "160", **(env or {})},
    )


@pytest.mark.slow
async def test_status_shows_the_backends_and_fails_in_one_line(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    token = "st4tus-token"
    backends = start_backends(procs, 2)
    gateway = gateway_with_admin(
        procs, backends, admin_token=token, limits={"max_connections_per_backend": 1}
    )
    sessions = [await must_open(gateway.port), await must_open(gateway.port)]
    refusal = await must_refuse(gateway.port)
    assert refusal.status == 503

    admin = f"127.0.0.1:{gateway.admin_port}"
    shown = await asyncio.to_thread(run_status, "--admin", admin, "--token", token)
    assert shown.returncode == 0, shown.stderr
    for pod in ("pod-a", "pod-b"):
        assert pod in shown.stdout
    assert shown.stdout.count("1/1") == 2  # each backend full
    assert "no_capacity" in shown.stdout

    as_json = await asyncio.to_thread(
        run_status, "--admin", gateway.admin_url, "--json", env={"WSGATE_ADMIN_TOKEN": token}
    )
    assert as_json.returncode == 0, as_json.stderr
    overview = json.loads(as_json.stdout)
    clusters = json.loads(await get_text(http, f"{gateway.admin_url}/clusters", token))
    for row, full in zip(clusters["backends"], overview["backends"], strict=True):
        assert {k: full[k] for k in row} == row
    assert overview["totals"]["rejected"]["no_capacity"] == 1

    no_token = await asyncio.to_thread(run_status, "--admin", gateway.admin_url)
    assert no_token.returncode == 2
    assert no_token.stderr.count("\n") == 1 and "token" in no_token.stderr

    watched = await asyncio.to_thread(run_status_watch, gateway.admin_url, token)
    assert len(watched.splitlines()) >= 3
    assert all(json.loads(line)["replica"] for line in watched.splitlines())

    for session in sessions:
        await session.close()
    gone = await asyncio.to_thread(run_status, "--admin", f"127.0.0.1:{free_port()}")
    assert gone.returncode == 1
    assert gone.stdout == ""
    assert gone.stderr.count("\n") == 1
    assert "cannot reach the admin API" in gone.stderr


def run_status_watch(admin_url: str, token: str) -> str:
    """``--watch --json`` prints one line per refresh until interrupted (Ctrl-C: exit 0)."""
    process = subprocess.Popen(
        wsgate_argv("status", "--admin", admin_url, "--token", token, "--watch", "--json",
                    "--interval", "0.2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Three refreshes, however long the command takes to start on a busy machine.
    assert process.stdout is not None
    lines = []
    deadline = time.monotonic() + 30
    while len(lines) < 3 and time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    return "".join(lines) + out


def status_in_a_pipe(admin: str) -> str:
    """``wsgate status`` with stdout a pipe and no COLUMNS: 80 columns, no colours."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run(
        wsgate_argv("status", "--admin", admin), capture_output=True, text=True, timeout=20, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def status_in_a_terminal(admin: str, columns: int) -> str:
    """``wsgate status`` on a pseudo-terminal ``columns`` wide, its colours taken out."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    with subprocess.Popen(
        wsgate_argv("status", "--admin", admin),
        stdout=child,
        stderr=child,
        env={**env, "TERM": "xterm-256color"},
    ) as process:
        os.close(child)
        chunks = []
        with contextlib.suppress(OSError):  # EIO: the terminal's other side closed
            while chunk := os.read(main, 65536):
                chunks.append(chunk)
        os.close(main)
        assert process.wait(timeout=20) == 0
    text = b"".join(chunks).decode()
    assert "\x1b[" in text  # a terminal gets colours
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r\n", "\n")


@pytest.mark.slow
async def test_status_reads_whole_at_80_columns_and_in_a_pipe(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 2, prefix="chat-7d9f8c6b5")
    gateway = gateway_with_admin(procs, backends, limits={"max_connections_per_backend": 2})
    sessions = [await must_open(gateway.port) for _ in range(3)]
    try:
        await check_status_at_80_columns(gateway, backends)
    finally:
        for session in sessions:
            await session.close()


async def check_status_at_80_columns(
    gateway: GatewayProcess, backends: list[BackendProcess]
) -> None:
    seen = {b.pod_id: b.stats()["active_connections"] for b in backends}
    assert sorted(seen.values()) == [1, 2]
    admin = f"127.0.0.1:{gateway.admin_port}"
    for shown in (
        await asyncio.to_thread(status_in_a_pipe, admin),
        await asyncio.to_thread(status_in_a_terminal, admin, 80),
    ):
        lines = shown.splitlines()
        assert lines and all(len(line) <= 80 for line in lines), shown
        assert "…" not in shown, shown
        header = next(line for line in lines if line.startswith("┃"))
        headers = [cell.strip() for cell in header.strip("┃").split("┃")]
        assert headers[:2] == ["Backend", "Health"], shown
        assert headers[2] in ("Connections vs cap", "Connections"), shown
        assert {"Here", "Admitted", "Rejected"} <= set(headers), shown
        rows = {
            cells[0]: cells
            for line in lines
            if line.startswith("│")
            and (cells := [c.strip() for c in line.strip("│").split("│")])[0] in seen
        }
        # What the backends counted themselves, each against its cap.
        assert {pod: rows[pod][2].split()[-1] for pod in seen} == {
            pod: f"{n}/2" for pod, n in seen.items()
        }, shown
