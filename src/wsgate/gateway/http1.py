"""HTTP/1.1 message framing as events, driven by httptools, with no sockets.

:class:`RequestReader` and :class:`ResponseReader` take bytes and return events
(``Head``, ``Body``, ``End``, ``Upgrade``), in the manner of h11: the protocols
in :mod:`.downstream` and :mod:`.upstream` only move bytes in and out. Problems a client can
cause raise :class:`BadMessage` carrying the status to answer with.

:func:`upgrade_request` and :func:`switching_response` read the two heads of an
upgrade that arrive whole (the client's, the backend's 101). The plainest heads,
nearly all of them, are read in one call into C (``_heads.c``), which also
indexes their fields and lays out those forwarded as they are; any other is
read by the readers here, so the answer is the readers' either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httptools

from wsgate.gateway import _heads
from wsgate.gateway.head import (
    HOP_BY_HOP,
    NOT_FORWARDED,
    RequestHead,
    ResponseHead,
    request_problem,
    upgrade_problem,
)

__all__ = [
    "BadMessage",
    "Body",
    "End",
    "Event",
    "Head",
    "RequestReader",
    "ResponseReader",
    "Upgrade",
    "read_switching_response",
    "read_upgrade_request",
    "switching_response",
    "upgrade_request",
]


class BadMessage(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


# Not frozen: a frozen dataclass sets each field through object.__setattr__,
# which doubles the cost of making one, and every message makes a few.
@dataclass(slots=True)
class Head:
    head: RequestHead | ResponseHead


@dataclass(slots=True)
class Body:
    data: bytes


@dataclass(slots=True)
class End:
    pass


@dataclass(slots=True)
class Upgrade:
    """The head was an accepted upgrade; ``rest`` is what followed it (already the new protocol)."""

    rest: bytes


Event = Head | Body | End | Upgrade
_END = End()


class _Detached:
    """Stands in for the parser of an upgraded connection; nothing more is HTTP."""

    def feed_data(self, data: bytes) -> None:
        raise RuntimeError("the connection was upgraded; its bytes are not HTTP")


_DETACHED: Any = _Detached()


def _framing(head: RequestHead | ResponseHead) -> tuple[bool, int | None]:
    """(chunked, Content-Length) of a message; ValueError for a bad length."""
    encoding = head.get(b"transfer-encoding")
    length = head.get(b"content-length")
    return (encoding is not None and b"chunked" in encoding.lower()), (
        int(length) if length is not None else None
    )


class RequestReader:
    """Reads requests one after another from a client connection."""

    def __init__(self, max_head_size: int = 16 * 1024):
        self.max_head_size = max_head_size
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._head: RequestHead | None = None
        self._url = b""
        self._in_head = False
        self._head_bytes = 0
        self._head_size = 0  # of the head being parsed, counted as its headers arrive
        self._cr_before_request = False  # a CR ended the last read, before any request line
        self.upgraded = False
        # A malformed request after complete ones in the same read: answered
        # once those are (see :meth:`_failed`); the next feed raises it.
        self.failed: BadMessage | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse ``data``; return the events it completed."""
        if self.upgraded:
            raise RuntimeError("the connection was upgraded; its bytes are not HTTP")
        if self._head is None and self._bare_cr_before_request(data):
            raise BadMessage(400, "malformed request: a bare CR before the request line")
        if self.failed is not None:
            raise self.failed
        events = self._events = []
        if self._in_head or self._head is None:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            offset = upgrade.args[0]
            self.upgraded = True
            events.append(Upgrade(data[offset:]))
        except httptools.HttpParserCallbackError as error:
            if not isinstance(error.__context__, BadMessage):
                raise
            return self._failed(events, error.__context__)
        except httptools.HttpParserError as error:
            if self._in_head and self._head_bytes > self.max_head_size:
                return self._failed(events, BadMessage(431, "request head too large"))
            return self._failed(events, BadMessage(400, f"malformed request: {error}"))
        if self._in_head and self._head_bytes > self.max_head_size:
            raise BadMessage(431, "request head too large")
        return events

    def _failed(self, events: list[Event], failure: BadMessage) -> list[Event]:
        """Raise ``failure``, unless it is a later message's: then keep it in ``failed``.

        The requests that ended before the bad one in the same read are
        returned and answered first, as they would be had the bad bytes come
        in a read of their own: a verdict does not depend on where reads end.
        """
        if not events or events[-1] is not _END:
            raise failure
        self.failed = failure
        return events

    def _bare_cr_before_request(self, data: bytes) -> bool:
        """Whether the line ends before a request line hold a CR without its LF.

        RFC 9112 section 2.2 lets a server ignore empty lines (CRLF) before a
        request line, and llhttp skips any run of CR and LF there; a bare CR is
        invalid wherever it stands. A CRLF split across reads is still a CRLF.
        """
        cr = self._cr_before_request
        for byte in data:
            if cr and byte != 0x0A:
                return True
            if byte not in (0x0D, 0x0A):
                self._cr_before_request = False
                return False
            cr = byte == 0x0D
        self._cr_before_request = cr
        return False

    def detach(self) -> None:
        """Drop the parser (it refers back to this reader): the connection is upgraded."""
        self._parser = _DETACHED

    @property
    def idle(self) -> bool:
        """True between requests: no byte of a next request has arrived."""
        return self._head is None and self._head_bytes == 0

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_head = True
        self._head = RequestHead()
        self._url = b""
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._head is not None
        # llhttp drops the whitespace before a value; the field's value has none after
        # either (RFC 9112 5), and a backend must not be given a choice there.
        value = value.rstrip(b" \t")
        self._head.headers.append((name, value))
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        head.method = parser.get_method()
        head.target = self._url
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        head.upgrade = parser.should_upgrade()
        # A whole head can arrive in one read: measure it as well as the reads.
        if len(head.target) + self._head_size > self.max_head_size:
            raise BadMessage(431, "request head too large")
        try:
            head.chunked, head.content_length = _framing(head)
        except ValueError:
            raise BadMessage(400, "invalid Content-Length") from None
        problem = request_problem(head)
        if problem is not None:
            raise BadMessage(400, problem)
        self._in_head = False
        self._head_bytes = 0
        self._events.append(Head(head))

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._events.append(_END)
        self._head = None


