"""The two heads of an upgrade read in C: what the readers make of them, or nothing.

``_heads.c`` reads only heads of the plainest shape and says None for the
rest, which the readers (httptools) then read. Each test here holds it to that:
whatever it returns is what the readers return for the same bytes, and the
heads that common clients and servers send are of its shape (else the gateway
would be as slow as before, and no other test would notice).
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
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
