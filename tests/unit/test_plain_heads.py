"""The two heads of an upgrade read in C: what the readers make of them, or nothing.

``_heads.c`` reads only heads of the plainest shape and says None for the
rest, which the readers (httptools) then read. Each test here holds it to that:
whatever it returns is what the readers return for the same bytes, and the
heads that common clients and servers send are of its shape (else the gateway
would be as slow as before, and no other test would notice).

The heads it read are also written in C (``render_request`` and
``render_response`` call it for them): the last part holds those writers to
the bytes the Python writers make of the same heads.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from wsgate import wire
from wsgate.gateway import _heads
from wsgate.gateway.head import (
    HOP_BY_HOP,
    NOT_FORWARDED,
    RequestHead,
    ResponseHead,
    _render_request_py,
    _render_response_py,
    render_request,
    render_response,
)
from wsgate.gateway.http1 import (
    read_switching_response,
    read_upgrade_request,
    switching_response,
    upgrade_request,
)

MAX_HEAD = 16 * 1024
KEY = base64.b64encode(b"0123456789abcdef")
FIELDS = [
    b"Host: example:8080",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: " + KEY,
    b"Sec-WebSocket-Version: 13",
]
REST = b"\x81\x85abcd" + b"after"


def request(fields: list[bytes] = FIELDS, start: bytes = b"GET /chat?room=1 HTTP/1.1") -> bytes:
    return b"\r\n".join([start, *fields]) + b"\r\n\r\n" + REST


def answer(fields: list[bytes], start: bytes = b"HTTP/1.1 101 Switching Protocols") -> bytes:
    return b"\r\n".join([start, *fields]) + b"\r\n\r\n" + REST


def in_c(data: bytes, max_head: int = MAX_HEAD) -> bool:
    return _heads.upgrade_request(data, max_head, NOT_FORWARDED) is not None


def answer_in_c(data: bytes) -> bool:
    return _heads.switching_response(data, HOP_BY_HOP) is not None


def same_fields(ours: RequestHead | ResponseHead, readers: RequestHead | ResponseHead) -> bool:
    """Whether every lookup of a field finds the same values in both heads."""
    names = {name.lower() for name, _ in readers.headers} | {b"absent"}
    return all(ours.values(name) == readers.values(name) for name in names) and all(
        ours.values(name.upper()) == readers.values(name) for name in names
    )


def agrees_on_request(data: bytes, max_head: int = MAX_HEAD) -> bool:
    """Whether C read ``data``; either way the gateway's reading is the reader's.

    The same head, the same answer to every lookup, and the same head forwarded.
    """
    ours, readers = upgrade_request(data, max_head), read_upgrade_request(data, max_head)
    assert ours == readers, data
    if ours is not None and readers is not None:
        assert same_fields(ours[0], readers[0]), data
        forward = {"client_ip": "10.0.0.7", "request_id": "r-1", "host": "127.0.0.9:80"}
        assert render_request(ours[0], **forward) == render_request(readers[0], **forward), data
    return in_c(data, max_head)


def agrees_on_response(data: bytes) -> bool:
    ours, readers = switching_response(data), read_switching_response(data)
    assert ours == readers, data
    if ours is not None and readers is not None:
        assert same_fields(ours[0], readers[0]), data
        extra = [(b"Set-Cookie", b"a=b")]
        rendered = [
            render_response(head, keep_alive=False, chunked=False, extra=extra)
            for head in (ours[0], readers[0])
        ]
        assert rendered[0] == rendered[1], data
    return answer_in_c(data)


# -- the heads that clients and servers send are read in C --------------------------------
def test_the_heads_common_clients_send_are_read_in_c() -> None:
    websockets_client = ClientProtocol(parse_uri("ws://example:8080/chat?x=1"))
    websockets_client.send_request(websockets_client.connect())
    chromium = request(
        [
            b"Host: example.com",
            b"Connection: Upgrade",
            b"Pragma: no-cache",
            b"Cache-Control: no-cache",
            b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like"
            b" Gecko) Chrome/156.0.0.0 Safari/537.36",
            b"Upgrade: websocket",
            b"Origin: https://example.com",
            b"Sec-WebSocket-Version: 13",
            b"Accept-Encoding: gzip, deflate, br, zstd",
            b"Accept-Language: en-US,en;q=0.9",
            b"Cookie: wsgate_affinity=b-1; other=\xc3\xa9",
            b"Sec-WebSocket-Key: " + KEY,
            b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",
        ],
        b"GET /socket HTTP/1.1",
    )
    firefox = request([*FIELDS[:2], b"Connection: keep-alive, Upgrade", *FIELDS[3:]])
    ours = wire.opening_request("example:8080", "/chat", KEY.decode(), {"X-Test": "1"})
    for data in (websockets_client.data_to_send()[0], chromium, firefox, ours + REST):
        assert agrees_on_request(data), data


def test_the_answers_common_servers_send_are_read_in_c() -> None:
    websockets_server = ServerProtocol()
    websockets_server.receive_data(request().removesuffix(REST))
    [handshake] = websockets_server.events_received()
    websockets_server.send_response(websockets_server.accept(handshake))
    nginx_like = answer(
        [
            b"Server: nginx",
            b"Date: Wed, 02 Dec 2026 16:00:00 GMT",
            b"Connection: upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Accept: " + wire.accept_key(KEY.decode()).encode(),
        ]
    )
    no_reason = answer([b"Upgrade: websocket", b"Connection: Upgrade"], b"HTTP/1.1 101")
    ours = wire.upgrade_response(KEY.decode()) + REST
    for data in (websockets_server.data_to_send()[0] + REST, nginx_like, no_reason, ours):
        assert agrees_on_response(data), data


def test_what_follows_the_head_is_given_back_untouched() -> None:
    found = upgrade_request(request(), MAX_HEAD)
    assert found is not None and found[1] == REST
    head, _ = found
    assert (head.method, head.target, head.version) == (b"GET", b"/chat?room=1", "1.1")
    assert head.upgrade and head.keep_alive and not head.chunked
    assert head.content_length is None and head.get(b"HOST") == b"example:8080"


# -- heads of another shape are left to the reader ----------------------------------------
LEFT_TO_THE_READER = {
    "a bare LF": request([FIELDS[0] + b"\nX: y", *FIELDS[1:]]),
    "a CR inside a value": request([b"X: a\rb", *FIELDS]),
    "NUL in a value": request([b"X: a\x00b", *FIELDS]),
    "DEL in a value": request([b"X: a\x7fb", *FIELDS]),
    "a folded line": request([b"X: a", b" b", *FIELDS]),
    "a blank before the colon": request([b"X : a", *FIELDS]),
    "a name that is no token": request([b"X(y): a", *FIELDS]),
    "an empty name": request([b": a", *FIELDS]),
    "no colon": request([b"X", *FIELDS]),
    "Content-Length": request([*FIELDS, b"Content-Length: 0"]),
    "Transfer-Encoding": request([*FIELDS, b"transfer-encoding: chunked"]),
    "Proxy-Connection": request([*FIELDS, b"Proxy-Connection: keep-alive"]),
    "Connection: close": request([*FIELDS[:2], b"Connection: close, Upgrade", *FIELDS[3:]]),
    "another option": request([*FIELDS[:2], b"Connection: Upgrade, foo", *FIELDS[3:]]),
    "no Upgrade field": request([f for f in FIELDS if not f.startswith(b"Upgrade")]),
    "no Connection field": request([f for f in FIELDS if not f.startswith(b"Connection")]),
    "an empty Upgrade field": request(
        [b"Upgrade: " if f.startswith(b"Upgrade") else f for f in FIELDS]
    ),
    "a word that only starts with upgrade": request(
        [*FIELDS[:2], b"Connection: upgraded", *FIELDS[3:]]
    ),
    "POST": request(start=b"POST /chat HTTP/1.1"),
    "HTTP/1.0": request(start=b"GET /chat HTTP/1.0"),
    "an absolute target": request(start=b"GET http://example/chat HTTP/1.1"),
    "a space in the target": request(start=b"GET /a b HTTP/1.1"),
    "two spaces": request(start=b"GET  /chat HTTP/1.1"),
    "a CRLF before the request line": b"\r\n" + request(),
    "lower-case method": request(start=b"get /chat HTTP/1.1"),
    "part of a head": request()[:40],
    "no empty line": request().split(b"\r\n\r\n")[0] + b"\r\n",
}


@pytest.mark.parametrize("data", LEFT_TO_THE_READER.values(), ids=LEFT_TO_THE_READER.keys())
def test_other_shapes_are_left_to_the_reader(data: bytes) -> None:
    assert not in_c(data)
    # ...which reads it as it always did.
    assert upgrade_request(data, MAX_HEAD) == read_upgrade_request(data, MAX_HEAD)


def test_a_head_whose_host_the_reader_refuses_is_left_to_it() -> None:
    no_host = [f for f in FIELDS if not f.startswith(b"Host")]
    for fields in ([*FIELDS, b"Host: other"], no_host, [b"Host: a b", *no_host]):
        data = request(fields)
        assert not in_c(data)  # of the plain shape, but no valid request...
        assert upgrade_request(data, MAX_HEAD) is None  # ...and refused, as the reader does
        assert read_upgrade_request(data, MAX_HEAD) is None


def without(name: bytes) -> list[bytes]:
    return [f for f in FIELDS if not f.lower().startswith(name.lower() + b":")]


# Of the plain shape, but no valid WebSocket handshake: the downstream answers each.
NO_HANDSHAKE = {
    "a key of 15 bytes": [*without(b"Sec-WebSocket-Key"), b"Sec-WebSocket-Key: " + b"A" * 20],
    "a key not in base64": [
        *without(b"Sec-WebSocket-Key"),
        b"Sec-WebSocket-Key: " + b"*" * 22 + b"==",
    ],
    "two keys": [*FIELDS, b"Sec-WebSocket-Key: " + KEY],
    "no key": without(b"Sec-WebSocket-Key"),
    "version 8": [*without(b"Sec-WebSocket-Version"), b"Sec-WebSocket-Version: 8"],
    "two versions": [*FIELDS, b"Sec-WebSocket-Version: 13"],
    "no version": without(b"Sec-WebSocket-Version"),
    "an upgrade to h2c": [*without(b"Upgrade"), b"Upgrade: h2c"],
    "two upgrades": [*without(b"Upgrade"), b"Upgrade: websocket, h2c"],
}


@pytest.mark.parametrize("fields", NO_HANDSHAKE.values(), ids=NO_HANDSHAKE.keys())
def test_a_head_that_is_no_valid_handshake_is_left_to_the_reader(fields: list[bytes]) -> None:
    data = request(fields)
    assert not in_c(data)
    assert upgrade_request(data, MAX_HEAD) is None  # the downstream answers it (400, 426)
    assert read_upgrade_request(data, MAX_HEAD) is None


def test_a_valid_handshake_in_any_case_is_read_in_c() -> None:
    fields = [
        b"host: [::1]:8080", b"UPGRADE: WebSocket", b"connection: upgrade",
        b"sec-websocket-key: " + KEY, b"SEC-WEBSOCKET-VERSION: 13",
    ]  # fmt: skip
    assert agrees_on_request(request(fields))


def test_the_fields_the_gateway_sets_are_not_forwarded_from_c() -> None:
    spoofed = [b"X-Forwarded-For: 6.6.6.6", b"X-Request-Id: mine", b"Forwarded: for=6.6.6.6"]
    kept = [b"X-Kept: 1", b"Cookie: a=b"]
    data = request([*FIELDS, *spoofed, *kept])
    assert agrees_on_request(data)
    found = upgrade_request(data, MAX_HEAD)
    assert found is not None
    forwarded = render_request(found[0], client_ip="10.0.0.7", request_id="r-1", host="b:1")
    for line in kept:
        assert b"\r\n" + line + b"\r\n" in forwarded
    for line in spoofed:
        assert line not in forwarded
    assert b"X-Forwarded-For: 10.0.0.7\r\n" in forwarded
    assert b"X-Request-Id: r-1\r\n" in forwarded


def test_a_head_with_only_the_fields_the_gateway_sets_forwards_no_empty_line() -> None:
    fields = [b"Host: h", b"Upgrade: websocket", b"Connection: Upgrade"]
    data = answer(fields, b"HTTP/1.1 101 Switching Protocols")
    found = switching_response(data)
    assert found is not None and answer_in_c(data)
    head = render_response(found[0], keep_alive=False, chunked=False)
    assert head.endswith(b"\r\n\r\n") and head.count(b"\r\n\r\n") == 1
    assert agrees_on_response(answer([b"Upgrade: websocket", b"Connection: Upgrade"]))


def test_a_head_over_the_limit_as_the_reader_measures_it_is_left_to_the_reader() -> None:
    # The reader measures the target and each field's name, value and four; C
    # counts the same, so a limit in between is where the two would part.
    fields = [b"X%d:v" % i for i in range(40)] + FIELDS
    data = request(fields)
    measure = len(b"/chat?room=1") + sum(
        len(name) + len(value.strip()) + 4 for name, _, value in (f.partition(b":") for f in fields)
    )
    assert agrees_on_request(data, measure)
    assert not in_c(data, measure - 1)
    assert read_upgrade_request(data, measure - 1) is None  # the reader's 431


ANSWERS_LEFT_TO_THE_READER = {
    "HTTP/1.0": answer(FIELDS[1:3], b"HTTP/1.0 101 Switching Protocols"),
    "another status": answer(FIELDS[1:3], b"HTTP/1.1 200 OK"),
    "1010": answer(FIELDS[1:3], b"HTTP/1.1 1010 Switching"),
    "a reason ending in a blank": answer(FIELDS[1:3], b"HTTP/1.1 101 Switching "),
    "two spaces before the reason": answer(FIELDS[1:3], b"HTTP/1.1 101  Switching"),
    "no Upgrade field": answer(FIELDS[2:3]),
    "no Connection field": answer(FIELDS[1:2]),
    "an empty Upgrade field": answer([b"Upgrade:", FIELDS[2]]),
    "Connection: close": answer([FIELDS[1], b"Connection: close"]),
    "Content-Length": answer([*FIELDS[1:3], b"Content-Length: 5"]),
    "a bare LF": answer([FIELDS[1] + b"\nX: y", FIELDS[2]]),
}


@pytest.mark.parametrize(
    "data", ANSWERS_LEFT_TO_THE_READER.values(), ids=ANSWERS_LEFT_TO_THE_READER.keys()
)
def test_other_answers_are_left_to_the_reader(data: bytes) -> None:
    assert not answer_in_c(data)
    assert switching_response(data) == read_switching_response(data)


# -- heads of every shape: C agrees with the reader, or leaves it ---------------------------
_TEXT = b"a Z09-_.~!$&'()*+,;=:@/?%\"#[]{}\\^|`\t\x7f\x80\xff\x00\r\n"
_text = st.binary(max_size=12).map(lambda b: bytes(_TEXT[c % len(_TEXT)] for c in b))
_names = st.sampled_from(
    [b"X-A", b"x!#$%&'*+-.^_`|~", b"Upgrade", b"CONNECTION", b"connection", b"Host", b"X y",
     b"X:", b"", b"Content-Length", b"Proxy-Connection", b"Transfer-Encoding", b"X-A",
     b"sec-websocket-key", b"Sec-WebSocket-Version", b"X-Forwarded-For", b"x-request-id",
     b"Forwarded", b"X-Real-IP", b"X-Forwarded-Proto", b"Keep-Alive", b"TE", b"Trailer"]
)  # fmt: skip
_values = st.one_of(
    _text,
    st.sampled_from(
        [KEY, KEY[:-1], KEY + b"=", b"13", b"8", b"websocket", b"WebSocket", b"h2c",
         b"[::1]:80", b"[::1", b"a.b:", b"a:b", b"%41", b"", b"x" * 22 + b"=="]
    ),
)  # fmt: skip
_options = st.lists(
    st.sampled_from([b"upgrade", b"Upgrade", b"keep-alive", b"close", b"", b" ", b"upgrades"]),
    max_size=3,
).map(b",".join)
_blanks = st.sampled_from([b"", b" ", b"\t", b"  \t"])


@st.composite
def _fields(draw: st.DrawFn) -> list[bytes]:
    fields = list(FIELDS) if draw(st.booleans()) else []
    fields += draw(
        st.lists(
            st.one_of(
                st.builds(
                    lambda n, a, v, b: n + b":" + a + v + b, _names, _blanks, _values, _blanks
                ),
                st.builds(lambda a, v: b"Connection:" + a + v, _blanks, _options),
            ),
            max_size=5,
        )
    )
    return draw(st.permutations(fields))


_targets = st.one_of(
    st.sampled_from([b"/", b"/chat", b"*", b"http://h/", b""]),
    _text.map(lambda t: b"/" + t),
)


@settings(max_examples=400, deadline=None)
@given(_fields(), _targets, st.sampled_from([b"GET", b"GET", b"POST", b"get"]), st.data())
def test_c_reads_a_request_as_the_reader_does_or_leaves_it(
    fields: list[bytes], target: bytes, method: bytes, data: st.DataObject
) -> None:
    raw = request(fields, method + b" " + target + b" HTTP/1.1")
    limit = data.draw(st.sampled_from([MAX_HEAD, 64, 120]))
    agrees_on_request(raw, limit)


@settings(max_examples=300, deadline=None)
@given(_fields(), st.sampled_from([b"", b" ", b" Switching Protocols", b" a\tb\xff", b" x "]))
def test_c_reads_an_answer_as_the_reader_does_or_leaves_it(
    fields: list[bytes], reason: bytes
) -> None:
    agrees_on_response(answer(fields, b"HTTP/1.1 101" + reason))


# -- the heads read in C are written in C, to the bytes Python writes ----------------------
def written_in_c(head: RequestHead, **forward: str) -> bytes:
    """``render_request`` of a head read in C: the C writer's bytes, checked against Python's."""
    assert head.end_to_end is not None and head.upgrade  # so the C writer is the one used
    ours = render_request(head, **forward)
    assert ours == _render_request_py(head, **forward), head
    return ours


def answered_in_c(head: ResponseHead, extra: list[tuple[bytes, bytes]]) -> bytes:
    assert head.end_to_end is not None and head.status == 101
    ours = render_response(head, keep_alive=False, chunked=False, extra=extra)
    assert ours == _render_response_py(head, keep_alive=False, chunked=False, extra=extra), head
    return ours


def read_in_c(data: bytes) -> RequestHead:
    assert in_c(data)
    found = upgrade_request(data, MAX_HEAD)
    assert found is not None
    return found[0]


def answer_read_in_c(data: bytes) -> ResponseHead:
    assert answer_in_c(data)
    found = switching_response(data)
    assert found is not None
    return found[0]


def without_host(head: RequestHead) -> RequestHead:
    """The head as if the request had named no Host (only an HTTP/1.0 one may, read by the
    reader; a head read in C always has one): the writers then send the backend's."""
    assert head.end_to_end is not None
    kept = [
        line for line in head.end_to_end.split(b"\r\n") if not line.lower().startswith(b"host:")
    ]
    index = {name: values for name, values in head._lookup().items() if name != b"host"}
    return dataclasses.replace(
        head,
        headers=[(n, v) for n, v in head.headers if n.lower() != b"host"],
        _index=index,
        end_to_end=b"\r\n".join(kept),
    )


