"""Request/response heads and HTTP/1.1 framing as events (RFC 9112), without sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.gateway.head import (
    RequestHead,
    ResponseHead,
    cookie_value,
    error_response,
    render_request,
    render_response,
    retry_after_seconds,
    websocket_problem,
)
from wsgate.gateway.http1 import BadMessage, Body, End, Head, RequestReader, ResponseReader, Upgrade

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"X-Forwarded-For: 10.0.0.9\r\n\r\n"
)


def read_all(reader: RequestReader, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


def only_head(events: list[object]) -> RequestHead:
    heads = [e.head for e in events if isinstance(e, Head)]
    assert len(heads) == 1
    head = heads[0]
    assert isinstance(head, RequestHead)
    return head


class TestWebSocketHandshake:
    """RFC 6455 section 4.2.1: what makes an opening handshake valid."""

    def test_valid_upgrade(self) -> None:
        events = RequestReader().feed(UPGRADE + b"\x81\x85frame")
        head = only_head(events)
        assert head.is_websocket and websocket_problem(head) is None
        assert events[-1] == Upgrade(b"\x81\x85frame")

    @pytest.mark.parametrize(
        "edit,problem",
        [
            (
                (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
                "missing Sec-WebSocket-Key",
            ),
            ((b"dGhlIHNhbXBsZSBub25jZQ==", b"c2hvcnQ="), "16 bytes"),
            ((b"dGhlIHNhbXBsZSBub25jZQ==", b"***"), "not base64"),
            ((b"Version: 13", b"Version: 8"), "must be 13"),
            ((b"GET /chat", b"PUT /chat"), "must use GET"),
        ],
    )
    def test_invalid_upgrades(self, edit: tuple[bytes, bytes], problem: str) -> None:
        head = only_head(RequestReader().feed(UPGRADE.replace(*edit)))
        found = websocket_problem(head)
        assert found is not None and problem in found


class TestForwardedHead:
    def test_adds_forwarding_headers_and_keeps_the_upgrade(self) -> None:
        head = only_head(RequestReader().feed(UPGRADE))
        wire = render_request(head, client_ip="127.0.0.7", request_id="r-1", host="backend:80")
        lines = wire.split(b"\r\n")
        assert lines[0] == b"GET /chat HTTP/1.1"
        # The gateway resolved the client: the client's own X-Forwarded-For is not passed on.
        assert b"X-Forwarded-For: 127.0.0.7" in lines and b"10.0.0.9" not in wire
        assert b"X-Real-IP: 127.0.0.7" in lines
        assert b"X-Forwarded-Proto: http" in lines
        assert b"Forwarded: for=127.0.0.7;proto=http" in lines
        assert b"X-Request-Id: r-1" in lines
        assert b"Connection: Upgrade" in lines and b"Upgrade: websocket" in lines
        assert wire.endswith(b"\r\n\r\n")

    def test_plain_request_goes_out_keep_alive_without_hop_by_hop(self) -> None:
        raw = (
            b"GET / HTTP/1.0\r\nConnection: close\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            b"Accept: */*\r\n\r\n"
        )
        head = only_head(RequestReader().feed(raw))
        assert not head.keep_alive
        wire = render_request(head, client_ip="1.2.3.4", request_id="x", host="backend:80")
        assert b"Connection: keep-alive" in wire
        assert b"Keep-Alive" not in wire and b"TE:" not in wire and b"Accept: */*" in wire

    def test_an_http_1_0_request_without_host_gets_the_backends(self) -> None:
        head = only_head(RequestReader().feed(b"GET /x HTTP/1.0\r\n\r\n"))
        wire = render_request(head, client_ip="1.2.3.4", request_id="x", host="[fd00::5]:8080")
        lines = wire.split(b"\r\n")
        assert lines[0] == b"GET /x HTTP/1.1" and lines.count(b"Host: [fd00::5]:8080") == 1
        # A Host of the client's own is kept as it was, never a second one added.
        head = only_head(RequestReader().feed(b"GET /x HTTP/1.0\r\nHost: app\r\n\r\n"))
        wire = render_request(head, client_ip="1.2.3.4", request_id="x", host="backend:80")
        assert b"Host: app\r\n" in wire and b"backend:80" not in wire

    def test_forwarded_of_an_ipv6_client_over_tls(self) -> None:
        raw = (
            b"GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6\r\n"
            b"X-Forwarded-Proto: http\r\n\r\n"
        )
        head = only_head(RequestReader().feed(raw))
        wire = render_request(
            head, client_ip="2001:db8::7", request_id="x", host="backend:80", proto="https"
        )
        lines = wire.split(b"\r\n")
        assert b'Forwarded: for="[2001:db8::7]";proto=https' in lines
        assert b"X-Forwarded-For: 2001:db8::7" in lines and b"X-Forwarded-Proto: https" in lines
        assert b"6.6.6.6" not in wire and b"X-Forwarded-Proto: http\r" not in wire

    def test_spoofed_real_ip_is_replaced(self) -> None:
        head = only_head(
            RequestReader().feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Real-IP: 6.6.6.6\r\n\r\n")
        )
        wire = render_request(head, client_ip="1.2.3.4", request_id="x", host="backend:80")
        assert b"6.6.6.6" not in wire and b"X-Real-IP: 1.2.3.4" in wire


class TestFraming:
    def test_pipelined_requests_with_chunked_body(self) -> None:
        raw = (
            b"POST /a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        events = RequestReader().feed(raw)
        kinds = [type(e).__name__ for e in events]
        assert kinds == ["Head", "Body", "End", "Head", "End"]
        first = events[0]
        assert isinstance(first, Head) and first.head.chunked

    @pytest.mark.parametrize(
        "bad",
        [b"Upgrade:websocket\r\n\r\n", b"GET /c HTTP/1.1\r\n\r\n"],
        ids=["garbage", "no_host"],
    )
    def test_a_bad_request_after_good_ones_in_one_read_waits_its_turn(self, bad: bytes) -> None:
        # The good request is answered first, as it is when the bad bytes come apart.
        reader = RequestReader()
        events = reader.feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n" + bad)
        assert [type(e).__name__ for e in events] == ["Head", "End"]
        assert reader.failed is not None and reader.failed.status == 400
        with pytest.raises(BadMessage):
            reader.feed(b"GET /d HTTP/1.1\r\nHost: h\r\n\r\n")
        # Bad bytes inside the first request still fail it at once.
        with pytest.raises(BadMessage):
            RequestReader().feed(b"GET /a HTTP/1.1\r\nHost h\r\n\r\n")

    @given(st.data())
    def test_any_split_gives_the_same_messages(self, data: st.DataObject) -> None:
        body = data.draw(st.binary(max_size=300))
        raw = (
            b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            + b"GET /y HTTP/1.1\r\nHost: h\r\n\r\n"
        )  # fmt: skip
        cuts = sorted(data.draw(st.sets(st.integers(1, len(raw) - 1), max_size=8)))
        chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        events = read_all(RequestReader(), chunks)
        assert b"".join(e.data for e in events if isinstance(e, Body)) == body
        targets = [e.head.target for e in events if isinstance(e, Head)]
        assert targets == [b"/x", b"/y"]
        assert sum(isinstance(e, End) for e in events) == 2

    def test_head_too_large_in_one_read_or_many(self) -> None:
        big = b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        with pytest.raises(BadMessage) as whole:
            RequestReader(16384).feed(big)
        assert whole.value.status == 431
        reader = RequestReader(16384)
        with pytest.raises(BadMessage) as pieces:
            for start in range(0, len(big), 1000):
                reader.feed(big[start : start + 1000])
        assert pieces.value.status == 431

    def test_body_larger_than_the_head_limit_is_fine(self) -> None:
        body = b"z" * 50000
        raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        events = read_all(
            RequestReader(16384), [raw[i : i + 4096] for i in range(0, len(raw), 4096)]
        )
        assert b"".join(e.data for e in events if isinstance(e, Body)) == body

    @pytest.mark.parametrize(
        "raw",
        [
            b"\x00\x01\x02\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/9.9\r\n\r\n",
        ],
    )
    def test_malformed_requests_are_400(self, raw: bytes) -> None:
        with pytest.raises(BadMessage) as error:
            RequestReader().feed(raw)
        assert error.value.status == 400

    def test_reader_is_idle_only_between_requests(self) -> None:
        reader = RequestReader()
        assert reader.idle
        reader.feed(b"GET / HT")
        assert not reader.idle
        reader.feed(b"TP/1.1\r\nHost: h\r\n\r\n")
        assert reader.idle


class TestResponses:
    def test_switching_protocols_then_frames(self) -> None:
        events = ResponseReader().feed(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n\x81\x00"
        )
        assert isinstance(events[0], Head) and events[0].head.status == 101
        assert events[-1] == Upgrade(b"\x81\x00")

    def test_close_delimited_body_ends_at_eof(self) -> None:
        reader = ResponseReader()
        events = reader.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        assert [type(e).__name__ for e in events] == ["Head", "Body"]
        assert reader.feed_eof() == [End()]
        assert not reader.reusable

    def test_head_response_has_no_body_and_is_not_reused(self) -> None:
        reader = ResponseReader()
        reader.expect_no_body()
        events = reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        assert [type(e).__name__ for e in events] == ["Head", "End"]
        assert not reader.reusable

    def test_rendered_response_reframes_and_adds_headers(self) -> None:
        head = ResponseHead(
            200, b"OK", "1.1", headers=[(b"Transfer-Encoding", b"chunked"), (b"X-A", b"1")]
        )
        wire = render_response(
            head, keep_alive=False, chunked=True, extra=[(b"Set-Cookie", b"k=v")]
        )
        assert wire.startswith(b"HTTP/1.1 200 OK\r\n")
        assert wire.count(b"Transfer-Encoding: chunked") == 1
        assert b"Connection: close" in wire and b"Set-Cookie: k=v" in wire


class TestRejections:
    def test_json_body_and_retry_after(self) -> None:
        wire = error_response(429, "rate_limited", retry_after=0.2)
        head, _, body = wire.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 Too Many Requests")
        assert b"Retry-After: 1" in head
        assert json.loads(body) == {"error": "rate_limited", "retry_after": 1}
        assert b"Content-Length: %d" % len(body) in head

    @pytest.mark.parametrize("seconds,expected", [(0, 1), (0.01, 1), (1.0, 1), (1.01, 2), (5, 5)])
    def test_retry_after_is_whole_seconds_at_least_one(self, seconds: float, expected: int) -> None:
        assert retry_after_seconds(seconds) == expected


def test_cookie_value_finds_the_named_cookie() -> None:
    headers = [b"a=1; wsgate_backend=tok; b=2", b'c="3"']
    assert cookie_value(headers, "wsgate_backend") == "tok"
    assert cookie_value(headers, "c") == "3"
    assert cookie_value(headers, "missing") is None


class TestLineEndsBeforeTheRequestLine:
    """RFC 9112 section 2.2: empty lines may come first; a bare CR is invalid."""

    def test_empty_lines_are_skipped_even_split_across_reads(self) -> None:
        reader = RequestReader()
        assert reader.feed(b"\r\n\r") == []
        events = reader.feed(b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert [type(e).__name__ for e in events] == ["Head", "End"]

    def test_a_bare_cr_is_refused_even_split_across_reads(self) -> None:
        for reads in ([b"\r\rGET / HTTP/1.1\r\nHost: a\r\n\r\n"], [b"\r", b"GET / HTTP/1.1\r\n"]):
            reader = RequestReader()
            with pytest.raises(BadMessage) as refused:
                for data in reads:
                    reader.feed(data)
            assert refused.value.status == 400
