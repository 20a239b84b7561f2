"""The access log: one JSON line per finished connection or request, on stdout.

It is written on the connection path, so it does not go through ``logging``
(a record, a formatter and a flushed write per line cost more than the rest
of a connection's set-up). Lines are buffered and written together at most
``FLUSH_INTERVAL`` after the first of them, or as soon as ``FLUSH_BYTES``
have gathered; a process killed with SIGKILL loses at most that much.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
from typing import Any, BinaryIO

from wsgate.gateway.outcomes import Kind
from wsgate.gateway.stats import Stats

__all__ = ["FLUSH_BYTES", "FLUSH_INTERVAL", "AccessLog", "Record", "RequestLog"]

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


class RequestLog:
    """Request ids, and the line each finished or refused connection leaves.

    The data plane is given this and nothing more of the gateway's output.
    ``enabled`` follows the ``access_log`` setting (a reload may change it).
    """

    def __init__(
        self,
        replica_id: str,
        stats: Stats,
        *,
        enabled: bool = True,
        out: AccessLog | None = None,
    ):
        self.replica_id = replica_id
        self.stats = stats
        self.enabled = enabled
        self.out = out if out is not None else AccessLog()
        self._prefix = os.urandom(6).hex()
        self._serials = itertools.count(1)

    def new_request_id(self) -> str:
        """A request id unique to this process: a random prefix and a counter."""
        return f"{self._prefix}-{next(self._serials):x}"

    def write(self, **fields: Any) -> None:
        """One line of ``fields``; those that are None are left out."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "replica": self.replica_id}
        record.update((k, v) for k, v in fields.items() if v is not None)
        duration = fields.get("duration")
        if isinstance(duration, float):
            record["duration"] = round(duration, 4)
        self.out.write(record)

    def finished(self, record: Record, outcome: str) -> None:
        """Count and log one admitted connection that has ended."""
        stats = self.stats
        duration = time.monotonic() - record.started
        stats.observe_duration(record.kind, duration)
        stats.bytes_from_clients += record.bytes_in
        stats.bytes_to_clients += record.bytes_out
        if not self.enabled:
            return  # the line's eleven fields would be built for nothing
        self.write(
            kind=record.kind, client=record.client_ip, backend=record.backend_id,
            status=record.status, outcome=outcome, duration=duration,
            bytes_in=record.bytes_in, bytes_out=record.bytes_out,
            request_id=record.request_id, affinity="fallback" if record.fallback else None,
        )  # fmt: skip

    def flush(self) -> None:
        self.out.flush()


class Record:
    """What one admitted connection reports when it ends: its log line and its counts."""

    __slots__ = (
        "backend_id", "bytes_in", "bytes_out", "client_ip", "fallback", "kind",
        "request_id", "started", "status",
    )  # fmt: skip

    def __init__(
        self,
        kind: Kind,
        client_ip: str,
        request_id: str,
        started: float,
        backend_id: str,
        *,
        fallback: bool = False,
    ):
        self.kind = kind
        self.client_ip = client_ip
        self.request_id = request_id
        self.started = started
        self.backend_id = backend_id
        self.fallback = fallback  # affinity wanted another backend
        self.status = 0
        self.bytes_in = 0  # from the client
        self.bytes_out = 0  # to the client
