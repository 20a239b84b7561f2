"""Bad input on every path of the edge: a clean refusal, exact counts, and service goes on.

Each kind of bad input is sent a known number of times; the metrics must say
exactly that many, the backend must have seen none of them, and a good client
must still be served afterwards.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest
from edgetools import client_context, metric
from gwtools import open_one, pod_of, raw_request

from wsgate.edge.proxy_protocol import encode_v1, encode_v2
from wsgate.testbed.certs import TestCA
from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway

pytestmark = pytest.mark.slow

REQUEST = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def closed_without_answer(
    port: int, data: bytes, *, source: str = "127.0.0.1", wait: float = 10
) -> bool:
    """Send ``data``; True when the gateway closes the connection having sent nothing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), wait)
    except ConnectionResetError:
        answer = b""
    finally:
        writer.close()
    return answer == b""


async def http_status(port: int, data: bytes, source: str = "127.0.0.1") -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(data)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        return int(head.split()[1])
    finally:
        writer.close()


async def test_proxy_protocol_bad_headers(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs, backends, proxy_protocol={"trusted": ["127.0.0.1/32"], "timeout": "500ms"}
    )
    port = gateway.port
    malformed = [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n" + REQUEST,  # a port missing
        b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n" + REQUEST,
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))[:12] + b"\x31" + b"\x11\x00\x0c" + bytes(12),
    ]
    for data in malformed:
        assert await closed_without_answer(port, data)
    assert await closed_without_answer(port, b"PROXY TCP6 " + b"f" * 200)  # too long
    assert await closed_without_answer(port, REQUEST)  # a trusted source must send a header
    assert await closed_without_answer(port, b"PROXY TCP4 1.2.3.4")  # never finished: timeout
    # A connection that sends nothing and closes (a TCP health check) is no error.
    with socket.create_connection(("127.0.0.1", port)):
        pass
    # A source that is not trusted may not send a header: 400, as for any bad request.
    untrusted = encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)) + REQUEST
    assert await http_status(port, untrusted, source="127.0.0.9") == 400

    # Good headers still work, split across writes or not; v2 LOCAL keeps the peer.
    status, _, _ = await raw_request("127.0.0.1", port, encode_v2(None) + REQUEST)
    assert status == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    header = encode_v1(("198.51.100.7", 4444), ("127.0.0.1", port))
    for piece in (header[:9], header[9:], REQUEST):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).split()[1] == b"200"
    writer.close()
    peers = backends[0].stats()["peers"]
    assert peers == {"127.0.0.1": 1, "198.51.100.7": 1}, peers

    def errors(kind: str) -> float:
        return metric(gateway, "wsgate_proxy_protocol_errors_total", kind=kind)

    assert errors("malformed") == len(malformed)
    assert errors("too_long") == 1 and errors("not_proxy") == 1 and errors("timeout") == 1
    assert errors("untrusted") == 1
    assert metric(gateway, "wsgate_proxy_protocol_headers_total") == 2


async def test_tls_bad_input(procs: ProcessGroup) -> None:
    ca = TestCA()
    pair = ca.issue(procs.log_dir / "tls")
    backends = start_backends(procs, 1)
    tls = start_gateway(
        procs, backends, name="tls", tls={"cert": str(pair.cert), "key": str(pair.key)}
    )
    plain = start_gateway(procs, backends, name="plain")
    # Garbage before a ClientHello is closed; plain HTTP on the TLS port gets a plain 400.
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32)
    assert await closed_without_answer(tls.port, b"garbage!" + hello)
    assert await http_status(tls.port, REQUEST) == 400
    assert await http_status(tls.port, REQUEST) == 400
    # A handshake record whose content is garbage fails in OpenSSL.
    assert await closed_without_answer(tls.port, b"\x16\x03\x01\x00\x05hello")
    # A TLS client on the plain port gets a plain 400 (which its TLS layer cannot read).
    with pytest.raises(ssl.SSLError):
        await open_one(f"wss://localhost:{plain.port}/", ssl=client_context(ca))
    assert metric(plain, "wsgate_bad_requests_total", status="400") == 1
    # Both still serve.
    ws = await open_one(f"wss://localhost:{tls.port}/", ssl=client_context(ca))
    assert await pod_of(ws) == "pod-a"
    await ws.close()
    ws = await open_one(plain.ws_url)
    assert await pod_of(ws) == "pod-a"
    await ws.close()
    assert metric(tls, "wsgate_tls_handshake_failures_total", reason="not_tls") == 1
    assert metric(tls, "wsgate_tls_handshake_failures_total", reason="plain_http") == 2
    assert metric(tls, "wsgate_tls_handshake_failures_total", reason="tls_error") == 1
    assert metric(tls, "wsgate_tls_handshakes_total") == 1
    # None of it reached the backend: it saw the two good sessions only.
    assert backends[0].stats()["total_connections"] == 2


async def test_forwarded_for_of_ten_thousand_entries(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    trusted = {
        "trusted_proxies": ["127.0.0.1/32"],
        "limits": {"max_connections_per_backend": 100},
    }
    small = start_gateway(procs, backends, name="small", **trusted)
    large = start_gateway(procs, backends, name="large", max_head_size=1 << 20, **trusted)
    hops = ", ".join(["127.0.0.1"] * 9_999 + ["198.51.100.9"])
    request = f"GET /hello HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {hops}\r\n\r\n".encode()
    # Over the default head size: refused before anything is resolved.
    assert (await raw_request("127.0.0.1", small.port, request))[0] == 431
    # Within a raised head size: resolved, in bounded work (the walk stops at 64 hops).
    all_trusted = request.replace(b", 198.51.100.9", b", 127.0.0.1")
    assert (await raw_request("127.0.0.1", large.port, all_trusted))[0] == 200
    answers = await asyncio.gather(
        *(raw_request("127.0.0.1", large.port, request) for _ in range(20))
    )
    assert [status for status, _, _ in answers] == [200] * 20
    peers = backends[0].stats()["peers"]
    assert peers == {"127.0.0.1": 1, "198.51.100.9": 20}, peers
    assert metric(small, "wsgate_bad_requests_total", status="431") == 1
