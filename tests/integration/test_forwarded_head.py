"""What a backend receives of a request, read by a backend that keeps every head it is sent."""

from __future__ import annotations

import asyncio

from gwtools import raw_request, wait_until

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_gateway


class HeadKeeper:
    """A backend on a raw socket: it keeps each request head and answers ``200 ok``."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_an_http_1_0_request_without_host_reaches_the_backend_with_one(
    procs: ProcessGroup,
) -> None:
    # HTTP/1.0 lets a client leave Host out; the gateway speaks HTTP/1.1 to the
    # backend, where a request without Host is invalid (RFC 9112 3.2).
    keeper = HeadKeeper()
    port = await keeper.start()
    try:
        gateway = start_gateway(procs, [{"address": f"127.0.0.1:{port}", "id": "keeper"}])
        await wait_until(lambda: any(h.startswith(b"GET /health") for h in keeper.heads))
        status, _, body = await raw_request("127.0.0.1", gateway.port, b"GET /x HTTP/1.0\r\n\r\n")
        assert (status, body) == (200, b"ok")
        status, _, _ = await raw_request(
            "127.0.0.1", gateway.port, b"GET /y HTTP/1.0\r\nHost: app.example\r\n\r\n"
        )
        assert status == 200
        [no_host] = [h for h in keeper.heads if h.startswith(b"GET /x ")]
        [with_host] = [h for h in keeper.heads if h.startswith(b"GET /y ")]
        lines = no_host.split(b"\r\n")
        assert lines[0] == b"GET /x HTTP/1.1"
        assert [line for line in lines if line.lower().startswith(b"host:")] == [
            f"Host: 127.0.0.1:{port}".encode()
        ]
        host_lines = [
            line for line in with_host.split(b"\r\n") if line.lower().startswith(b"host:")
        ]
        assert host_lines == [b"Host: app.example"]
    finally:
        keeper.close()
