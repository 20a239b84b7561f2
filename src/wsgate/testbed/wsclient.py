"""A lean WebSocket client for the load generator: sans-I/O framing and a thin protocol.

The load generator must hold 10,000 idle sessions and drive tens of thousands of
messages a second from one Python process, so the client is built the way the
gateway is: an :class:`asyncio.Protocol` over a transport, with no stream
objects, no task per message and no per-frame objects on the hot path.

The bytes are built and read by :mod:`wsgate.wire` and
:func:`parse_response_head`, which know nothing of sockets and are tested on
bytes. The protocol follows RFC 6455 as a client needs it: frames it sends are
masked (section 5.3); fragmented messages are reassembled (section 5.4); pings
are answered (section 5.5.2) and the peer's close code is echoed (section 5.5.1).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from wsgate.wire import (
    CloseCode,
    FrameReader,
    Opcode,
    ProtocolError,
    accept_key,
    close_payload,
    encode_frame,
    parse_close_payload,
)

__all__ = ["CloseInfo", "ResponseHead", "WebSocketClient", "parse_response_head"]

_MAX_HEAD = 16 * 1024


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
                self._fail(CloseCode.PROTOCOL_ERROR, str(error))
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
                self._fail(CloseCode.PROTOCOL_ERROR, str(error))
                return
            by_server = self._close_sent is None
            if by_server:
                # Echo the server's code (section 5.5.1), then let it close TCP.
                try:
                    echoed = close_payload(code)
                except ValueError:  # a code no endpoint may send: answer with none
                    echoed = b""
                transport.write(encode_frame(Opcode.CLOSE, echoed))
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

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
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
        self._finish(
            CloseInfo(CloseCode.ABNORMAL_CLOSURE, str(exc or "connection lost"), by_server=True)
        )
