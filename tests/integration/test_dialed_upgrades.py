"""Upgrades whose backend side the relay opens: every answer a backend can give.

The gateway dials an upgrade's backend from the relay's thread and reads the
answer's head there. These tests put scripted backends (asyncio servers in the
test, on loopback) behind a real ``wsgate serve`` and judge by what each far
side saw: the bytes the client received, what the backend was sent, and when
the backend saw its connection closed.
"""

from __future__ import annotations

import asyncio
import json
import socket

from gwtools import raw_request, wait_until
from scripted import SWITCHED, UPGRADE, active, gateway_for, says, scripted

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_gateway


async def test_a_refused_upgrade_reaches_the_client_whole_and_frees_the_slot(
    procs: ProcessGroup,
) -> None:
    body = b'{"error":"not here"}' * 200  # more than one read of the answer

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        await asyncio.sleep(0.05)  # the body after the head, as a second segment
        writer.write(body)
        await writer.drain()

    async with scripted(refuse) as backend:
        gateway = gateway_for(procs, backend.entry)
        for attempt in range(1, 3):  # a leaked slot would make the second a 503
            status, _, received = await raw_request("127.0.0.1", gateway.port, UPGRADE)
            assert (status, received) == (403, body)
            await wait_until(lambda attempt=attempt: backend.closed == attempt, within=5)
        assert active(gateway) == {backend.entry["id"]: 0}


async def test_a_switch_in_pieces_with_frames_behind_it_reaches_the_client_in_order(
    procs: ProcessGroup,
) -> None:
    frames = b"\x81\x05hello\x82\x03abc"

    async def switch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for piece in (SWITCHED[:20], SWITCHED[20:-2], SWITCHED[-2:] + frames):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        upward = await reader.readexactly(7)  # a masked frame from the client
        writer.write(b"\x81\x02ok" + upward[-1:])  # echoes its last byte, unmasked garbage
        await writer.drain()

    async with scripted(switch) as backend:
        gateway = gateway_for(procs, backend.entry)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(UPGRADE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            assert await asyncio.wait_for(reader.readexactly(len(frames)), 5) == frames
            writer.write(b"\x81\x81abcd" + bytes([ord("Z") ^ ord("a")]))
            assert await asyncio.wait_for(reader.readexactly(5), 5) == b"\x81\x02ok;"
            assert active(gateway) == {backend.entry["id"]: 1}
        finally:
            writer.close()
        await wait_until(lambda: backend.closed == 1, within=5)
        await wait_until(lambda: active(gateway) == {backend.entry["id"]: 0}, within=5)
    [request] = backend.requests
    assert (
        request.startswith(b"GET /chat HTTP/1.1\r\n") and b"X-Forwarded-For: 127.0.0.1" in request
    )


async def test_a_backend_closing_before_it_answers_is_a_502_and_frees_the_slot(
    procs: ProcessGroup,
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 10")
        await writer.drain()
        writer.close()

    async with scripted(hang_up) as backend:
        gateway = gateway_for(procs, backend.entry)
        for _ in range(2):
            status, _, received = await raw_request("127.0.0.1", gateway.port, UPGRADE)
            assert status == 502 and json.loads(received)["error"] == "backend_unreachable"
        assert len(backend.requests) == 2  # both reached it: not a leaked slot's 503
        [snapshot] = gateway.admin("/snapshot")["backends"]
        assert snapshot["active"] == 0 and snapshot["connect_failures_total"] == 2


async def test_a_refused_connect_goes_to_the_next_candidate(procs: ProcessGroup) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    dead = {"address": f"127.0.0.1:{closed.getsockname()[1]}", "id": "dead"}
    closed.close()

    async with scripted(says(SWITCHED)) as backend:
        gateway = start_gateway(
            procs,
            [dead, backend.entry],
            balance="round_robin",
            limits={"max_connections_per_backend": 5},
            health={"enabled": False},
        )
        for _ in range(4):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(UPGRADE)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.close()
        assert len(backend.requests) == 4
        failures = {
            b["id"]: b["connect_failures_total"] for b in gateway.admin("/snapshot")["backends"]
        }
        assert failures["dead"] >= 1 and failures[backend.entry["id"]] == 0


async def test_an_answer_that_is_no_http_is_a_502_and_frees_the_slot(
    procs: ProcessGroup,
) -> None:
    async with scripted(says(b"nonsense\r\n\r\n")) as backend:
        gateway = gateway_for(procs, backend.entry)
        for _ in range(2):
            status, _, _ = await raw_request("127.0.0.1", gateway.port, UPGRADE)
            assert status == 502
        await wait_until(lambda: backend.closed == 2, within=5)
        assert active(gateway) == {backend.entry["id"]: 0}
