"""What a server must do with a request head, as RFC 9110, RFC 9112 and RFC 6455 say it.

A small model written from the RFCs' text, independent of the gateway's parser
(which is llhttp): the fuzz tests compare the two. It judges a head as one of

- ``HTTP``: a request to serve as plain HTTP;
- ``WEBSOCKET``: a valid opening handshake (RFC 6455 section 4.2.1);
- ``REFUSE``: the server must answer an error (4xx) and not serve it;
- ``INCOMPLETE``: nothing wrong so far, the head has not ended.

Where the RFCs leave a choice to the recipient ("MAY", "SHOULD", "either
reject or replace"), the judgement allows each of the outcomes they permit.
When only the strict reading applies, the judgement also gives the fields an
accepting parser must have read: names as sent, values without their OWS.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass

__all__ = ["VERSION_REFUSED", "Judgement", "Outcome", "judge"]


class Outcome(enum.Enum):
    HTTP = "http"
    WEBSOCKET = "websocket"
    REFUSE = "refuse"
    INCOMPLETE = "incomplete"


@dataclass(frozen=True)
class Judgement:
    allowed: frozenset[Outcome]
    why: str
    # What the request line and fields must read as, when the judgement is strict.
    method: bytes | None = None
    target: bytes | None = None
    fields: tuple[tuple[bytes, bytes], ...] | None = None


HTTP, WEBSOCKET, REFUSE, INCOMPLETE = Outcome

TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN = re.compile(rb"[" + re.escape(TCHAR) + rb"]+\Z")
# RFC 3986: the characters a request-target's URI may hold (pct-encoded included).
_URI_CHARS = re.compile(rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+\Z")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# RFC 9110 7.2: Host = uri-host [ ":" port ]; uri-host is an IP-literal or a reg-name.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)(:[0-9]*)?\Z")
_CTL_EXCEPT_HTAB = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_KNOWN_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"}
OWS = b" \t"


def _either(*outcomes: Outcome, why: str) -> Judgement:
    return Judgement(frozenset(outcomes), why)


def _refuse(why: str) -> Judgement:
    return Judgement(frozenset({REFUSE}), why)


def _widen(judgement: Judgement, *outcomes: Outcome, why: str, lenient: bool = True) -> Judgement:
    """The same judgement with more outcomes allowed; a lenient reading has no strict fields."""
    allowed, why = judgement.allowed | frozenset(outcomes), f"{why}; {judgement.why}"
    if lenient:
        return Judgement(allowed, why)
    return Judgement(allowed, why, judgement.method, judgement.target, judgement.fields)


def judge(raw: bytes, max_head_size: int = 16 * 1024) -> Judgement:
    """What a server must do with ``raw``, the first bytes a client sent."""
    # RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request-line.
    start = 0
    while raw.startswith(b"\r\n", start):
        start += 2
    data = raw[start:]
    if data in (b"", b"\r"):
        return _either(INCOMPLETE, why="nothing yet")
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    # RFC 9112 2.2: a recipient MAY take a bare LF for a line end; a bare CR makes the
    # element invalid (or the recipient replaces it by SP).
    bare_lf = re.search(rb"(?<!\r)\n", head) is not None
    bare_cr = re.search(rb"\r(?!\n)", head[:-1] if head.endswith(b"\r") else head) is not None
    if bare_cr:
        lenient = judge(re.sub(rb"\r(?!\n)", b" ", raw), max_head_size)
        return _widen(lenient, REFUSE, why="a bare CR")
    if bare_lf:
        lenient = judge(re.sub(rb"(?<!\r)\n", b"\r\n", raw), max_head_size)
        return _widen(lenient, REFUSE, why="a bare LF")
    if end < 0:
        # An unfinished head may be refused early only if ending it right there would be.
        if data.endswith(b"\r\n"):
            ended = data + b"\r\n"
        else:
            ended = data + (b"\n\r\n" if data.endswith(b"\r") else b"\r\n\r\n")
        if len(data) > max_head_size or REFUSE in judge(ended, max_head_size).allowed:
            return _either(INCOMPLETE, REFUSE, why="unfinished, and wrong if it ended here")
        return _either(INCOMPLETE, why="the head has not ended")
    return _judge_lines(head.split(b"\r\n")[:-1], max_head_size, complete=True)


def _judge_lines(lines: list[bytes], max_head_size: int, *, complete: bool) -> Judgement:
    if not lines:
        return _either(INCOMPLETE, why="nothing yet")
    size = sum(len(line) + 2 for line in lines)
    if size > max_head_size + 64:
        return _refuse("head over the size limit")  # RFC 9110 15.5.20 (431) lets it refuse
    verdict = _judge_request(lines, complete)
    if size > max_head_size // 2:  # near the limit: how a parser counts is its own business
        return _widen(verdict, REFUSE, why="head near the size limit", lenient=False)
    return verdict


def _judge_request(lines: list[bytes], complete: bool) -> Judgement:
    request_line, field_lines = lines[0], lines[1:]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not all(parts):
        words = request_line.split()
        if len(words) == 3 and b"\x00" not in request_line:
            # RFC 9112 3: recipients MAY split on any whitespace; or refuse.
            lenient = _judge_request([b" ".join(words), *field_lines], complete)
            return _widen(lenient, REFUSE, why="request-line whitespace")
        return _refuse("request-line is not method SP target SP version")
    method, target, version = parts
    if not _TOKEN.match(method):
        return _refuse("method is not a token")
    if not _VERSION.match(version):
        return _refuse("not an HTTP-version")
    if re.search(rb"[\x00-\x20\x7f]", target):
        return _refuse("request-target holds a control")
    major, minor = int(version[5:6]), int(version[7:8])
    lenient = _lenient_fields(field_lines)
    if lenient is not None:
        lines, why = lenient
        return _widen(_judge_request([request_line, *lines], complete), REFUSE, why=why)
    fields, problem = _fields(field_lines)
    if problem is not None:
        return problem
    if not complete:
        return _either(INCOMPLETE, why="the head has not ended")
    verdict = _judge_fields(method, major, minor, fields)
    loose: list[str] = []
    if major != 1 or minor > 1:
        loose.append("HTTP-version other than 1.0/1.1 (505 or treat as 1.1)")
    if method not in _KNOWN_METHODS:
        loose.append("method unknown (501, or serve it)")
    if not _URI_CHARS.match(target) or not (
        target.startswith(b"/") or target.startswith(b"http://") or target == b"*"
    ):
        loose.append("request-target not a URI of a request form (SHOULD 400)")
    if target == b"*" and method != b"OPTIONS":
        loose.append("asterisk-form outside OPTIONS")
    for name, value in fields:
        if _CTL_EXCEPT_HTAB.search(value):
            loose.append(f"a control in {name!r} (MAY be kept)")
    for line in field_lines:
        # Stricter than the RFCs, on purpose: llhttp refuses a framing field with
        # whitespace after its value; refusing there closes a door to smuggling.
        name, _, value = line.partition(b":")
        if name.lower() in (b"content-length", b"transfer-encoding") and value[-1:] in (
            b" ",
            b"\t",
        ):
            verdict = _widen(verdict, REFUSE, why="OWS after a framing value", lenient=False)
    verdict = Judgement(verdict.allowed, verdict.why, method, target, tuple(fields))
    if loose:
        return _widen(verdict, REFUSE, HTTP, why=", ".join(loose), lenient=False)
    return verdict


def _fields(lines: list[bytes]) -> tuple[list[tuple[bytes, bytes]], Judgement | None]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon:
            return fields, _refuse("a field line without a colon")
        if name[-1:] in (b" ", b"\t"):
            return fields, _refuse("whitespace between field name and colon (MUST 400)")
        if not _TOKEN.match(name):
            return fields, _refuse("field name is not a token")
        fields.append((name, value.strip(OWS)))
    return fields, None


def _lenient_fields(lines: list[bytes]) -> tuple[list[bytes], str] | None:
    """The field lines as a lenient recipient may read them, and why; None if strict."""
    if lines and lines[0][:1] in (b" ", b"\t"):
        # RFC 9112 2.2: reject, or skip each whitespace-preceded line after the start-line.
        rest = list(lines)
        while rest and rest[0][:1] in (b" ", b"\t"):
            rest.pop(0)
        return rest, "whitespace before the first field"
    if any(line[:1] in (b" ", b"\t") for line in lines):
        # RFC 9112 5.2: an obs-fold in a request: reject with 400, or replace it by SP.
        unfolded: list[bytes] = []
        for line in lines:
            if line[:1] in (b" ", b"\t"):
                unfolded[-1] += b" " + line.lstrip(OWS)
            else:
                unfolded.append(line)
        return unfolded, "obs-fold"
    if any(b"\x00" in line for line in lines):
        # RFC 9110 5.5: NUL in a field value: reject, or replace each by SP.
        return [line.replace(b"\x00", b" ") for line in lines], "NUL in a field"
    return None


def _values(fields: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [value for key, value in fields if key.lower() == name]


def _tokens(values: list[bytes]) -> list[bytes]:
    """A comma-separated list field's members, lower-cased (RFC 9110 5.6.1)."""
    return [item.strip(OWS).lower() for value in values for item in value.split(b",")]


