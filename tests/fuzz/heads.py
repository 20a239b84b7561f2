"""Request heads for the fuzz tests: hypothesis strategies, and the gateway's verdict on one.

The strategies build heads that are mostly well formed (so that the properties
look at what the gateway accepts, not only at what it refuses), with every
field's name in random case, fields in random order and repeated, values of
random length with obs-text, then mutate the bytes: bare LF or CR, NUL and
other controls, obs-fold, whitespace before a colon, a line dropped or doubled.
"""

from __future__ import annotations

import base64

from hypothesis import strategies as st
from rfc_head import TCHAR, Outcome

from wsgate.gateway.head import RequestHead, websocket_problem
from wsgate.gateway.http1 import BadMessage, Head, RequestReader

__all__ = ["MAX_HEAD", "gateway_verdict", "mutated_heads", "request_heads"]

MAX_HEAD = 4096  # the gateway's max_head_size in these tests: small, so lengths matter

_METHODS = [b"GET"] * 6 + [b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"BREW"]
_VERSIONS = [b"HTTP/1.1"] * 8 + [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.x"]
_VALUE_BYTES = bytes(range(0x21, 0x7F)) + b" \t" + bytes(range(0x80, 0x100))
_NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x7f", b"\x01", b"\x80", b"\xff"]
_GOOD_KEY = base64.b64encode(b"0123456789abcdef")


def _cased(name: bytes) -> st.SearchStrategy[bytes]:
    """``name`` with each letter's case drawn at random (one bit of a mask per letter)."""
    return st.integers(0, 2 ** len(name) - 1).map(
        lambda mask: bytes(
            c & ~0x20 if mask >> i & 1 and 0x61 <= c <= 0x7A else c for i, c in enumerate(name)
        )
    )


_values = st.one_of(
    st.binary(max_size=30).map(lambda b: bytes(_VALUE_BYTES[c % len(_VALUE_BYTES)] for c in b)),
    st.integers(0, 5000).map(lambda n: b"v" * n),  # lengths around the head limit
)
_ows = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t "])


@st.composite
def _field(draw: st.DrawFn, name: bytes, value: st.SearchStrategy[bytes]) -> bytes:
    return draw(_cased(name)) + b":" + draw(_ows) + draw(value) + draw(_ows)


_token_names = st.text(alphabet=TCHAR.decode(), min_size=1, max_size=12).map(str.encode)


def _handshake_fields() -> st.SearchStrategy[list[bytes]]:
    key = st.sampled_from(
        [_GOOD_KEY, b"c2hvcnQ=", b"***", _GOOD_KEY.rstrip(b"="), base64.b64encode(b"x" * 17)]
    )
    return st.lists(
        st.one_of(
            _field(
                b"Upgrade", st.sampled_from([b"websocket", b"WebSocket", b"h2c", b"h2c, websocket"])
            ),
            _field(b"Connection", st.sampled_from([b"Upgrade", b"keep-alive, upgrade", b"close"])),
            _field(b"Sec-WebSocket-Key", key),
            _field(b"Sec-WebSocket-Version", st.sampled_from([b"13", b"8", b"13, 8", b""])),
        ),
        max_size=6,
    )


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """A request head of random parts, mostly well formed."""
    method = draw(st.sampled_from(_METHODS))
    target = draw(st.sampled_from([b"/", b"/chat", b"/a/b?x=1&y=%20", b"*", b"http://h/p"]))
    version = draw(st.sampled_from(_VERSIONS))
    fields: list[bytes] = []
    hosts = draw(st.sampled_from([1, 1, 1, 1, 0, 2]))
    for _ in range(hosts):
        fields.append(
            draw(_field(b"Host", st.sampled_from([b"example", b"h:80", b"[::1]:9", b""])))
        )
    if draw(st.integers(0, 3)):  # most heads try an upgrade; all the right fields, often
        fields += [
            draw(_field(b"Upgrade", st.just(b"websocket"))),
            draw(_field(b"Connection", st.just(b"Upgrade"))),
            draw(_field(b"Sec-WebSocket-Key", st.just(_GOOD_KEY))),
            draw(_field(b"Sec-WebSocket-Version", st.just(b"13"))),
        ]
    fields += draw(_handshake_fields())
    lengths = st.sampled_from([b"0", b"5", b"+5", b"5, 5", b"x", b"99999999999999999999"])
    fields += draw(st.lists(_field(b"Content-Length", lengths), max_size=2))
    codings = st.sampled_from([b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity"])
    fields += draw(st.lists(_field(b"Transfer-Encoding", codings), max_size=1))
    fields += draw(
        st.lists(st.builds(lambda n, v: n + b": " + v, _token_names, _values), max_size=4)
    )
    fields = draw(st.permutations(fields))
    lead = draw(st.sampled_from([b"", b"", b"", b"\r\n"]))
    return lead + b"\r\n".join([method + b" " + target + b" " + version, *fields]) + b"\r\n\r\n"


@st.composite
def mutated_heads(draw: st.DrawFn) -> bytes:
    """A request head with a few bytes inserted, dropped or changed where parsers differ."""
    raw = draw(request_heads())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["insert", "delete", "lf", "fold", "colon", "dup", "cut"]))
        at = draw(st.integers(0, len(raw) - 1))
        if kind == "insert":
            raw = raw[:at] + draw(st.sampled_from(_NASTY)) + raw[at:]
        elif kind == "delete":
            if len(raw) > 1:  # never all of it: the next mutation needs a byte to stand at
                raw = raw[:at] + raw[at + 1 :]
        elif kind == "lf":  # one CRLF becomes a bare LF
            crlf = raw.find(b"\r\n", at)
            if crlf >= 0:
                raw = raw[:crlf] + raw[crlf + 1 :]
        elif kind == "fold":  # a field line continues on the next, after whitespace
            crlf = raw.find(b"\r\n", at)
            if 0 <= crlf < len(raw) - 4:
                raw = raw[: crlf + 2] + draw(st.sampled_from([b" ", b"\t"])) + raw[crlf + 2 :]
        elif kind == "colon":  # whitespace between a field name and its colon
            colon = raw.find(b":", at)
            if colon >= 0:
                raw = raw[:colon] + b" " + raw[colon:]
        elif kind == "dup":  # a line doubled
            start = raw.rfind(b"\r\n", 0, at) + 2
            stop = raw.find(b"\r\n", at)
            if stop > start:
                raw = raw[:stop] + b"\r\n" + raw[start:stop] + raw[stop:]
        else:  # the head cut short
            raw = raw[: max(1, at)]
    return raw


def gateway_verdict(chunks: list[bytes]) -> tuple[Outcome, RequestHead | None, str]:
    """What the gateway does with these reads: its parser, then its handshake check."""
    reader = RequestReader(MAX_HEAD)
    heads: list[RequestHead] = []
    try:
        for chunk in chunks:
            events = reader.feed(chunk)
            heads += [e.head for e in events if isinstance(e, Head)]  # type: ignore[misc]
            if heads:
                break
    except BadMessage as error:
        return Outcome.REFUSE, None, f"{error.status} {error.detail}"
    if not heads:
        return Outcome.INCOMPLETE, None, ""
    head = heads[0]
    if not head.upgrade:
        return Outcome.HTTP, head, ""
    if not head.is_websocket:
        return Outcome.REFUSE, head, "only WebSocket upgrades are supported"
    problem = websocket_problem(head)
    return (Outcome.REFUSE, head, problem) if problem else (Outcome.WEBSOCKET, head, "")