FORWARD = {"client_ip": "10.0.0.7", "request_id": "r-1", "host": "127.0.0.9:80", "proto": "http"}


def test_an_upgrade_is_written_for_the_backend_line_by_line() -> None:
    head = read_in_c(request([*FIELDS, b"X-Forwarded-For: 6.6.6.6", b"Cookie: a=b"]))
    assert written_in_c(head, **FORWARD) == (
        b"GET /chat?room=1 HTTP/1.1\r\n"
        b"Host: example:8080\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Cookie: a=b\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"X-Forwarded-For: 10.0.0.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Real-IP: 10.0.0.7\r\n"
        b"Forwarded: for=10.0.0.7;proto=http\r\n"
        b"X-Request-Id: r-1\r\n"
        b"\r\n"
    )


def test_an_ipv6_client_without_host_is_bracketed_and_given_the_backends_host() -> None:
    fields = [b"Upgrade: WebSocket" if f.startswith(b"Upgrade") else f for f in FIELDS]
    head = without_host(read_in_c(request(fields, b"GET / HTTP/1.1")))
    forward = {
        "client_ip": "fd00::7",
        "request_id": "r-2",
        "host": "[fd00::9]:80",
        "proto": "https",
    }
    assert written_in_c(head, **forward) == (
        b"GET / HTTP/1.1\r\n"
        b"Host: [fd00::9]:80\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: WebSocket\r\n"  # the client's own spelling, as Python sends it
        b"X-Forwarded-For: fd00::7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Real-IP: fd00::7\r\n"
        b'Forwarded: for="[fd00::7]";proto=https\r\n'
        b"X-Request-Id: r-2\r\n"
        b"\r\n"
    )


