"""Connections to backends: opened with a timeout, pooled for keep-alive HTTP.

The connector opens :class:`~wsgate.gateway.upstream.Upstream` connections and
keeps the idle ones; it blames no one. A connect that fails raises
:class:`ConnectFailed` (the caller records it against the backend) or, when
the gateway's own limits stopped it, :class:`OutOfResources`.
"""

from __future__ import annotations

import asyncio
import errno
import time
from typing import Any

from wsgate.edge.tls import TlsError, backend_tls
from wsgate.gateway.upstream import Upstream
from wsgate.upstreams.pool import Backend

__all__ = ["OWN_LIMITS", "ConnectFailed", "Connector", "OutOfResources"]

# Idle keep-alive connections kept per backend, and for how long.
POOL_SIZE = 64
POOL_IDLE = 30.0

# Connect errors that are the gateway's own limits, not the backend's fault.
OWN_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class OutOfResources(Exception):
    """The gateway has no descriptor (or memory) for one more backend connection."""


class ConnectFailed(Exception):
    """The backend did not take the connection (refused, unreachable, timed out)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Deadline:
    """Cancels the task that waits for a connect; tells that cancel from any other."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


class Connector:
    """Opens backend connections within ``connect_timeout`` and keeps idle ones for reuse."""

    def __init__(self, connect_timeout: float):
        self.connect_timeout = connect_timeout  # a reload may change it
        self.loop: asyncio.AbstractEventLoop | None = None
        self._idle: dict[str, list[Upstream]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    async def acquire(self, backend: Backend, *, pooled: bool) -> Upstream:
        """A connection to ``backend`` (an idle pooled one for HTTP).

        Raises:
            ConnectFailed: the backend refused, could not be reached, or was too slow.
            OutOfResources: the gateway's own open-files limit (or memory) stopped
                the connect; the backend is not to be blamed.
        """
        if pooled:
            idle = self._idle.get(backend.id)
            while idle:
                upstream = idle.pop()
                if not upstream.closed:
                    return upstream
        loop = self.loop
        assert loop is not None, "Connector.start first"
        # What asyncio.timeout does, without its per-use objects and running-loop
        # lookups (each a getpid() system call on Python 3.11): this is paid once
        # per upgrade.
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        deadline = _Deadline(task)
        timer = loop.call_later(self.connect_timeout, deadline.expire)
        error: OSError | None = None
        try:
            context, server_name = backend_tls(backend.tls, backend.host)
        except TlsError as failure:
            timer.cancel()
            raise ConnectFailed(str(failure)) from None
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(backend, self.forget),
                backend.host,
                backend.port,
                ssl=context,
                server_hostname=server_name,
            )
        except asyncio.CancelledError:
            if not (deadline.expired and task.uncancel() <= cancelling):
                raise  # cancelled from elsewhere (the client left): not a backend failure
            error = TimeoutError()
        except OSError as failure:
            error = failure
        finally:
            timer.cancel()
        if error is not None:
            if error.errno in OWN_LIMITS:
                raise OutOfResources(error) from None
            raise ConnectFailed(f"connect failed: {error or 'timeout'}") from None
        return upstream

    def give_back(self, upstream: Upstream) -> None:
        """Keep a finished HTTP connection for the next request, if it can be reused."""
        idle = self._idle.setdefault(upstream.backend.id, [])
        if upstream.closed or not upstream.reader.reusable or len(idle) >= POOL_SIZE:
            upstream.abandon()
            return
        upstream.idle_since = time.monotonic()
        idle.append(upstream)

    def forget(self, upstream: Upstream) -> None:
        idle = self._idle.get(upstream.backend.id)
        if idle and upstream in idle:
            idle.remove(upstream)

    def drop_idle(self, backend_id: str) -> None:
        """Close the idle connections to a backend that has left."""
        for upstream in self._idle.pop(backend_id, []):
            upstream.abandon()

    def expire_idle(self) -> None:
        cutoff = time.monotonic() - POOL_IDLE
        for idle in list(self._idle.values()):
            for upstream in [u for u in idle if u.idle_since < cutoff]:
                upstream.abandon()

    def close(self) -> None:
        for idle in list(self._idle.values()):
            for upstream in list(idle):
                upstream.abandon()
        self._idle.clear()
