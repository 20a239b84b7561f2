"""Request and response heads, without sockets.

The gateway reads a request head with httptools, decides from it (WebSocket
upgrade or plain HTTP, affinity key, validity), and writes a rewritten head to
the backend. Everything here is bytes in, values out, so it is tested directly.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus

from wsgate.gateway import _heads

__all__ = [
    "HOP_BY_HOP",
    "NOT_FORWARDED",
    "UNSUPPORTED_VERSION",
    "WEBSOCKET_VERSION",
    "RequestHead",
    "ResponseHead",
    "cookie_value",
    "error_response",
    "render_request",
    "render_response",
    "request_problem",
    "retry_after_seconds",
    "upgrade_problem",
    "websocket_problem",
]

Header = tuple[bytes, bytes]

# Headers that describe one hop, never forwarded as they are (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


@dataclass(slots=True, kw_only=True)
class _Head:
    """Header fields of one message. Names keep their case; lookups ignore it."""

    headers: list[Header] = field(default_factory=list)
    chunked: bool = False
    content_length: int | None = None
    # Lower-cased name -> its values in order, built on the first lookup: the
    # dozen lookups a message gets then cost one lower() per header in all.
    _index: dict[bytes, list[bytes]] | None = field(default=None, repr=False, compare=False)
    # The fields forwarded as they are (not hop-by-hop, nor set by the gateway),
    # as "Name: value" lines joined by CRLF, when the reader in C made them with
    # the head; None: rendering picks them from ``headers``.
    end_to_end: bytes | None = field(default=None, repr=False, compare=False)

    def _indexed(self) -> dict[bytes, list[bytes]]:
        index: dict[bytes, list[bytes]] = {}
        for key, value in self.headers:
            lower = key.lower()
            found = index.get(lower)
            if found is None:
                index[lower] = [value]
            else:
                found.append(value)
        self._index = index
        return index

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (any case), or None."""
        found = self._lookup().get(name.lower())
        return None if found is None else found[0]

    def values(self, name: bytes) -> Sequence[bytes]:
        """Every value of header ``name`` (any case), in order."""
        return self._lookup().get(name.lower(), _NONE)

    def _lookup(self) -> dict[bytes, list[bytes]]:
        index = self._index
        return self._indexed() if index is None else index


_NONE: Sequence[bytes] = ()


@dataclass(slots=True)
class RequestHead(_Head):
    """One parsed request head."""

    method: bytes = b""
    target: bytes = b""
    version: str = "1.1"
    upgrade: bool = False  # a WebSocket (or other) upgrade the parser accepted
    keep_alive: bool = True

    @property
    def is_websocket(self) -> bool:
        upgrade = self.get(b"upgrade")
        return self.upgrade and upgrade is not None and upgrade.strip().lower() == b"websocket"

    def cookie(self, name: str) -> str | None:
        return cookie_value(self.values(b"cookie"), name)


@dataclass(slots=True)
class ResponseHead(_Head):
    """One parsed response head."""

    status: int = 0
    reason: bytes = b""
    version: str = "1.1"
    keep_alive: bool = True


def cookie_value(cookie_headers: Iterable[bytes], name: str) -> str | None:
    """The value of cookie ``name`` in ``Cookie:`` headers, or None."""
    wanted = name.encode()
    for header in cookie_headers:
        for pair in header.split(b";"):
            key, sep, value = pair.strip().partition(b"=")
            if sep and key == wanted:
                return value.strip(b'"').decode("latin-1")
    return None


# RFC 9110 7.2: Host = uri-host [ ":" port ], uri-host an IP-literal or a reg-name
# (RFC 3986 3.2.2); empty when the target has no authority.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?\Z")


