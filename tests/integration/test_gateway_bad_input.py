"""Bad requests get a clear 4xx, cost no slot and no token, and disturb nobody else."""

from __future__ import annotations

import asyncio
import json

import pytest
from gwtools import open_many, open_one, pod_of, raw_request

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway

GOOD_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def upgrade(
    key: bytes | None = GOOD_KEY, version: bytes | None = b"13", method: bytes = b"GET"
) -> bytes:
    lines = [method + b" / HTTP/1.1", b"Host: x", b"Connection: Upgrade", b"Upgrade: websocket"]
    if key is not None:
        lines.append(b"Sec-WebSocket-Key: " + key)
    if version is not None:
        lines.append(b"Sec-WebSocket-Version: " + version)
    return b"\r\n".join(lines) + b"\r\n\r\n"


BAD_REQUESTS = {
    "garbage": (b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n", 400),
    "bad_method_line": (b"GET\r\n\r\n", 400),
    "bad_content_length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n", 400),
    "head_too_large": (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", 431),
    "no_key": (upgrade(key=None), 400),
    "short_key": (upgrade(key=b"c2hvcnQ="), 400),
    "not_base64_key": (upgrade(key=b"!!!!!!!!!!!!!!!!!!!!!!!!"), 400),
    "no_version": (upgrade(version=None), 400),
    "wrong_version": (upgrade(version=b"8"), 426),
    "two_versions": (upgrade(version=b"13, 8"), 426),
    "post_upgrade": (upgrade(method=b"POST"), 400),
    "other_upgrade": (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
        400,
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
async def test_bad_request_is_refused_without_cost(procs: ProcessGroup, name: str) -> None:
    data, status = BAD_REQUESTS[name]
    backends = start_backends(procs, 1, tripwire=2)
    # One slot and one token in all: any bad request that spent either would
    # make the good clients below fail.
    gateway = start_gateway(
        procs,
        backends,
        limits={"max_connections_per_backend": 2, "connect_rate": {"per_second": 0.01, "burst": 2}},
    )
    bystander = await open_one(gateway.ws_url)
    got, headers, body = await raw_request("127.0.0.1", gateway.port, data)
    assert got == status
    assert json.loads(body)["error"] == "bad_request"
    if status == 426:  # the version this gateway speaks, so the client can retry with it
        assert headers["sec-websocket-version"] == "13"
    assert await pod_of(bystander) == "pod-a"  # the live session is undisturbed
    newcomer = await open_one(gateway.ws_url)  # the last slot and token are still there
    assert await pod_of(newcomer) == "pod-a"
    stats = backends[0].stats()
    assert stats["total_connections"] == 2 and stats["refused"] == 0
    await bystander.close()
    await newcomer.close()


async def test_a_bad_request_pipelined_after_a_good_one_is_answered_after_it(
    procs: ProcessGroup,
) -> None:
    # One write: a good request, then bytes that are no request. The good one is
    # answered by the backend, then the bad one gets its 400, on the same connection.
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\nUpgrade:websocket\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)  # the gateway closes after the 400
    writer.close()
    first, _, rest = answer.partition(b"\r\n")
    assert first == b"HTTP/1.1 200 OK", answer
    assert b"pod-a" in rest and b"HTTP/1.1 400 " in rest, answer
    assert rest.index(b"pod-a") < rest.index(b"HTTP/1.1 400 ")
    assert backends[0].stats()["http_requests"] == 1  # the bad bytes never reached it


async def test_slow_head_gets_408(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs, backends, timeouts={"header": "300ms"}, limits={"max_connections_per_backend": 1}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    outcome = await open_many(gateway.ws_url, 1)
    assert outcome.statuses[101] == 1
    await outcome.open[0].close()


async def test_idle_connection_is_closed_quietly(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, timeouts={"header": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no 408 for silence
    writer.close()
