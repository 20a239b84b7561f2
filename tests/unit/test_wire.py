"""WebSocket on the wire (RFC 6455) as bytes: the handshake, frames and close frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Opcode as WebSocketsOpcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from wsgate.wire import (
    CloseCode,
    FrameReader,
    Opcode,
    ProtocolError,
    accept_key,
    check_close_code,
    close_frame,
    close_payload,
    encode_frame,
    masked_close_frame,
    opening_request,
    parse_close_payload,
    upgrade_response,
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

    def test_the_server_answer_carries_the_accept_of_the_key(self) -> None:
        response = upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")
        assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
        assert response.endswith(b"\r\n\r\n")

    def test_a_websocket_server_accepts_the_request(self) -> None:
        server = ServerProtocol()
        server.receive_data(opening_request("gw:8080", "/", "dGhlIHNhbXBsZSBub25jZQ=="))
        [request] = server.events_received()
        assert request.headers["Sec-WebSocket-Key"] == "dGhlIHNhbXBsZSBub25jZQ=="
        assert server.accept(request).status_code == 101


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

    def test_a_fixed_mask_key_gives_the_same_bytes(self) -> None:
        frame = encode_frame(Opcode.BINARY, b"\x00\x00\x00\x00\x00", mask_key=b"\x01\x02\x03\x04")
        assert frame == b"\x82\x85\x01\x02\x03\x04\x01\x02\x03\x04\x01"
        with pytest.raises(ValueError, match="4 bytes"):
            encode_frame(Opcode.BINARY, b"", mask_key=b"abc")


class TestCloseFrame:
    """Sections 5.5.1 and 7.4: close frames and their payloads."""

    def test_bytes(self):
        assert close_frame(1001) == b"\x88\x02\x03\xe9"
        assert close_frame(CloseCode.SERVICE_RESTART, "rebalance") == b"\x88\x0b\x03\xf4rebalance"

    @pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999])
    def test_a_websocket_client_reads_it(self, code: int):
        client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
        client.receive_data(close_frame(code, "bye ✓"))
        [frame] = client.events_received()
        assert frame.opcode is WebSocketsOpcode.CLOSE
        assert client.close_rcvd is not None
        assert (client.close_rcvd.code, client.close_rcvd.reason) == (code, "bye ✓")

    @pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
    def test_codes_that_cannot_be_sent(self, code: int):
        with pytest.raises(ValueError, match=f"close code {code} cannot be sent"):
            close_frame(code)
        with pytest.raises(ValueError):
            check_close_code(code)

    @pytest.mark.parametrize("code", [1000, 1001, 1012, 4000])
    def test_masked_for_a_backend(self, code: int):
        frame = masked_close_frame(code, "gateway closing")
        assert frame[1] & 0x80  # RFC 6455 5.3: a client masks every frame
        server = ServerProtocol(state=State.OPEN)
        server.receive_data(frame)
        [event] = server.events_received()
        assert event.opcode is WebSocketsOpcode.CLOSE
        assert server.close_rcvd is not None
        assert (server.close_rcvd.code, server.close_rcvd.reason) == (code, "gateway closing")
        assert masked_close_frame(1001, mask_key=bytes(4)) == b"\x88\x82\x00\x00\x00\x00\x03\xe9"
        with pytest.raises(ValueError, match="4 bytes"):
            masked_close_frame(1001, mask_key=b"abc")
        with pytest.raises(ValueError, match="1005"):
            masked_close_frame(1005)

    def test_reason_fits_a_control_frame(self):
        assert len(close_frame(1001, "x" * 123)) == 2 + 125
        with pytest.raises(ValueError, match="at most 123"):
            close_frame(1001, "é" * 62)

    @pytest.mark.parametrize("code", [1000, 1001, 1012, 1013, 4321])
    def test_a_payload_reads_back(self, code: int) -> None:
        assert parse_close_payload(close_payload(code, "bye ✓")) == (code, "bye ✓")

    def test_an_empty_payload_is_no_status(self) -> None:
        assert parse_close_payload(b"") == (CloseCode.NO_STATUS_RCVD, "")
        with pytest.raises(ProtocolError):
            parse_close_payload(b"\x03")