def request_problem(head: RequestHead) -> str | None:
    """Why this request must be answered 400 before anything else (RFC 9112 3.2), or None.

    Only HTTP/1.0 and HTTP/1.1 are spoken: llhttp reads a request-line without a
    version as HTTP/0.9, which RFC 9112's grammar has no room for. An HTTP/1.1
    request needs exactly one ``Host``, and a valid one; an HTTP/1.0 request may
    have none. A ``Transfer-Encoding`` must end in ``chunked``.
    """
    if head.version not in ("1.0", "1.1"):
        return "only HTTP/1.0 and HTTP/1.1 requests are served"
    codings = b",".join(head.values(b"transfer-encoding")).split(b",")
    if codings != [b""] and codings[-1].strip(b" \t").lower() != b"chunked":
        # llhttp lets this through on an upgrade; the RFC says 400 (RFC 9112 6.1).
        return "Transfer-Encoding must end in chunked"
    hosts = head.values(b"host")
    if len(hosts) > 1:
        return "more than one Host header"
    if not hosts:
        return "missing Host header" if head.version != "1.0" else None
    if not _HOST.match(hosts[0]):
        return "invalid Host header"
    return None


# The one version of the protocol spoken (RFC 6455); a client asking for another
# is answered 426 with this one named (RFC 6455 4.2.2), so it can retry with it.
WEBSOCKET_VERSION = b"13"
UNSUPPORTED_VERSION = "Sec-WebSocket-Version must be 13, once"


def upgrade_problem(head: RequestHead) -> str | None:
    """Why an upgrade is refused before admission (400), or None."""
    if head.upgrade and head.is_websocket:
        return websocket_problem(head)
    if head.upgrade:
        return "only WebSocket upgrades are supported"
    return None


def websocket_problem(head: RequestHead) -> str | None:
    """Why this upgrade request is not a valid WebSocket handshake (RFC 6455 4.2.1), or None."""
    if head.method != b"GET":
        return "a WebSocket handshake must use GET"
    if head.version != "1.1":
        return "a WebSocket handshake needs HTTP/1.1"
    # Each of these appears once in a request (RFC 6455 11.3.1, 11.3.5).
    keys = head.values(b"sec-websocket-key")
    if not keys:
        return "missing Sec-WebSocket-Key"
    if len(keys) > 1:
        return "more than one Sec-WebSocket-Key"
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            return "Sec-WebSocket-Key must be 16 bytes in base64"
    except (binascii.Error, ValueError):
        return "Sec-WebSocket-Key is not base64"
    versions = head.values(b"sec-websocket-version")
    if not versions:
        return "missing Sec-WebSocket-Version"
    if list(versions) != [WEBSOCKET_VERSION]:
        return UNSUPPORTED_VERSION
    return None


def _join(lines: list[bytes]) -> bytes:
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines)


# The fields of a request not forwarded as they are: the hop-by-hop ones, and
# those the gateway sets from what it resolved (a client's own copies never pass).
NOT_FORWARDED = HOP_BY_HOP | {
    b"x-forwarded-for", b"forwarded", b"x-real-ip", b"x-forwarded-proto", b"x-request-id"
}  # fmt: skip


def _add_end_to_end(lines: list[bytes], head: _Head, dropped: frozenset[bytes]) -> None:
    """Add the fields of ``head`` not in ``dropped`` to the lines of a head being made."""
    made = head.end_to_end
    if made is None:
        lines.extend(
            name + b": " + value for name, value in head.headers if name.lower() not in dropped
        )
    elif made:
        lines.append(made)


def render_request(
    head: RequestHead,
    *,
    client_ip: str,
    request_id: str,
    host: str,
    proto: str = "http",
) -> bytes:
    """The head sent to the backend.

    WebSocket upgrades keep their ``Connection``/``Upgrade`` headers. Plain
    requests go out as keep-alive HTTP/1.1 on a pooled connection, with the body
    framed as the client framed it (chunked is re-chunked as it streams).

    ``client_ip`` is the client's address as the gateway resolved it (its peer,
    or what trusted proxies said): ``X-Forwarded-For``, ``X-Real-IP`` and
    ``Forwarded`` carry that one address, so a backend that takes their right-most
    (or only) entry gets it, and whatever a client wrote into them is dropped.

    ``host`` is the backend's authority, sent as ``Host`` when the request has
    none: an HTTP/1.0 client may leave it out, an HTTP/1.1 request may not
    (RFC 9112 3.2), and the head goes out as HTTP/1.1.

    An upgrade whose head the reader in C read is written in C, in one call, to
    the same bytes; any other head is written here.
    """
    made = head.end_to_end
    if made is not None and head.upgrade:
        # The index itself, not get(): two lookups by name cost more than the writing.
        index = head._lookup()
        upgrade = index.get(b"upgrade")
        return _heads.write_upgrade_request(
            head.method, head.target, b"host" in index, made, upgrade[0] if upgrade else None,
            client_ip, proto, request_id, host,
        )  # fmt: skip
    return _render_request_py(
        head, client_ip=client_ip, request_id=request_id, host=host, proto=proto
    )


