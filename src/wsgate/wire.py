"""WebSocket on the wire (RFC 6455), as bytes in and bytes out: no sockets, no C extension.

Everything the gateway, the load generator's client and the bench write or read
of the WebSocket protocol itself lives here, once:

- :class:`CloseCode` and :class:`Opcode`, and which close codes may be sent
  (:func:`check_close_code`, section 7.4);
- the opening handshake: the client's request and the server's ``101`` with its
  ``Sec-WebSocket-Accept`` (sections 4.1 and 4.2.2);
- frames as a client sends them (masked, section 5.3) or a server does (not);
  close frames and their payloads (section 5.5.1);
- :class:`FrameReader`, which turns received bytes into whole messages and
  control frames, for clients that must read what they are sent.

The gateway's relay never decodes frames; the boundary tracker it uses is in C
beside the relay (:mod:`wsgate.gateway.frames`). Validating a configuration
needs only this module.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from collections.abc import Mapping
from enum import IntEnum

__all__ = [
    "CloseCode",
    "FrameReader",
    "Opcode",
    "ProtocolError",
    "accept_key",
    "apply_mask",
    "check_close_code",
    "close_frame",
    "close_payload",
    "encode_frame",
    "masked_close_frame",
    "opening_request",
    "parse_close_payload",
    "upgrade_response",
]

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the C speedups ship in websockets' wheels

    def apply_mask(data: bytes | bytearray | memoryview[int], mask: bytes | bytearray) -> bytes:
        length = len(data)
        repeated = (mask * (length // 4 + 1))[:length]
        return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            length, "big"
        )


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_CONTROL_PAYLOAD = 125


class Opcode(IntEnum):
    """Frame opcodes (section 5.2)."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    """Close codes (section 7.4.1 and the IANA registry)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001  # the gateway drains, or a backend goes away
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never sent: a close frame without a code
    ABNORMAL_CLOSURE = 1006  # never sent: the connection ended without a close frame
    INVALID_PAYLOAD = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # rebalancing or maximum connection duration
    TRY_AGAIN_LATER = 1013  # over capacity
    BAD_GATEWAY = 1014


# 1004 is reserved, 1005, 1006 and 1015 must never appear on the wire, 1016-2999
# are unassigned; 3000-3999 are registered for libraries and 4000-4999 private.
_SENDABLE_BELOW_3000 = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


class ProtocolError(Exception):
    """The peer broke RFC 6455; a client closes such a session with 1002."""


def check_close_code(code: int) -> int:
    """Return ``code`` if an endpoint may send it in a close frame, else raise ValueError."""
    if code in _SENDABLE_BELOW_3000 or 3000 <= code <= 4999:
        return code
    raise ValueError(
        f"close code {code} cannot be sent; use 1000-1003, 1007-1014 or 3000-4999 "
        "(1012 for a restart, 1013 to ask for a later retry)"
    )


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer for ``key`` (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.strip().encode() + _GUID).digest()).decode()


def opening_request(
    host: str, path: str, key: str, headers: Mapping[str, str] | None = None
) -> bytes:
    """The client's opening handshake (section 4.1); ``host`` is the Host header's value."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def upgrade_response(key: str) -> bytes:
    """The server's ``101`` answer to an opening handshake that sent ``key``."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        "\r\n"
    ).encode("ascii")


