"""The access log: one JSON line per finished connection or request, on stdout.

It is written on the connection path, so it does not go through ``logging``
(a record, a formatter and a flushed write per line cost more than the rest
of a connection's set-up). Lines are buffered and written together at most
``FLUSH_INTERVAL`` after the first of them, or as soon as ``FLUSH_BYTES``
have gathered; a process killed with SIGKILL loses at most that much.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, BinaryIO

__all__ = ["FLUSH_BYTES", "FLUSH_INTERVAL", "AccessLog"]

FLUSH_INTERVAL = 0.1
FLUSH_BYTES = 64 * 1024

_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None):
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def write(self, record: dict[str, Any]) -> None:
        line = _encode(record)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = ("\n".join(self._lines) + "\n").encode()
        self._lines.clear()
        self._size = 0
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or gone: the log is lost, the gateway goes on
