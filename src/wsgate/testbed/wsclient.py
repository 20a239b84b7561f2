"""A lean WebSocket client for the load generator: sans-I/O framing and a thin protocol.

The load generator must hold 10,000 idle sessions and drive tens of thousands of
messages a second from one Python process, so the client is built the way the
gateway is: an :class:`asyncio.Protocol` over a transport, with no stream
objects, no task per message and no per-frame objects on the hot path.

The pure part (:func:`opening_request`, :func:`parse_response_head`,
:func:`encode_frame`, :class:`FrameReader`) knows nothing of sockets and is
tested on bytes. It follows RFC 6455 as a client needs it: frames it sends are
masked (section 5.3); frames it receives are unmasked when a peer masks them
anyway (a byte-echo server sends the client's own frames back); fragmented
messages are reassembled (section 5.4); pings are answered (section 5.5.2) and
the peer's close code is echoed (section 5.5.1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import cast

__all__ = [
    "CloseInfo",
    "FrameReader",
    "Opcode",
    "ProtocolError",
    "ResponseHead",
    "WebSocketClient",
    "accept_key",
    "encode_frame",
    "opening_request",
    "parse_response_head",
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
_MAX_HEAD = 16 * 1024
_NO_STATUS = 1005
_ABNORMAL = 1006


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class ProtocolError(Exception):
    """The peer broke RFC 6455; the session is closed with 1002."""


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer for ``key`` (section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def opening_request(host: str, path: str, key: str, headers: dict[str, str] | None = None) -> bytes:
    """The client's opening handshake (section 4.1)."""
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


@dataclass
class ResponseHead:
    """The status line and headers of the server's answer to the opening handshake."""

    status: int
    reason: str
    headers: dict[str, str]
    cookies: list[str] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None and value.isdigit() else None


def parse_response_head(buffer: bytes | bytearray) -> tuple[ResponseHead, int] | None:
    """The head at the start of ``buffer`` and its length, or ``None`` while incomplete.

    Raises:
        ProtocolError: the bytes are not an HTTP/1.1 response head.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > _MAX_HEAD:
            raise ProtocolError("response head over 16 KiB")
        return None
    text = bytes(buffer[:end]).decode("latin-1")
    status_line, *header_lines = text.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for line in header_lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line: {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        if name == "set-cookie":
            cookies.append(value)
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return ResponseHead(
        int(parts[1]), parts[2] if len(parts) > 2 else "", headers, cookies
    ), end + 4


def encode_frame(opcode: int, payload: bytes, *, mask: bool = True, fin: bool = True) -> bytes:
    """One frame; a client masks every frame it sends (section 5.3)."""
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
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    if code == _NO_STATUS:
        return b""
    return struct.pack("!H", code) + reason.encode()


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    if not payload:
        return _NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode(errors="replace")


class FrameReader:
    """Turns received bytes into messages and control frames, without copying more than once.

    :meth:`feed` returns ``(opcode, payload)`` pairs: TEXT or BINARY for whole
    (reassembled) messages, and CLOSE, PING or PONG for control frames.
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
        # (fin, opcode, mask key or b"", payload length) of the frame being read.
        self._frame: tuple[bool, int, bytes, int] | None = None
        self._parts: list[bytes] = []
        self._got = 0
        self._fragments: list[bytes] = []
        self._fragments_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
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

    def _parse_header(
        self, data: bytes, offset: int
    ) -> tuple[tuple[bool, int, bytes, int], int] | None:
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
        if opcode >= 0x8:
            if length > 125 or not first & 0x80:
                raise ProtocolError("control frames are short and never fragmented")
        elif opcode not in (0x0, 0x1, 0x2):
            raise ProtocolError(f"unknown opcode {opcode}")
        if length > self.max_message:
            raise ProtocolError(f"frame of {length} bytes is over the limit")
        return (bool(first & 0x80), opcode, mask, length), position

    def _complete(
        self, frame: tuple[bool, int, bytes, int], payload: bytes, events: list[tuple[int, bytes]]
    ) -> None:
        fin, opcode, mask, _ = frame
        if mask:
            payload = apply_mask(payload, mask)
        if opcode >= 0x8:
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


@dataclass(frozen=True)
class CloseInfo:
    """How a session ended: the close code and reason, and who closed first."""

    code: int
    reason: str
    by_server: bool