def _judge_fields(
    method: bytes, major: int, minor: int, fields: list[tuple[bytes, bytes]]
) -> Judgement:
    # RFC 9112 3.2: 400 for an HTTP/1.1 request without Host, with two, or a bad one.
    hosts = _values(fields, b"host")
    if len(hosts) > 1:
        return _refuse("more than one Host")
    if hosts and not _HOST.match(hosts[0]):
        return _refuse("invalid Host")
    if not hosts and (major, minor) >= (1, 1):
        return _refuse("HTTP/1.1 without Host")
    lengths = _values(fields, b"content-length")
    codings = _tokens(_values(fields, b"transfer-encoding"))
    loose: list[str] = []
    if lengths:
        members = _tokens(lengths)
        if not all(m.isdigit() for m in members):
            return _refuse("invalid Content-Length")
        if len({int(m) for m in members}) > 1:
            return _refuse("Content-Lengths that differ (MUST treat as an error)")
        if len(members) > 1:
            loose.append("repeated Content-Length (MAY reject)")
    if codings:
        if codings[-1] != b"chunked":
            return _refuse("transfer coding not ending in chunked (MUST 400)")
        if codings != [b"chunked"]:
            loose.append("other or repeated transfer codings (501 allowed)")
        if lengths:
            loose.append("Transfer-Encoding with Content-Length (MAY reject)")
        if (major, minor) < (1, 1):
            loose.append("Transfer-Encoding in HTTP/1.0 (faulty framing)")
    verdict = _judge_upgrade(method, major, minor, fields)
    if loose:
        return _widen(verdict, REFUSE, why=", ".join(loose), lenient=False)
    return verdict