def test_a_101_without_a_reason_or_forwarded_fields_is_written_with_the_cookie_last() -> None:
    head = answer_read_in_c(
        answer([b"Connection: Upgrade", b"Upgrade: websocket"], b"HTTP/1.1 101")
    )
    assert head.end_to_end == b"" and head.reason == b""
    cookie = (b"Set-Cookie", b"wsgate_affinity=b1; Path=/; HttpOnly; SameSite=Lax")
    assert answered_in_c(head, [cookie]) == (
        b"HTTP/1.1 101 Switching Protocols\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"Set-Cookie: wsgate_affinity=b1; Path=/; HttpOnly; SameSite=Lax\r\n"
        b"\r\n"
    )


def test_a_101_keeps_its_reason_and_its_end_to_end_fields() -> None:
    accept = b"Sec-WebSocket-Accept: " + wire.accept_key(KEY.decode()).encode()
    fields = [b"Upgrade: websocket", b"Connection: keep-alive, Upgrade", b"Server: s", accept]
    head = answer_read_in_c(answer(fields, b"HTTP/1.1 101 Web Socket Protocol Handshake"))
    assert answered_in_c(head, []) == (
        b"HTTP/1.1 101 Web Socket Protocol Handshake\r\n"
        b"Server: s\r\n" + accept + b"\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: websocket\r\n"
        b"\r\n"
    )


