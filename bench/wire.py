"""The few bytes of HTTP around a WebSocket handshake the bench needs, without I/O.

The echo backend answers the opening handshake itself and then echoes raw
bytes; the driver sends pre-built masked frames and counts the bytes that come
back. Neither decodes frames on the hot path, so neither is what a measurement
measures. The WebSocket bytes themselves come from :mod:`wsgate.wire`.
"""

from __future__ import annotations

from wsgate.wire import Opcode, encode_frame

__all__ = [
    "HEAD_END",
    "HandshakeError",
    "masked_frame",
    "parse_request_head",
    "response_status",
]

HEAD_END = b"\r\n\r\n"


class HandshakeError(Exception):
    """The far side did not complete the opening handshake as RFC 6455 says."""


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
    """One final binary frame of ``payload_size`` counting bytes, masked as a client sends it.

    Built once per run and sent as is: masking costs nothing on the hot path.
    """
    payload = bytes(i & 0xFF for i in range(payload_size))
    return encode_frame(Opcode.BINARY, payload, mask_key=mask)
