"""The event-loop relay (TLS sessions) says when its backend socket is closed, as the C
relay does: the session's slot is freed then, not when the session ends."""

from __future__ import annotations

import asyncio
import socket

from wsgate.gateway.transport_link import TransportLink


async def _pair(loop: asyncio.AbstractEventLoop) -> tuple[asyncio.Transport, socket.socket]:
    """A transport on the gateway's side and the blocking socket at its far end."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        far = socket.create_connection(server.getsockname(), timeout=5)
        near, _ = server.accept()
    near.setblocking(False)
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=near)
    transport.pause_reading()
    return transport, far


async def test_backend_closed_is_reported_once_its_socket_is_closed() -> None:
    loop = asyncio.get_running_loop()
    client, client_far = await _pair(loop)
    backend, backend_far = await _pair(loop)
    events: list[str] = []
    link = TransportLink(
        client,
        backend,
        b"",
        object(),
        lambda _owner, outcome: events.append(outcome),
        on_backend_closed=lambda _owner: events.append("backend socket closed"),
        linger=2.0,
    )
    try:
        client_far.sendall(b"hello")
        assert await asyncio.to_thread(backend_far.recv, 5) == b"hello"
        client_far.close()
        for _ in range(200):
            if events:
                break
            await asyncio.sleep(0.01)
        # The session has ended, but the backend's socket is still open: no report yet.
        assert events == ["client_closed"]
        link.finish()
        # The backend itself sees its connection closed...
        assert await asyncio.to_thread(backend_far.recv, 5) == b""
        for _ in range(200):
            if len(events) > 1:
                break
            await asyncio.sleep(0.01)
        # ...and the owner hears of it, once.
        assert events == ["client_closed", "backend socket closed"]
    finally:
        backend_far.close()
        client.abort()
        backend.abort()