def test_the_writers_fail_as_the_python_writers_do() -> None:
    head = read_in_c(request())
    # A lone surrogate cannot be encoded, by str.encode() or by C.
    for writer in (render_request, _render_request_py):
        with pytest.raises(UnicodeEncodeError):
            writer(head, client_ip="\udc80", request_id="r", host="h", proto="http")
    answer_head = answer_read_in_c(answer(FIELDS[1:3]))
    with pytest.raises(TypeError):
        render_response(answer_head, keep_alive=False, chunked=False, extra=[(b"X", "str")])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        render_response(answer_head, keep_alive=False, chunked=False, extra=[(b"X",)])  # type: ignore[list-item]


def test_other_heads_are_written_by_python(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_here(*args: object) -> bytes:
        raise AssertionError("written in C")

    monkeypatch.setattr(_heads, "write_upgrade_request", not_here)
    monkeypatch.setattr(_heads, "write_switching_response", not_here)
    # A head the reader read has no forwarded lines laid out.
    found = read_upgrade_request(request(), MAX_HEAD)
    assert found is not None and found[0].end_to_end is None
    render_request(found[0], **FORWARD)
    # Lines laid out, but no upgrade or no 101: what only Python writes.
    plain = dataclasses.replace(read_in_c(request()), upgrade=False, chunked=True)
    assert render_request(plain, **FORWARD).startswith(
        b"GET /chat?room=1 HTTP/1.1\r\nHost: example:8080\r\n"
        b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\nSec-WebSocket-Version: 13\r\n"
        b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\nX-Forwarded-For: 10.0.0.7\r\n"
    )
    refused = dataclasses.replace(answer_read_in_c(answer(FIELDS[1:3])), status=503, reason=b"")
    assert render_response(refused, keep_alive=True, chunked=True) == (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\n\r\n"
    )


# Fields of the plain shape that leave the handshake valid: names that are tokens
# (the gateway's own and hop-by-hop ones among them, which are dropped), values of
# visible ASCII, inner blanks and obs-text.
_VALUE_BYTES = bytes(range(0x21, 0x7F)) + b" \t\x80\xc3\xa9\xff"
_plain_values = st.binary(max_size=16).map(
    lambda b: bytes(_VALUE_BYTES[c % len(_VALUE_BYTES)] for c in b).strip(b" \t")
)
_plain_names = st.one_of(
    st.sampled_from(
        [b"X-A", b"Cookie", b"Origin", b"X-Forwarded-For", b"x-request-id", b"Forwarded",
         b"X-Real-IP", b"X-Forwarded-Proto", b"Keep-Alive", b"TE", b"Trailer", b"User-Agent",
         b"Sec-WebSocket-Extensions", b"Sec-WebSocket-Protocol", b"Date", b"Server"]
    ),
    st.text("abcXYZ019!#$%&'*+-.^_`|~", min_size=1, max_size=8).map(str.encode),
)  # fmt: skip
_plain_fields = st.lists(
    st.tuples(_plain_names, st.sampled_from([b"", b" ", b"\t "]), _plain_values).map(
        lambda f: f[0] + b":" + f[1] + f[2]
    ),
    max_size=6,
)
_upgrades = st.sampled_from([b"Upgrade: websocket", b"upgrade: WebSocket", b"UPGRADE: websocket"])
_connections = st.sampled_from(
    [b"Connection: Upgrade", b"connection: keep-alive, upgrade", b"Connection: upgrade,"]
)
_ips = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["fe80::1%eth0", "::ffff:10.0.0.1", "unknown", ""]),
    st.text(max_size=8),
)
_request_ids = st.one_of(st.text(max_size=20), st.just("0" * 16))
_plain_targets = st.binary(max_size=12).map(lambda b: b"/" + bytes(0x21 + c % 94 for c in b))
_hosts = st.sampled_from(["127.0.0.1:9001", "[fd00::5]:8080", "backend", "b\u00e9:1", ""])
_protos = st.sampled_from(["http", "https", "ws"])
_cookies = st.lists(st.tuples(_plain_names, _plain_values), max_size=12)  # past the stack's pieces