def _judge_upgrade(
    method: bytes, major: int, minor: int, fields: list[tuple[bytes, bytes]]
) -> Judgement:
    connection = _tokens(_values(fields, b"connection"))
    upgrades = _tokens(_values(fields, b"upgrade"))
    if b"upgrade" not in connection or not _values(fields, b"upgrade"):
        if upgrades:  # an Upgrade the Connection does not name: ignore it, or refuse
            return _either(HTTP, REFUSE, why="Upgrade without the connection option")
        return _either(HTTP, why="a plain request")
    protocols = [item.split(b"/")[0] for item in upgrades]
    if b"websocket" not in protocols:
        return _either(HTTP, REFUSE, why="an upgrade to something else (may be ignored)")
    if (major, minor) < (1, 1):  # RFC 9110 7.8: MUST ignore Upgrade in HTTP/1.0
        return _either(HTTP, REFUSE, why="an upgrade in HTTP/1.0")
    problem = _handshake_problem(method, fields)
    if problem is not None:
        return _refuse(problem)
    if protocols != [b"websocket"]:
        return _either(WEBSOCKET, REFUSE, why="websocket among other protocols")
    return _either(WEBSOCKET, why="a valid opening handshake")


VERSION_REFUSED = "Sec-WebSocket-Version not exactly 13"


def _handshake_problem(method: bytes, fields: list[tuple[bytes, bytes]]) -> str | None:
    """RFC 6455 4.2.1 (and 11.3.1, 11.3.5: key and version appear once in a request)."""
    if method != b"GET":
        return "handshake not a GET"
    keys = _values(fields, b"sec-websocket-key")
    if len(keys) != 1:
        return "not exactly one Sec-WebSocket-Key"
    try:
        if len(base64.b64decode(keys[0], validate=True)) != 16:
            return "Sec-WebSocket-Key not 16 bytes"
    except (binascii.Error, ValueError):
        return "Sec-WebSocket-Key not base64"
    versions = _values(fields, b"sec-websocket-version")
    if versions != [b"13"]:
        return VERSION_REFUSED
    return None
