"""Connections to backends: opened with a timeout, pooled for keep-alive HTTP."""

from __future__ import annotations

import asyncio
import errno
import time
from typing import TYPE_CHECKING, Any

from wsgate.gateway.proxy import OutOfResources, Upstream
from wsgate.upstreams.pool import Backend

if TYPE_CHECKING:
    from wsgate.gateway.server import Gateway

__all__ = ["OWN_LIMITS", "Connector"]

# Idle keep-alive connections kept per backend, and for how long.
POOL_SIZE = 64
POOL_IDLE = 30.0


class _Deadline:
    """Cancels the task that waits for a connect; tells that cancel from any other."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[Any]):
        self.task = task
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


# Connect errors that are the gateway's own limits, not the backend's fault.
OWN_LIMITS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Connector:
    def __init__(self, gateway: Gateway):
        self.gw = gateway
        self._idle: dict[str, list[Upstream]] = {}

    async def acquire(self, backend: Backend, *, pooled: bool) -> Upstream | None:
        """A connection to ``backend`` (an idle pooled one for HTTP), or None when it fails.

        Raises:
            OutOfResources: the gateway's own open-files limit (or memory) stopped
                the connect; the backend is not blamed.
        """
        if pooled:
            idle = self._idle.get(backend.id)
            while idle:
                upstream = idle.pop()
                if not upstream.closed:
                    return upstream
        gw = self.gw
        loop = gw.loop
        # What asyncio.timeout does, without its per-use objects and running-loop
        # lookups (each a getpid() system call on Python 3.11): this is paid once
        # per upgrade.
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        deadline = _Deadline(task)
        timer = loop.call_later(gw.config.timeouts.connect, deadline.expire)
        error: OSError | None = None
        try:
            _, upstream = await loop.create_connection(
                lambda: Upstream(gw, backend), backend.host, backend.port
            )
        except asyncio.CancelledError:
            if not (deadline.expired and task.uncancel() <= cancelling):
                raise  # cancelled from elsewhere (the client left): not a backend failure
            error = TimeoutError()
        except OSError as failure:
            error = failure
        finally:
            timer.cancel()
        if error is not None and error.errno in OWN_LIMITS:
            raise OutOfResources(error) from None
        if error is not None:
            backend.connect_failures_total += 1
            gw.pool.record_failure(backend, f"connect failed: {error or 'timeout'}")
            return None
        # Success is recorded when the backend answers: a backend that accepts
        # connections but refuses every upgrade must still be ejected.
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