class ResponseReader:
    """Reads the responses of one backend connection.

    ``expect_no_body()`` must be called before feeding the answer to a HEAD
    request: httptools cannot know that such a response has no body.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[Event] = []
        self._head: ResponseHead | None = None
        self._no_body = False
        self.upgraded = False
        self.reusable = True

    def detach(self) -> None:
        """Drop the parser (it refers back to this reader): the connection is upgraded."""
        self._parser = _DETACHED

    def expect_no_body(self) -> None:
        self._no_body = True

    def feed(self, data: bytes) -> list[Event]:
        events = self._events = []
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgraded = True
            events.append(Upgrade(data[upgrade.args[0] :]))
        except httptools.HttpParserError as error:
            if self._no_body and self._head is None:
                return events  # bytes of a body we chose to ignore
            raise BadMessage(502, f"malformed response from backend: {error}") from None
        return events

    def feed_eof(self) -> list[Event]:
        """The backend closed: a close-delimited body ends here."""
        events = self._events = []
        if self._head is not None and not self._head.chunked and self._head.content_length is None:
            events.append(_END)
            self._head = None
        return events

    @property
    def in_message(self) -> bool:
        return self._head is not None

    def on_message_begin(self) -> None:
        self._head = ResponseHead()

    def on_status(self, status: bytes) -> None:
        assert self._head is not None
        self._head.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self._head is not None
        self._head.headers.append((name, value))

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        parser = self._parser
        head.status = parser.get_status_code()
        head.version = parser.get_http_version()
        head.keep_alive = parser.should_keep_alive()
        try:
            head.chunked, head.content_length = _framing(head)
        except ValueError:
            raise BadMessage(502, "invalid Content-Length from backend") from None
        self._events.append(Head(head))
        if not head.keep_alive:
            self.reusable = False
        if self._no_body:
            # httptools cannot be told to skip the body, so the message ends here
            # for us and the connection is not reused (see ``reusable``).
            self._events.append(_END)
            self._head = None
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._events.append(_END)
        self._head = None


def upgrade_request(data: bytes, max_head_size: int) -> tuple[RequestHead, bytes] | None:
    """The head ``data`` starts with, and what follows it, if it is a WebSocket upgrade to forward.

    None for anything else: part of a head, a request that is no upgrade, one with
    a body, one the reader refuses or one with an :func:`~.head.upgrade_problem`
    (the downstream answers those on a transport).
    """
    plain = _heads.upgrade_request(data, max_head_size, NOT_FORWARDED)
    if plain is not None:
        # C gives only valid handshakes: the reader's checks and the upgrade's pass.
        method, target, headers, index, end_to_end, end = plain
        head = RequestHead(
            headers=headers, method=method, target=target, upgrade=True,
            _index=index, end_to_end=end_to_end,
        )  # fmt: skip
        return head, data[end:]
    return read_upgrade_request(data, max_head_size)


def read_upgrade_request(data: bytes, max_head_size: int) -> tuple[RequestHead, bytes] | None:
    """:func:`upgrade_request` by the reader alone, for a head of any shape."""
    if b"\r\n\r\n" not in data:
        return None
    events = _read_once(RequestReader(max_head_size), data)
    # A whole upgrade head reads as its head, its end (no body) and the switch.
    if events is None or len(events) != 3:
        return None
    found, _, upgrade = events
    if not isinstance(found, Head) or not isinstance(upgrade, Upgrade):
        return None
    head = found.head
    assert isinstance(head, RequestHead)
    if upgrade_problem(head) is not None:
        return None  # the downstream answers it
    return head, upgrade.rest


def switching_response(answer: bytes) -> tuple[ResponseHead, bytes] | None:
    """The head of a backend's answer and what followed it, if it is a 101 that upgraded."""
    plain = _heads.switching_response(answer, HOP_BY_HOP)
    if plain is not None:
        reason, headers, index, end_to_end, end = plain
        head = ResponseHead(
            headers=headers, status=101, reason=reason, _index=index, end_to_end=end_to_end
        )
        return head, answer[end:]
    return read_switching_response(answer)


def read_switching_response(answer: bytes) -> tuple[ResponseHead, bytes] | None:
    """:func:`switching_response` by the reader alone, for a head of any shape."""
    events = _read_once(ResponseReader(), answer)
    head = None
    for event in events or ():
        if isinstance(event, Head):
            assert isinstance(event.head, ResponseHead)
            head = event.head
        elif isinstance(event, Upgrade):
            return (head, event.rest) if head is not None and head.status == 101 else None
    return None


def _read_once(reader: RequestReader | ResponseReader, data: bytes) -> list[Event] | None:
    """The events of ``data`` read by a reader made for it, or None if it is malformed."""
    try:
        return reader.feed(data)
    except BadMessage:
        return None
    finally:
        reader.detach()  # freed by reference counting, not left to the collector