def _render_request_py(
    head: RequestHead, *, client_ip: str, request_id: str, host: str, proto: str
) -> bytes:
    """:func:`render_request` for a head of any kind."""
    lines = [b"%s %s HTTP/1.1" % (head.method, head.target)]
    if head.get(b"host") is None:
        lines.append(b"Host: " + host.encode())
    _add_end_to_end(lines, head, NOT_FORWARDED)
    if head.upgrade:
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + (head.get(b"upgrade") or b"websocket"))
    else:
        lines.append(b"Connection: keep-alive")
        if head.chunked:
            lines.append(b"Transfer-Encoding: chunked")
    ip, scheme = client_ip.encode(), proto.encode()
    # RFC 7239 section 6: an IPv6 node is bracketed, and then quoted.
    node = b'"[' + ip + b']"' if b":" in ip else ip
    lines.append(
        b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Real-IP: %s\r\n"
        b"Forwarded: for=%s;proto=%s\r\nX-Request-Id: %s"
        % (ip, scheme, ip, node, scheme, request_id.encode())
    )
    return _join(lines)


def render_response(
    head: ResponseHead,
    *,
    keep_alive: bool,
    chunked: bool,
    extra: Iterable[Header] = (),
) -> bytes:
    """The response head sent to the client (hop-by-hop headers rewritten).

    A 101 whose head the reader in C read is written in C, in one call, to the
    same bytes; any other head is written here.
    """
    made = head.end_to_end
    if made is not None and head.status == 101:
        upgrade = head._lookup().get(b"upgrade")
        return _heads.write_switching_response(
            head.reason, made, upgrade[0] if upgrade else None, extra
        )
    return _render_response_py(head, keep_alive=keep_alive, chunked=chunked, extra=extra)


def _render_response_py(
    head: ResponseHead, *, keep_alive: bool, chunked: bool, extra: Iterable[Header]
) -> bytes:
    """:func:`render_response` for a head of any kind."""
    reason = head.reason or (
        HTTPStatus(head.status).phrase.encode() if _known(head.status) else b""
    )
    lines = [b"HTTP/1.1 %d %s" % (head.status, reason)]
    _add_end_to_end(lines, head, HOP_BY_HOP)
    if head.status == 101:
        lines.append(b"Connection: Upgrade")
        lines.append(b"Upgrade: " + (head.get(b"upgrade") or b"websocket"))
    else:
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
        lines.append(b"Connection: keep-alive" if keep_alive else b"Connection: close")
    lines.extend(name + b": " + value for name, value in extra)
    return _join(lines)


def _known(status: int) -> bool:
    try:
        HTTPStatus(status)
    except ValueError:
        return False
    return True


def retry_after_seconds(seconds: float) -> int:
    """``Retry-After`` is whole seconds; never tell a client to retry at once."""
    whole = int(seconds)
    return max(1, whole if whole == seconds else whole + 1)


def error_response(
    status: int,
    error: str,
    *,
    retry_after: float | None = None,
    detail: str | None = None,
    close: bool = False,
    extra: Iterable[Header] = (),
) -> bytes:
    """A small JSON answer the gateway gives itself: rejections and bad requests."""
    payload: dict[str, object] = {"error": error}
    lines = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    if retry_after is not None:
        seconds = retry_after_seconds(retry_after)
        payload["retry_after"] = seconds
        lines.append(b"Retry-After: %d" % seconds)
    if detail:
        payload["detail"] = detail
    body = json.dumps(payload).encode()
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close" if close else b"Connection: keep-alive")
    lines.extend(name + b": " + value for name, value in extra)
    return _join(lines) + body
