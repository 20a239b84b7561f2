"""The demo backend over real sockets: what it answers and what it counts."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv


def start_backend(procs: ProcessGroup, pod: str = "pod-a", *extra: str) -> str:
    port = free_port()
    procs.start(
        pod,
        wsgate_argv(
            "backend", "--port", str(port), "--pod-id", pod, "--pod-ip", "10.0.0.7", *extra
        ),
        port=("127.0.0.1", port),
    )
    return f"127.0.0.1:{port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def stats(http: aiohttp.ClientSession, address: str) -> dict[str, object]:
    async with http.get(f"http://{address}/stats") as response:
        data: dict[str, object] = await response.json()
        return data


async def test_text_messages_are_answered_with_the_pod_and_binary_is_echoed(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    async with http.ws_connect(f"ws://{address}/ws") as ws:
        before = time.time()
        await ws.send_str("hello")
        answer = json.loads(await ws.receive_str())
        assert answer["pod"] == "pod-a"
        assert answer["pod_ip"] == "10.0.0.7"
        assert answer["echo"] == "hello"
        assert answer["active_connections"] == 1
        assert before - 1 <= answer["ts"] <= time.time() + 1
        payload = os.urandom(70_000)
        await ws.send_bytes(payload)
        assert await ws.receive_bytes() == payload
        await ws.send_bytes(b"")
        assert await ws.receive_bytes() == b""


async def test_the_clients_close_code_and_reason_come_back(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    ws = await http.ws_connect(f"ws://{address}/")
    await ws.close(code=4001, message=b"done here")
    assert ws.close_code == 4001
    counts = await stats(http, address)
    assert counts["active_connections"] == 0
    assert counts["total_connections"] == 1


async def test_the_backend_closes_sessions_with_a_chosen_code(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    sessions = [await http.ws_connect(f"ws://{address}/ws") for _ in range(3)]
    async with http.post(
        f"http://{address}/sessions/close?code=1012&reason=rebalance&count=2"
    ) as r:
        assert (await r.json()) == {"closed": 2}
    closes = []
    for ws in sessions[:2]:
        message = await ws.receive(timeout=5)
        assert message.type is aiohttp.WSMsgType.CLOSE
        closes.append((message.data, message.extra))
    assert closes == [(1012, "rebalance")] * 2
    assert (await stats(http, address))["active_connections"] == 1
    await sessions[2].close()


async def test_the_tripwire_refuses_sessions_beyond_its_limit_and_counts_them(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs, "pod-t", "--max-connections", "2")
    first = await http.ws_connect(f"ws://{address}/ws")
    second = await http.ws_connect(f"ws://{address}/ws")
    for _ in range(3):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"ws://{address}/ws")
        assert refused.value.status == 503
    await first.close()
    third = await http.ws_connect(f"ws://{address}/ws")
    counts = await stats(http, address)
    assert counts["refused"] == 3
    assert counts["active_connections"] == 2
    assert counts["peak_connections"] == 2
    assert counts["total_connections"] == 3
    await second.close()
    await third.close()


async def test_stats_count_peers_by_real_ip_header_and_reset_keeps_what_is_open(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    held = await http.ws_connect(f"ws://{address}/ws", headers={"X-Real-IP": "192.0.2.9"})
    for _ in range(3):
        async with http.get(f"http://{address}/", headers={"X-Real-IP": "192.0.2.1"}) as r:
            assert (await r.json())["pod"] == "pod-a"
    async with http.get(f"http://{address}/") as r:
        assert r.status == 200
    counts = await stats(http, address)
    assert counts["peers"] == {"192.0.2.9": 1, "192.0.2.1": 3, "127.0.0.1": 1}
    assert counts["http_requests"] == 4
    async with http.post(f"http://{address}/stats/reset") as r:
        assert r.status == 200
    counts = await stats(http, address)
    assert counts["peers"] == {}
    assert counts["http_requests"] == 0
    assert counts["total_connections"] == 0
    assert counts["active_connections"] == 1
    assert counts["peak_connections"] == 1
    await held.close()


async def test_the_socket_peer_is_counted_when_no_header_names_the_client(
    procs: ProcessGroup,
) -> None:
    address = start_backend(procs)
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as from_other_ip,
        from_other_ip.get(f"http://{address}/") as r,
    ):
        assert r.status == 200
    async with aiohttp.ClientSession() as http:
        assert (await stats(http, address))["peers"] == {"127.0.0.3": 1}


async def test_slow_requests_wait_and_count_as_in_flight(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)

    async def slow() -> tuple[float, dict[str, object]]:
        started = time.monotonic()
        async with http.get(f"http://{address}/slow?min=0.6&max=0.8") as r:
            body: dict[str, object] = await r.json()
        return time.monotonic() - started, body

    waiting = [asyncio.create_task(slow()) for _ in range(5)]
    await asyncio.sleep(0.3)
    assert (await stats(http, address))["http_in_flight"] == 5
    for elapsed, body in await asyncio.gather(*waiting):
        assert 0.6 <= elapsed < 3
        assert body["pod"] == "pod-a"
        assert 0.6 <= float(body["delay"]) <= 0.8  # type: ignore[arg-type]
    counts = await stats(http, address)
    assert counts["http_in_flight"] == 0
    assert counts["peak_http_in_flight"] == 5


async def test_a_slow_request_whose_client_leaves_stops_counting(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    host, port = address.split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /slow?min=30&max=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)
    assert (await stats(http, address))["http_in_flight"] == 1
    writer.close()
    deadline = time.monotonic() + 5
    while (await stats(http, address))["http_in_flight"] != 0:
        assert time.monotonic() < deadline, "the abandoned request still counts"
        await asyncio.sleep(0.05)


async def test_slow_rejects_a_bad_range(procs: ProcessGroup, http: aiohttp.ClientSession) -> None:
    address = start_backend(procs)
    async with http.get(f"http://{address}/slow?min=3&max=1") as r:
        assert r.status == 400


async def test_echo_streams_back_content_length_and_chunked_bodies(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    body = os.urandom(3 * 1024 * 1024)
    async with http.post(f"http://{address}/echo", data=io.BytesIO(body)) as r:
        assert r.headers["Content-Length"] == str(len(body))
        assert await r.read() == body

    async def chunks() -> AsyncIterator[bytes]:
        for index in range(50):
            yield bytes([index]) * 1000

    async with http.post(f"http://{address}/echo", data=chunks()) as r:
        assert r.headers.get("Transfer-Encoding") == "chunked"
        assert await r.read() == b"".join(bytes([i]) * 1000 for i in range(50))


async def test_health_can_be_failed_and_restored(
    procs: ProcessGroup, http: aiohttp.ClientSession
) -> None:
    address = start_backend(procs)
    statuses = []
    for step in ("fail", None, "ok", None):
        if step is not None:
            async with http.post(f"http://{address}/health/{step}") as r:
                assert r.status == 200
            continue
        async with http.get(f"http://{address}/health") as r:
            statuses.append(r.status)
    assert statuses == [503, 200]


def test_bad_flags_end_in_one_line_and_exit_code_2() -> None:
    import subprocess

    done = subprocess.run(
        wsgate_argv("backend", "--slow-min", "5", "--slow-max", "1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--slow-max" in done.stderr
