"""Frame boundaries on the backend-to-client stream (RFC 6455 section 5.2), no sockets."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from wsgate.gateway.frames import FrameTracker
from wsgate.wire import CloseCode, close_frame

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def encode(
    opcode: int,
    payload_size: int,
    *,
    fin: bool = True,
    mask: bool = False,
    width: int | None = None,
) -> bytes:
    """One frame; ``width`` forces the length encoding (7, 16 or 64 bits), minimal if None.

    The payload is filled with bytes that look like frame headers, so a tracker that
    peeks into payloads goes wrong visibly.
    """
    if width is None:
        width = 7 if payload_size < 126 else 16 if payload_size < 65536 else 64
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask else 0
    if width == 7:
        head = bytes((first, mask_bit | payload_size))
    elif width == 16:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", payload_size)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", payload_size)
    if mask:
        head += b"\x81\xfe\x00\x7f"
    return head + (b"\x88\x7f\xff\x81" * (payload_size // 4 + 1))[:payload_size]


@dataclass
class Reference:
    """What a plain, whole-stream parser finds: frame ends, and header ends with opcodes."""

    ends: list[int]
    headers: list[tuple[int, int]]

    def last_opcode(self, stop: int) -> int | None:
        """The opcode of the last frame whose header lies within ``stream[:stop]``."""
        opcodes = [opcode for end, opcode in self.headers if end <= stop]
        return opcodes[-1] if opcodes else None


def reference_parse(stream: bytes) -> Reference:
    ends: list[int] = []
    headers: list[tuple[int, int]] = []
    pos = 0
    while pos + 2 <= len(stream):
        opcode = stream[pos] & 0x0F
        masked = bool(stream[pos + 1] & 0x80)
        size = stream[pos + 1] & 0x7F
        offset = pos + 2
        if size == 126:
            if offset + 2 > len(stream):
                break
            (size,) = struct.unpack_from("!H", stream, offset)
            offset += 2
        elif size == 127:
            if offset + 8 > len(stream):
                break
            (size,) = struct.unpack_from("!Q", stream, offset)
            offset += 8
        if masked:
            offset += 4
        if offset > len(stream):
            break
        headers.append((offset, opcode))
        pos = offset + size
        if pos > len(stream):
            break
        ends.append(pos)
    return Reference(ends, headers)


def check_chunks(stream: bytes, cuts: list[int]) -> None:
    """Feed ``stream`` cut at ``cuts``; after every chunk, compare with the reference."""
    reference = reference_parse(stream)
    boundaries = {0, *reference.ends}
    tracker = FrameTracker()
    start = 0
    for stop in [*sorted(cuts), len(stream)]:
        chunk = stream[start:stop]
        inside = [end - start for end in reference.ends if start < end <= stop]
        assert tracker.feed(chunk) == (inside[-1] if inside else -1), (start, stop)
        assert tracker.at_boundary == (stop in boundaries), (start, stop)
        assert tracker.close_seen == (reference.last_opcode(stop) == CLOSE), (start, stop)
        start = stop


# Every length encoding, masked and not, including non-minimal 16/64-bit encodings.
MIXED = b"".join(
    [
        encode(TEXT, 0),
        encode(TEXT, 125),
        encode(BINARY, 126),
        encode(BINARY, 300, mask=True),
        encode(BINARY, 5, width=16),
        encode(BINARY, 7, width=64),
        encode(TEXT, 0, width=64, mask=True),
        encode(PING, 4, mask=True),
        encode(BINARY, 65535),
        encode(BINARY, 65536),
        encode(CLOSE, 2),
    ]
)


class TestLengthEncodings:
    """RFC 6455 5.2: payload length in 7 bits, 7+16 bits or 7+64 bits."""

    @pytest.mark.parametrize(
        ("size", "width", "header_size"),
        [(0, 7, 2), (125, 7, 2), (126, 16, 4), (65535, 16, 4), (65536, 64, 10), (3, 64, 10)],
    )
    @pytest.mark.parametrize("mask", [False, True])
    def test_one_frame_in_one_chunk(self, size: int, width: int, header_size: int, mask: bool):
        frame = encode(BINARY, size, width=width, mask=mask)
        assert len(frame) == header_size + 4 * mask + size
        tracker = FrameTracker()
        assert tracker.feed(frame) == len(frame)
        assert tracker.at_boundary

    def test_64_bit_length_beyond_32_bits(self):
        tracker = FrameTracker()
        size = 2**32 + 5
        assert tracker.feed(encode(BINARY, 0, width=64)[:2] + struct.pack("!Q", size)) == -1
        chunk = bytes(2**20)  # only its length matters: feed it 4096 times
        for _ in range(4096):
            assert tracker.feed(chunk) == -1
        assert not tracker.at_boundary
        assert tracker.feed(b"12345" + encode(TEXT, 1)) == 5 + 3
        assert tracker.at_boundary


class TestSplits:
    """Headers and payloads cut anywhere by the reads of the relay."""

    def test_split_at_every_position(self):
        # Deep inside the 64 KiB payloads every cut is alike: skip most of those.
        edges = [0, *reference_parse(MIXED).ends]
        for cut in range(len(MIXED) + 1):
            if min(abs(cut - edge) for edge in edges) < 200 or cut % 997 == 0:
                check_chunks(MIXED, [cut])

    def test_three_chunks_around_every_header(self):
        starts = [0, *reference_parse(MIXED).ends[:-1]]
        for start in starts:
            for first in range(max(start - 1, 0), start + 15):
                for second in range(first, min(start + 16, len(MIXED) + 1)):
                    check_chunks(MIXED, [first, second])

    @pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 13, 14, 127, 4096])
    def test_fixed_size_reads(self, chunk_size: int):
        check_chunks(MIXED, list(range(chunk_size, len(MIXED), chunk_size)))

    def test_header_kept_across_many_one_byte_reads(self):
        frame = encode(BINARY, 70000, mask=True)  # 14-byte header, the longest
        tracker = FrameTracker()
        for byte in frame[:13]:
            assert tracker.feed(bytes((byte,))) == -1
            assert not tracker.at_boundary
        assert tracker.feed(frame[13:]) == len(frame) - 13
        assert tracker.at_boundary

    def test_empty_chunks_change_nothing(self):
        tracker = FrameTracker()
        assert tracker.feed(b"") == -1 and tracker.at_boundary
        frame = encode(TEXT, 200)
        tracker.feed(frame[:3])
        assert tracker.feed(b"") == -1
        tracker.feed(frame[3:10])
        assert tracker.feed(b"") == -1
        assert tracker.feed(frame[10:]) == len(frame) - 10

    def test_offset_is_the_last_frame_end_in_the_chunk(self):
        tracker = FrameTracker()
        frames = [encode(TEXT, 10), encode(TEXT, 20), encode(TEXT, 30)]
        stream = b"".join(frames)
        # The chunk ends inside the third frame: cut after the second.
        assert tracker.feed(stream[:-5]) == len(frames[0]) + len(frames[1])
        assert tracker.feed(stream[-5:]) == 5


class TestControlFrames:
    """RFC 6455 5.4: control frames may come between the fragments of a message."""

    def test_control_frames_between_fragments_are_boundaries(self):
        frames = [
            encode(TEXT, 100, fin=False),
            encode(PING, 4),
            encode(CONT, 300, fin=False),
            encode(PONG, 0),
            encode(CONT, 70000, fin=False),
            encode(PING, 125),
            encode(CONT, 1),
        ]
        stream = b"".join(frames)
        ends = [sum(len(frame) for frame in frames[: i + 1]) for i in range(len(frames))]
        assert reference_parse(stream).ends == ends
        for cut in [*range(0, 140), *range(len(stream) - 150, len(stream) + 1)]:
            check_chunks(stream, [cut])

    def test_close_from_the_backend_is_noticed(self):
        tracker = FrameTracker()
        frame = encode(CLOSE, 2, width=16)
        tracker.feed(encode(TEXT, 5) + frame[:3])
        assert not tracker.close_seen
        tracker.feed(frame[3:])
        assert tracker.close_seen and tracker.at_boundary

    def test_frames_written_by_websockets(self):
        frames = [
            Frame(Opcode.TEXT, b"hello " * 30, fin=False),
            Frame(Opcode.PING, b"ping"),
            Frame(Opcode.CONT, b"x" * 70000),
            Frame(Opcode.BINARY, b""),
            Frame(Opcode.CLOSE, CloseCode.GOING_AWAY.to_bytes(2, "big")),
        ]
        pieces = [frame.serialize(mask=False) for frame in frames]
        stream = b"".join(pieces)
        tracker = FrameTracker()
        assert tracker.feed(stream) == len(stream)
        assert tracker.close_seen
        check_chunks(stream, list(range(0, len(stream), 999)))


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    frames = []
    for _ in range(draw(st.integers(0, 12))):
        opcode = draw(st.sampled_from([CONT, TEXT, BINARY, CLOSE, PING, PONG]))
        width = draw(st.sampled_from([None, None, 16, 64]))
        limit = 125 if width is None else 2000
        size = draw(st.integers(0, limit) | st.sampled_from([0, 1, 125, 126, 127]))
        frames.append(
            encode(opcode, size, fin=draw(st.booleans()), mask=draw(st.booleans()), width=width)
        )
    stream = b"".join(frames)
    # Sometimes the stream stops inside a frame, as a live stream does.
    return stream[: draw(st.integers(0, len(stream)))] if draw(st.booleans()) else stream


@given(data=st.data(), stream=streams())
@settings(max_examples=400, deadline=None)
def test_boundaries_equal_the_reference_parser(data: st.DataObject, stream: bytes):
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    check_chunks(stream, cuts)


class TestCloseBetweenFrames:
    """RFC 6455 5.4: a close frame the gateway writes at a boundary the tracker found."""

    def test_injected_after_a_boundary_keeps_the_stream_parseable(self):
        stream = encode(TEXT, 10) + encode(BINARY, 300)
        tracker = FrameTracker()
        cut = tracker.feed(stream[:-7])
        relayed = stream[:-7][:cut] + close_frame(CloseCode.GOING_AWAY)
        client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN)
        client.receive_data(relayed)
        events = client.events_received()
        assert [frame.opcode for frame in events] == [Opcode.TEXT, Opcode.CLOSE]
        assert client.close_rcvd is not None and client.close_rcvd.code == 1001