class WebSocketClient(asyncio.Protocol):
    """One client session on a transport.

    ``opened`` resolves with the server's :class:`ResponseHead` (status 101 for a
    session; any other status with its body, after which the transport closes).
    ``closed`` resolves with :class:`CloseInfo`. Messages go to ``on_message``,
    called from ``data_received`` so a caller can answer without a task switch.
    """

    def __init__(
        self,
        request: bytes,
        key: str,
        loop: asyncio.AbstractEventLoop,
        close_timeout: float = 5.0,
    ) -> None:
        self.loop = loop
        self.opened: asyncio.Future[ResponseHead] = loop.create_future()
        self.closed: asyncio.Future[CloseInfo] = loop.create_future()
        self.on_message: Callable[[int, bytes], None] | None = None
        self.transport: asyncio.Transport | None = None
        self.response: ResponseHead | None = None
        self.opened_at = 0.0
        self.connect_microseconds = 0
        self._request = request
        self._expected_accept = accept_key(key)
        self._buffer = bytearray()
        self._reader = FrameReader()
        self._open = False
        self._close_sent: tuple[int, str] | None = None
        self.close_timeout = close_timeout
        self._close_timer: asyncio.TimerHandle | None = None

    @property
    def is_open(self) -> bool:
        return self._open and self._close_sent is None and not self.closed.done()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        if self._open:
            try:
                events = self._reader.feed(data)
            except ProtocolError as error:
                self._fail(1002, str(error))
                return
            for opcode, payload in events:
                if opcode <= 0x2:
                    if self.on_message is not None:
                        self.on_message(opcode, payload)
                else:
                    self._control(opcode, payload)
            return
        self._buffer += data
        if self.response is None:
            try:
                parsed = parse_response_head(self._buffer)
            except ProtocolError as error:
                self._handshake_failed(error)
                return
            if parsed is None:
                return
            self.response, used = parsed
            del self._buffer[:used]
            if self.response.status == 101:
                self._upgraded()
                return
        self._maybe_finish_rejection()

    def _upgraded(self) -> None:
        response = self.response
        assert response is not None
        if response.header("sec-websocket-accept") != self._expected_accept:
            self._handshake_failed(ProtocolError("wrong Sec-WebSocket-Accept"))
            return
        self._open = True
        self.opened_at = time.monotonic()
        rest = bytes(self._buffer)
        self._buffer = bytearray()
        self.opened.set_result(response)
        if rest:
            self.data_received(rest)

    def _maybe_finish_rejection(self) -> None:
        # A refusal (429, 503, ...) is read up to its Content-Length so the caller
        # sees the JSON reason; a body running to EOF ends in connection_lost.
        response = self.response
        assert response is not None and self.transport is not None
        wanted = response.content_length
        if wanted is None:
            if "chunked" in (response.header("transfer-encoding") or "").lower():
                wanted = 0
            elif len(self._buffer) < 64 * 1024:
                return
        if wanted is not None and len(self._buffer) < min(wanted, 64 * 1024):
            return
        response.body = bytes(self._buffer[:wanted])
        if not self.opened.done():
            self.opened.set_result(response)
        self.transport.close()

    def _handshake_failed(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def _control(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if opcode == Opcode.PING:
            if self._close_sent is None:
                transport.write(encode_frame(Opcode.PONG, payload))
        elif opcode == Opcode.CLOSE:
            try:
                code, reason = parse_close_payload(payload)
            except ProtocolError as error:
                self._fail(1002, str(error))
                return
            by_server = self._close_sent is None
            if by_server:
                # Echo the server's code (section 5.5.1), then let it close TCP.
                echoed = code if code != _NO_STATUS else _NO_STATUS
                transport.write(encode_frame(Opcode.CLOSE, close_payload(echoed, "")))
                self._close_sent = (code, reason)
                self._arm_close_timer()
            self._finish(CloseInfo(code, reason, by_server))

    def send(self, opcode: int, payload: bytes) -> bool:
        """Send one message; ``False`` when the session is no longer open."""
        if not self.is_open:
            return False
        assert self.transport is not None
        self.transport.write(encode_frame(opcode, payload))
        return True

    def send_text(self, text: str | bytes) -> bool:
        return self.send(Opcode.TEXT, text.encode() if isinstance(text, str) else text)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (the server answers, then closes TCP)."""
        if self.transport is None or self.closed.done():
            return
        if not self._open:
            self.transport.abort()
            return
        if self._close_sent is None:
            self._close_sent = (code, reason)
            self.transport.write(encode_frame(Opcode.CLOSE, close_payload(code, reason)))
            self._arm_close_timer()

    def abort(self) -> None:
        """Drop the connection without a closing handshake (a client that vanishes)."""
        if self.transport is not None:
            self.transport.abort()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and self.transport is not None:
            self._close_timer = self.loop.call_later(self.close_timeout, self.transport.abort)

    def _fail(self, code: int, reason: str) -> None:
        assert self.transport is not None
        if self._close_sent is None:
            self._close_sent = (code, reason)
            self.transport.write(encode_frame(Opcode.CLOSE, close_payload(code, reason[:100])))
        self._finish(CloseInfo(code, reason, by_server=False))
        self.transport.close()

    def _finish(self, info: CloseInfo) -> None:
        if not self.closed.done():
            self.closed.set_result(info)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if not self.opened.done():
            if self.response is not None:
                self.response.body = bytes(self._buffer)
                self.opened.set_result(self.response)
            else:
                self.opened.set_exception(
                    ConnectionError(f"connection closed during the handshake: {exc or 'EOF'}")
                )
        if self._close_sent is not None and self._open:
            code, reason = self._close_sent
            self._finish(CloseInfo(code, reason, by_server=False))
        self._finish(CloseInfo(_ABNORMAL, str(exc or "connection lost"), by_server=True))
