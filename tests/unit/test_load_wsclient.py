"""The load generator's WebSocket framing and handshake, on bytes (RFC 6455)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.testbed.wsclient import (
    FrameReader,
    Opcode,
    ProtocolError,
    accept_key,
    encode_frame,
    opening_request,
    parse_response_head,
)


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, mask=False, fin=fin)


class TestOpeningHandshake:
    """Section 4.1 and 4.2.2."""

    def test_accept_key_of_the_rfc_example(self) -> None:
        assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

    def test_the_request_carries_the_upgrade_headers(self) -> None:
        request = opening_request("gw:8080", "/ws?x=1", "a2V5", {"Cookie": "pod=b"})
        lines = request.decode().split("\r\n")
        assert lines[0] == "GET /ws?x=1 HTTP/1.1"
        assert "Host: gw:8080" in lines
        assert "Upgrade: websocket" in lines
        assert "Sec-WebSocket-Key: a2V5" in lines
        assert "Sec-WebSocket-Version: 13" in lines
        assert "Cookie: pod=b" in lines
        assert request.endswith(b"\r\n\r\n")

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


class TestFraming:
    """Section 5."""

    def test_client_frames_are_masked(self) -> None:
        frame = encode_frame(Opcode.TEXT, b"hello")
        assert frame[0] == 0x81
        assert frame[1] == 0x80 | 5
        assert frame[6:] != b"hello"
        assert FrameReader().feed(frame) == [(Opcode.TEXT, b"hello")]

    @pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
    def test_every_length_encoding_round_trips(self, size: int) -> None:
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        assert FrameReader().feed(server_frame(Opcode.BINARY, payload)) == [
            (Opcode.BINARY, payload)
        ]

    @given(
        messages=st.lists(st.binary(max_size=300), min_size=1, max_size=8),
        cut=st.integers(min_value=1, max_value=50),
        masked=st.booleans(),
    )
    def test_any_split_of_the_stream_gives_the_same_messages(
        self, messages: list[bytes], cut: int, masked: bool
    ) -> None:
        stream = b"".join(encode_frame(Opcode.BINARY, m, mask=masked) for m in messages)
        reader = FrameReader()
        events = []
        for start in range(0, len(stream), cut):
            events.extend(reader.feed(stream[start : start + cut]))
        assert events == [(Opcode.BINARY, m) for m in messages]

    def test_fragments_are_reassembled_around_a_control_frame(self) -> None:
        stream = (
            server_frame(Opcode.TEXT, b"hel", fin=False)
            + server_frame(Opcode.PING, b"p")
            + server_frame(Opcode.CONTINUATION, b"lo", fin=False)
            + server_frame(Opcode.CONTINUATION, b"!")
        )
        assert FrameReader().feed(stream) == [(Opcode.PING, b"p"), (Opcode.TEXT, b"hello!")]

    def test_a_close_frame_is_a_control_event(self) -> None:
        frame = server_frame(Opcode.CLOSE, struct.pack("!H", 1012) + b"rebalance")
        assert FrameReader().feed(frame) == [(Opcode.CLOSE, b"\x03\xf4rebalance")]

    @pytest.mark.parametrize(
        "frame",
        [
            bytes((0xC1, 0)),  # RSV1 without an extension
            bytes((0x83, 0)),  # reserved opcode
            bytes((0x09, 0)),  # fragmented ping
            bytes((0x89, 126, 0, 200)) + bytes(200),  # long ping
            bytes((0x80, 0)),  # continuation of nothing
        ],
    )
    def test_protocol_violations_are_refused(self, frame: bytes) -> None:
        with pytest.raises(ProtocolError):
            FrameReader().feed(frame)

    def test_a_frame_over_the_limit_is_refused_from_its_header(self) -> None:
        with pytest.raises(ProtocolError):
            FrameReader(max_message=1000).feed(bytes((0x82, 127)) + (10**6).to_bytes(8, "big"))