@settings(max_examples=300, deadline=None)
@given(
    _plain_fields, _upgrades, _connections, _plain_targets, st.booleans(), st.booleans(),
    _ips, _request_ids, _hosts, _protos, st.data(),
)  # fmt: skip
def test_an_upgrade_read_in_c_is_written_in_c_as_python_writes_it(
    extra_fields: list[bytes], upgrade: bytes, connection: bytes, target: bytes,
    has_host: bool, forwards_nothing: bool, client_ip: str, request_id: str, host: str,
    proto: str, data: st.DataObject,
) -> None:  # fmt: skip
    fields = [FIELDS[0], upgrade, connection, *FIELDS[3:], *extra_fields]
    raw = request(data.draw(st.permutations(fields)), b"GET " + target + b" HTTP/1.1")
    # Rarely a drawn name is one of the handshake's (a second Host): not plain.
    assume(in_c(raw))
    head = read_in_c(raw)
    if not has_host:
        head = without_host(head)
    if forwards_nothing:
        head = dataclasses.replace(head, end_to_end=b"")
    written_in_c(head, client_ip=client_ip, request_id=request_id, host=host, proto=proto)


_reasons = st.sampled_from(
    [b"", b" Switching Protocols", b" OK", b" a\tb\xff", b" Web Socket Protocol Handshake"]
)


