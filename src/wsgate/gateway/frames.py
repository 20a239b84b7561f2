"""Frame boundaries on a relayed byte stream, where the gateway may write a close frame.

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

from wsgate.gateway._relay import FrameTracker
from wsgate.wire import CloseCode, check_close_code, close_frame, masked_close_frame

# The close frames themselves are plain bytes, built by wsgate.wire; they are named
# here too so the data plane finds beside the tracker all it writes between frames.
__all__ = ["CloseCode", "FrameTracker", "check_close_code", "close_frame", "masked_close_frame"]
