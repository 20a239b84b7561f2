"""The load generator's reading of the server's answer to its opening handshake."""

from __future__ import annotations

import pytest

from wsgate.testbed.wsclient import parse_response_head
from wsgate.wire import ProtocolError


class TestResponseHead:
    """RFC 9112 section 4, as the opening handshake's answer (RFC 6455 section 4.2.2)."""

    def test_a_refusal_head_is_parsed_with_its_headers_and_cookies(self) -> None:
        raw = (
            b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 5\r\n"
            b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\n\r\nhello"
        )
        parsed = parse_response_head(raw)
        assert parsed is not None
        head, used = parsed
        assert (head.status, head.reason) == (429, "Too Many Requests")
        assert head.header("retry-after") == "2"
        assert head.content_length == 5
        assert head.cookies == ["a=1; Path=/", "b=2"]
        assert raw[used:] == b"hello"

    def test_an_incomplete_head_waits_for_more(self) -> None:
        assert parse_response_head(b"HTTP/1.1 101 Switching Protocols\r\nUpg") is None

    def test_garbage_is_refused(self) -> None:
        with pytest.raises(ProtocolError):
            parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n")