@settings(max_examples=300, deadline=None)
@given(_plain_fields, _upgrades, _connections, _reasons, _cookies, st.data())
def test_a_101_read_in_c_is_written_in_c_as_python_writes_it(
    extra_fields: list[bytes],
    upgrade: bytes,
    connection: bytes,
    reason: bytes,
    cookies: list[tuple[bytes, bytes]],
    data: st.DataObject,
) -> None:
    fields = data.draw(st.permutations([upgrade, connection, *extra_fields]))
    raw = answer(fields, b"HTTP/1.1 101" + reason)
    assume(answer_in_c(raw))
    answered_in_c(answer_read_in_c(raw), cookies)


@pytest.mark.parametrize("make", [list, tuple, iter], ids=["list", "tuple", "iterator"])
def test_the_101s_extra_fields_may_come_in_any_iterable(
    make: Callable[[list[tuple[bytes, bytes]]], object],
) -> None:
    head = answer_read_in_c(answer(FIELDS[1:3]))
    cookies = [(b"Set-Cookie", b"a=%d" % i) for i in range(20)]
    expected = _render_response_py(head, keep_alive=False, chunked=False, extra=cookies)
    given_as = make(cookies)
    assert render_response(head, keep_alive=False, chunked=False, extra=given_as) == expected  # type: ignore[arg-type]
