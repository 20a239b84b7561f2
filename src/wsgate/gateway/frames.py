"""WebSocket close frames, and frame boundaries on a relayed byte stream.

The relay forwards backend-to-client bytes as they come and never decodes
messages. To close a session on purpose (1001 on drain, 1012 on rebalance,
1013 when over capacity) it must still write its close frame *between* two
frames, never inside one. :class:`FrameTracker` (in C, with the relay that
uses it: ``_relay.c``) follows the frame headers of that stream (RFC 6455
section 5.2) and nothing else:

- payload is skipped by arithmetic: no copy, no unmasking, no loop over its bytes;
- when a chunk ends inside a payload, the next chunk usually costs one comparison
  and one subtraction;
- a header cut by a chunk boundary is kept (at most 13 bytes) until it completes;
- per chunk, the work is proportional to the number of frame headers in it.

Control frames may sit between the fragments of a message (RFC 6455 section
5.4), so every frame end is a place where a close frame may be written.
Extensions such as permessage-deflate change payloads, not framing, so they
do not matter here. The tracker trusts the stream to be well formed and never
raises on content; feed it every chunk the backend sends after its ``101``.
"""

from __future__ import annotations

import os
from enum import IntEnum

from wsgate.gateway._relay import FrameTracker

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
