"""The few bytes of WebSocket the bench needs, without I/O.

The echo backend answers the opening handshake itself and then echoes raw
bytes; the driver sends pre-built masked frames and counts the bytes that come
back. Neither decodes frames on the hot path, so neither is what a measurement
measures.
"""

from __future__ import annotations

import base64
import hashlib
import os

__all__ = [
    "HEAD_END",
    "HandshakeError",
    "masked_frame",
    "parse_request_head",
    "response_status",
    "upgrade_request",
    "upgrade_response",
    "websocket_accept",
]

HEAD_END = b"\r\n\r\n"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_OPCODE_BINARY = 0x2


class HandshakeError(Exception):
    """The far side did not complete the opening handshake as RFC 6455 says."""


def websocket_accept(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip() + _GUID).digest())


def upgrade_request(host: str, port: int, key: bytes, path: str = "/") -> bytes:
    """A client's opening handshake; the same bytes serve every connection of a run."""
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode('ascii')}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "\r\n"
    ).encode("ascii")


def upgrade_response(key: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n"
        b"\r\n"
    )


def parse_request_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The request line and the headers (names lower-cased) of a head without its blank line."""
    lines = head.split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def response_status(head: bytes) -> int:
    """The status code of a response head, or raise :class:`HandshakeError`."""
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HandshakeError(f"not an HTTP response: {head[:60]!r}")
    return int(parts[1])


def masked_frame(payload_size: int, *, mask: bytes | None = None) -> bytes:
    """One final binary frame, masked as a client must send it (RFC 6455 §5.3).

    Built once per run and sent as is: masking costs nothing on the hot path.
    """
    mask = os.urandom(4) if mask is None else mask
    if len(mask) != 4:
        raise ValueError("a masking key is 4 bytes")
    if payload_size < 126:
        header = bytes((0x80 | _OPCODE_BINARY, 0x80 | payload_size))
    elif payload_size < 1 << 16:
        header = bytes((0x80 | _OPCODE_BINARY, 0x80 | 126)) + payload_size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | _OPCODE_BINARY, 0x80 | 127)) + payload_size.to_bytes(8, "big")
    payload = bytes(i & 0xFF for i in range(payload_size))
    key_stream = (mask * (payload_size // 4 + 1))[:payload_size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key_stream, "big")).to_bytes(
        payload_size, "big"
    )
    return header + mask + masked
