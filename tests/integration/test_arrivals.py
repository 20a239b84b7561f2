"""Connections served from their socket, as they arrive: every way a head can come.

The plain listener reads what a connection has sent when it is accepted, or
soon after. A whole upgrade head is served without an event-loop transport;
anything else gets one. These tests put scripted backends behind a real
``wsgate serve`` with one session per backend, and judge by what the far
sides saw: the bytes the client received, what the backend was sent and when
it saw its connection closed, and the gateway's count of the backend's
sessions (a leaked slot turns the next upgrade into a 503).
"""

from __future__ import annotations

import asyncio
import json

from gwtools import raw_request, wait_until
from scripted import SWITCHED, UPGRADE, ScriptedBackend, active, gateway_for, says, scripted

from wsgate.testbed.processes import ProcessGroup


async def switched(
    port: int, pieces: list[bytes], *, pause: float = 0.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send ``pieces`` (``pause`` apart) and read the answer's head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for piece in pieces:
        await asyncio.sleep(pause)
        writer.write(piece)
        await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


async def hang_up(backend: ScriptedBackend, writer: asyncio.StreamWriter, closed: int) -> None:
    """Close the client; wait for the backend to have seen ``closed`` connections end."""
    writer.close()
    await wait_until(lambda: backend.closed == closed, within=5)


async def test_a_head_sent_in_pieces_is_served_once_whole(procs: ProcessGroup) -> None:
    async with scripted(says(SWITCHED)) as backend:
        gateway = gateway_for(procs, backend.entry)
        half = len(UPGRADE) // 2
        # The first piece may arrive with the connection or after it; the second later.
        _, writer, head = await switched(gateway.port, [UPGRADE[:half], UPGRADE[half:]], pause=0.05)
        assert head.startswith(b"HTTP/1.1 101 ")
        request = backend.requests[0]
        assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in request
        assert request.endswith(b"\r\n\r\n")
        await hang_up(backend, writer, 1)
        assert active(gateway) == {backend.entry["id"]: 0}


async def test_a_client_silent_for_a_while_is_still_served(procs: ProcessGroup) -> None:
    async with scripted(says(SWITCHED)) as backend:
        gateway = gateway_for(procs, backend.entry)
        # Longer than the kernel holds a connection with nothing to read: it is
        # accepted empty, and the downstream reads the head on a transport.
        _, writer, head = await switched(gateway.port, [UPGRADE], pause=1.5)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert len(backend.requests) == 1
        await hang_up(backend, writer, 1)


async def test_bytes_behind_the_head_reach_the_backend_after_it(procs: ProcessGroup) -> None:
    early = b"\x81\x85\x00\x00\x00\x00hello"  # a masked text frame sent with the head
    seen: list[bytes] = []

    async def switch_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(SWITCHED)
        await writer.drain()
        seen.append(await reader.readexactly(len(early)))

    async with scripted(switch_then_read) as backend:
        gateway = gateway_for(procs, backend.entry)
        _, writer, head = await switched(gateway.port, [UPGRADE + early])
        assert head.startswith(b"HTTP/1.1 101 ")
        await wait_until(lambda: seen == [early], within=5)
        await hang_up(backend, writer, 1)


async def test_a_rejection_reaches_the_client_whole_and_the_count_stays_exact(
    procs: ProcessGroup,
) -> None:
    async with scripted(says(SWITCHED)) as backend:
        gateway = gateway_for(procs, backend.entry)
        _, holder, head = await switched(gateway.port, [UPGRADE])
        assert head.startswith(b"HTTP/1.1 101 ")
        for _ in range(3):
            status, headers, body = await raw_request("127.0.0.1", gateway.port, UPGRADE)
            assert status == 503
            assert headers.get("retry-after") and json.loads(body)["error"] == "no_capacity"
        assert len(backend.requests) == 1  # no rejected client reached the backend
        await hang_up(backend, holder, 1)
        await wait_until(lambda: active(gateway) == {backend.entry["id"]: 0}, within=5)
        _, writer, head = await switched(gateway.port, [UPGRADE])
        assert head.startswith(b"HTTP/1.1 101 ")  # the slot came back
        await hang_up(backend, writer, 2)


async def test_a_client_that_leaves_while_its_backend_is_slow_frees_the_slot(
    procs: ProcessGroup,
) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):  # never answers: only the gateway's close ends it
            pass

    async with scripted(slow) as backend:
        gateway = gateway_for(procs, backend.entry)
        _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(UPGRADE)
        await wait_until(lambda: len(backend.requests) == 1, within=5)
        writer.close()
        # The gateway saw the client go and closed the backend's connection with it.
        await wait_until(lambda: backend.closed == 1, within=5)
        await wait_until(lambda: active(gateway) == {backend.entry["id"]: 0}, within=5)


async def test_a_client_that_leaves_while_queued_gives_its_place_up(procs: ProcessGroup) -> None:
    async with scripted(says(SWITCHED)) as backend:
        gateway = gateway_for(
            procs,
            backend.entry,
            limits={"max_connections_per_backend": 1, "queue": {"max": 1, "timeout": "10s"}},
        )
        _, holder, _ = await switched(gateway.port, [UPGRADE])
        _, waiter = await asyncio.open_connection("127.0.0.1", gateway.port)
        waiter.write(UPGRADE)
        await asyncio.sleep(0.3)  # queued behind the holder
        waiter.close()
        await asyncio.sleep(0.3)
        # Its place is free: a newcomer is queued in it rather than refused.
        newcomer = asyncio.create_task(switched(gateway.port, [UPGRADE]))
        await asyncio.sleep(0.3)
        assert not newcomer.done()
        await hang_up(backend, holder, 1)
        _, writer, head = await newcomer
        assert head.startswith(b"HTTP/1.1 101 ")
        # The client that left never reached the backend: the holder, then the newcomer.
        assert len(backend.requests) == 2
        await hang_up(backend, writer, 2)
