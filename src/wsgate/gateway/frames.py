"""WebSocket frame boundaries on a relayed byte stream, without sockets.

The relay forwards backend-to-client bytes as they come and never decodes
messages. To close a session on purpose (1001 on drain, 1012 on rebalance,
1013 when over capacity) it must still write its close frame *between* two
frames, never inside one. :class:`FrameTracker` follows the frame headers of
that stream (RFC 6455 section 5.2) and nothing else:

- payload is skipped by arithmetic: no copy, no unmasking, no loop over its bytes;
- when a chunk ends inside a payload, the next chunk usually costs one comparison
  and one subtraction;
- a header cut by a chunk boundary is kept (at most 13 bytes) until it completes;
- per chunk, the work is proportional to the number of frame headers in it.

Control frames may sit between the fragments of a message (RFC 6455 section
5.4), so every frame end is a place where a close frame may be written.
Extensions such as permessage-deflate change payloads, not framing, so they
do not matter here.
"""

from __future__ import annotations

import os
from enum import IntEnum

__all__ = ["CloseCode", "FrameTracker", "check_close_code", "close_frame", "masked_close_frame"]


class CloseCode(IntEnum):
    """The close codes the gateway sends (RFC 6455 section 7.4.1, IANA registry)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001  # the gateway drains
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012  # rebalancing or maximum connection duration
    TRY_AGAIN_LATER = 1013  # over capacity
    BAD_GATEWAY = 1014


_OPCODE_CLOSE = 0x8
# 1004 is reserved, 1005, 1006 and 1015 must never appear on the wire, 1016-2999
# are unassigned; 3000-3999 are registered for libraries and 4000-4999 private.
_SENDABLE_BELOW_3000 = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})
_MAX_CONTROL_PAYLOAD = 125


def check_close_code(code: int) -> int:
    """Return ``code`` if an endpoint may send it in a close frame, else raise ValueError."""
    if code in _SENDABLE_BELOW_3000 or 3000 <= code <= 4999:
        return code
    raise ValueError(
        f"close code {code} cannot be sent; use 1000-1003, 1007-1014 or 3000-4999 "
        "(1012 for a restart, 1013 to ask for a later retry)"
    )


def close_frame(code: int, reason: str = "") -> bytes:
    """A complete, unmasked close frame, as a server sends it to a client.

    Raises:
        ValueError: the code cannot be sent, or the reason is longer than the
            123 bytes of UTF-8 a control frame leaves for it.
    """
    payload = _close_payload(code, reason)
    return bytes((0x80 | _OPCODE_CLOSE, len(payload))) + payload


def masked_close_frame(code: int, reason: str = "", *, mask_key: bytes | None = None) -> bytes:
    """A complete, masked close frame, as a client (the gateway, to a backend) sends it.

    The masking key is random unless given (RFC 6455 section 5.3 wants it unpredictable).

    Raises:
        ValueError: as :func:`close_frame`, or a ``mask_key`` that is not 4 bytes.
    """
    payload = _close_payload(code, reason)
    key = os.urandom(4) if mask_key is None else mask_key
    if len(key) != 4:
        raise ValueError("a masking key is 4 bytes")
    masked = bytes(byte ^ key[index & 3] for index, byte in enumerate(payload))
    return bytes((0x80 | _OPCODE_CLOSE, 0x80 | len(payload))) + key + masked


def _close_payload(code: int, reason: str) -> bytes:
    payload = check_close_code(code).to_bytes(2, "big") + reason.encode()
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise ValueError(f"close reason is {len(payload) - 2} bytes of UTF-8; at most 123 fit")
    return payload


def _parse_header(head: bytes) -> tuple[int, int, int] | None:
    """(header length, payload length, opcode) of the frame ``head`` starts with, or None
    while ``head`` is too short to hold the whole header."""
    if len(head) < 2:
        return None
    second = head[1]
    length = second & 0x7F
    header_size = 6 if second & 0x80 else 2
    if length == 126:
        header_size += 2
    elif length == 127:
        header_size += 8
    if len(head) < header_size:
        return None
    if length == 126:
        length = int.from_bytes(head[2:4], "big")
    elif length == 127:
        length = int.from_bytes(head[2:10], "big")
    return header_size, length, head[0] & 0x0F


class FrameTracker:
    """Where frames end in a stream of WebSocket frames fed chunk by chunk.

    Feed it every chunk the backend sends after its ``101`` response, in order.
    It trusts the stream to be well formed; it never raises on content.
    """

    __slots__ = ("_head", "_opcode", "_remaining")

    def __init__(self) -> None:
        self._remaining = 0  # payload bytes of the current frame not seen yet
        self._head = b""  # the start of a header cut by the end of the last chunk
        self._opcode = -1  # of the last frame whose header is complete

    @property
    def at_boundary(self) -> bool:
        """True when every byte fed so far belongs to complete frames."""
        return not self._remaining and not self._head

    @property
    def close_seen(self) -> bool:
        """True when the last frame (whole header seen) is a close frame.

        Nothing follows a close frame on a well-behaved stream, so this tells that
        the backend has sent its close and the gateway must not send another one.
        Reading the opcode once per chunk instead of once per frame keeps feed cheap.
        """
        return self._opcode == _OPCODE_CLOSE

    def feed(self, data: bytes) -> int:
        """Follow one chunk of the stream.

        Returns:
            The offset in ``data`` just after the last frame that ends inside it
            (``data[:offset]`` may be sent, then a close frame), or -1 when no
            frame ends in this chunk.
        """
        size = len(data)
        remaining = self._remaining
        if remaining > size:
            self._remaining = remaining - size
            return -1
        if self._head:
            pos = self._complete_header(data)
            if pos < 0:
                return -1
        else:
            pos = remaining  # zero when the chunk starts with a frame header
        # From here on ``pos`` is where a frame starts and the previous one ended,
        # so ``pos or -1`` is what feed returns.
        start = -1  # where the last frame that ended in this loop started
        limit = size - 1
        while pos < limit:
            second = data[pos + 1]
            if second < 126:
                # Unmasked with a 7-bit length: most frames a server sends.
                end = pos + 2 + second
            else:
                available = size - pos
                length = second & 0x7F
                header_size = 6 if second & 0x80 else 2
                if length == 126:
                    header_size += 2
                    if available < header_size:
                        break
                    length = data[pos + 2] << 8 | data[pos + 3]
                elif length == 127:
                    header_size += 8
                    if available < header_size:
                        break
                    length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                elif available < header_size:
                    break
                end = pos + header_size + length
            if end > size:
                self._remaining = end - size
                self._opcode = data[pos] & 0x0F
                return pos or -1
            start = pos
            pos = end
        if start >= 0:
            self._opcode = data[start] & 0x0F
        self._remaining = 0
        self._head = data[pos:]
        return pos or -1

    def _complete_header(self, data: bytes) -> int:
        """Finish the header kept from the last chunk; return where its frame ends in
        ``data``, or -1 if that is beyond ``data`` (or the header is still cut)."""
        kept = len(self._head)
        head = self._head + data[:14]
        parsed = _parse_header(head)
        if parsed is None:
            self._head = head  # still shorter than its header: at most 13 bytes
            return -1
        header_size, length, opcode = parsed
        self._opcode = opcode
        self._head = b""
        end = header_size - kept + length
        if end > len(data):
            self._remaining = end - len(data)
            return -1
        return end