def encode_frame(
    opcode: int,
    payload: bytes,
    *,
    mask: bool = True,
    fin: bool = True,
    mask_key: bytes | None = None,
) -> bytes:
    """One frame. A client masks every frame it sends (section 5.3), a server none.

    The masking key is random unless given (section 5.3 wants it unpredictable);
    a run that sends the same frame many times builds it once with a fixed key.

    Raises:
        ValueError: a ``mask_key`` that is not 4 bytes.
    """
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if not mask:
        return head + payload
    key = os.urandom(4) if mask_key is None else mask_key
    if len(key) != 4:
        raise ValueError("a masking key is 4 bytes")
    return head + key + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame (an empty one, meaning no code, is ``b""``).

    Raises:
        ValueError: the code cannot be sent, or the reason is longer than the
            123 bytes of UTF-8 a control frame leaves for it.
    """
    payload = check_close_code(code).to_bytes(2, "big") + reason.encode()
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise ValueError(f"close reason is {len(payload) - 2} bytes of UTF-8; at most 123 fit")
    return payload


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """The code and reason of a received close frame (1005 when it carries none).

    Raises:
        ProtocolError: a one-byte payload, which no code fits.
    """
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    return int.from_bytes(payload[:2], "big"), payload[2:].decode(errors="replace")


def close_frame(code: int, reason: str = "") -> bytes:
    """A complete, unmasked close frame, as a server sends it to a client.

    Raises:
        ValueError: as :func:`close_payload`.
    """
    return encode_frame(Opcode.CLOSE, close_payload(code, reason), mask=False)


def masked_close_frame(code: int, reason: str = "", *, mask_key: bytes | None = None) -> bytes:
    """A complete, masked close frame, as a client (the gateway, to a backend) sends it.

    Raises:
        ValueError: as :func:`close_payload`, or a ``mask_key`` that is not 4 bytes.
    """
    return encode_frame(Opcode.CLOSE, close_payload(code, reason), mask_key=mask_key)


# (fin, opcode, mask key or b"", payload length) of a frame whose header was read.
_Header = tuple[bool, int, bytes, int]


class FrameReader:
    """Turns received bytes into messages and control frames, without copying more than once.

    :meth:`feed` returns ``(opcode, payload)`` pairs: TEXT or BINARY for whole
    (reassembled, section 5.4) messages, and CLOSE, PING or PONG for control
    frames. Masked frames are unmasked (a byte-echo server sends a client's own
    frames back).
    """

    __slots__ = (
        "_fragments",
        "_fragments_opcode",
        "_frame",
        "_got",
        "_head",
        "_parts",
        "max_message",
    )

    def __init__(self, max_message: int = 64 * 1024 * 1024) -> None:
        self.max_message = max_message
        self._head = b""
        self._frame: _Header | None = None
        self._parts: list[bytes] = []
        self._got = 0
        self._fragments: list[bytes] = []
        self._fragments_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The messages and control frames completed by ``data``.

        Raises:
            ProtocolError: the bytes break section 5 (reserved bits, bad opcodes,
                long or fragmented control frames, a message over the limit).
        """
        events: list[tuple[int, bytes]] = []
        if self._head:
            data = self._head + data
            self._head = b""
        offset = 0
        size = len(data)
        while offset < size:
            frame = self._frame
            if frame is None:
                header = self._parse_header(data, offset)
                if header is None:
                    self._head = data[offset:]
                    break
                frame, offset = header
                self._frame = frame
                if frame[3] == 0:
                    self._frame = None
                    self._complete(frame, b"", events)
                    continue
            length = frame[3]
            if not self._parts and size - offset >= length:
                payload = data[offset : offset + length]
                offset += length
            else:
                take = min(length - self._got, size - offset)
                self._parts.append(data[offset : offset + take])
                self._got += take
                offset += take
                if self._got < length:
                    break
                payload = b"".join(self._parts)
                self._parts = []
                self._got = 0
            self._frame = None
            self._complete(frame, payload, events)
        if self._frame is None and not self._head and offset < size:
            self._head = data[offset:]
        return events

    def _parse_header(self, data: bytes, offset: int) -> tuple[_Header, int] | None:
        available = len(data) - offset
        if available < 2:
            return None
        first, second = data[offset], data[offset + 1]
        if first & 0x70:
            raise ProtocolError("reserved bits set without a negotiated extension")
        opcode = first & 0x0F
        length = second & 0x7F
        position = offset + 2
        if length == 126:
            if available < 4:
                return None
            length = int.from_bytes(data[position : position + 2], "big")
            position += 2
        elif length == 127:
            if available < 10:
                return None
            length = int.from_bytes(data[position : position + 8], "big")
            position += 8
        mask = b""
        if second & 0x80:
            if len(data) < position + 4:
                return None
            mask = data[position : position + 4]
            position += 4
        if opcode >= Opcode.CLOSE:
            if length > _MAX_CONTROL_PAYLOAD or not first & 0x80:
                raise ProtocolError("control frames are short and never fragmented")
        elif opcode not in (Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY):
            raise ProtocolError(f"unknown opcode {opcode}")
        if length > self.max_message:
            raise ProtocolError(f"frame of {length} bytes is over the limit")
        return (bool(first & 0x80), opcode, mask, length), position

    def _complete(self, frame: _Header, payload: bytes, events: list[tuple[int, bytes]]) -> None:
        fin, opcode, mask, _ = frame
        if mask:
            payload = apply_mask(payload, mask)
        if opcode >= Opcode.CLOSE:
            events.append((opcode, payload))
            return
        if opcode == Opcode.CONTINUATION:
            if not self._fragments_opcode:
                raise ProtocolError("continuation frame without a message to continue")
            self._fragments.append(payload)
            if sum(map(len, self._fragments)) > self.max_message:
                raise ProtocolError("message over the limit")
            if fin:
                events.append((self._fragments_opcode, b"".join(self._fragments)))
                self._fragments = []
                self._fragments_opcode = 0
            return
        if self._fragments_opcode:
            raise ProtocolError("new message before the previous one ended")
        if fin:
            events.append((opcode, payload))
        else:
            self._fragments_opcode = opcode
            self._fragments = [payload]
