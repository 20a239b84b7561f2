"""An upgrade's backend connection, opened by the relay's C code.

For a WebSocket upgrade to a plain-TCP backend the relay connects, writes the
request and reads the response head itself (``Relay.dial``,
:mod:`wsgate.gateway._relay`), on the event loop's thread in ``Relay.report``:
the backend's socket never becomes an event-loop transport, and the relay's
own thread first sees it as a session's. A :class:`Dial` is the owner the
relay reports the answer to, and how the exchange waits for it: a future,
settled once, by the answer, by a failure, or by the connect deadline.
"""

from __future__ import annotations

import asyncio
import errno

from wsgate.gateway._relay import Link

__all__ = ["ANSWER_CUT", "Dial", "answered"]

# The relay's error for a backend that closed before its response head ended.
ANSWER_CUT = -1


class Dial:
    """One dial: settled with ``(answer, error)``; error 0, an errno, or ANSWER_CUT.

    ``link`` is the relay's, once it has taken the dial.
    """

    __slots__ = ("future", "link")

    def __init__(self, future: asyncio.Future[tuple[bytes, int]]):
        self.future = future
        self.link: Link | None = None

    def answered(self, answer: bytes, error: int) -> None:
        """The relay's report (a dial given up before it came is settled already)."""
        if not self.future.done():
            self.future.set_result((answer, error))

    def expire(self) -> None:
        """The connect deadline: a dial still connecting is given up as timed out.

        Once connected, the backend has the request and may take its time to
        answer, as it may through a transport.
        """
        link = self.link
        if link is not None and not link.connected and link.abort():
            self.answered(b"", errno.ETIMEDOUT)


def answered(dial: object, answer: bytes, error: int) -> None:
    """The relay's ``on_answer``."""
    assert isinstance(dial, Dial)
    dial.answered(answer, error)
