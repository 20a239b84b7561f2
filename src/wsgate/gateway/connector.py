"""Connections to backends: opened with a timeout, pooled for keep-alive HTTP.

The connector opens :class:`~wsgate.gateway.upstream.Upstream` connections and
keeps the idle ones; for an upgrade to a plain-TCP backend it has the relay
dial instead (:mod:`wsgate.gateway.dial`). It blames no one. A connect that fails raises
:class:`ConnectFailed` (the caller records it against the backend) or, when
the gateway's own limits stopped it, :class:`OutOfResources`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import os
import time
from typing import Any, NamedTuple

from wsgate.edge.tls import TlsError, backend_tls
from wsgate.gateway._relay import Link, Relay
from wsgate.gateway.deadlines import Deadlines
from wsgate.gateway.dial import Dial
from wsgate.gateway.upstream import Upstream
from wsgate.upstreams.pool import Backend

__all__ = ["OWN_LIMITS", "ConnectFailed", "Connector", "Dialed", "OutOfResources"]

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


class Dialed(NamedTuple):
    """What a dial came to once the backend took the connection."""

    link: Link  # holds the backend's socket until attached, taken or aborted
    answer: bytes  # the response head as read (and what came with it)
    error: int  # 0: answered; else the backend failed before its head ended


@functools.lru_cache(maxsize=4096)
def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


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
        self._connect_timeout = connect_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.relay: Relay | None = None  # dials upgrades when given (dial_with)
        self._idle: dict[str, list[Upstream]] = {}
        # Every connect's deadline, behind one timer (a connect nearly always
        # ends long before it).
        self._deadlines: Deadlines | None = None

    @property
    def connect_timeout(self) -> float:
        return self._connect_timeout

    @connect_timeout.setter
    def connect_timeout(self, seconds: float) -> None:  # a reload may change it
        self._connect_timeout = seconds
        if self._deadlines is not None:
            self._deadlines.delay = seconds

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._deadlines = Deadlines(loop, self._connect_timeout)

    def dial_with(self, relay: Relay | None) -> None:
        """Have ``relay`` open upgrades' backend connections (None: transports only)."""
        self.relay = relay

    def dials(self, backend: Backend) -> bool:
        """Whether an upgrade to ``backend`` is dialed by the relay.

        Only plain TCP to an address: the relay resolves no names and speaks no TLS.
        """
        return self.relay is not None and backend.tls is None and _is_ip(backend.host)

    async def dial(self, backend: Backend, request: bytes) -> Dialed:
        """Have the relay connect to ``backend``, write ``request`` and read the answer's head.

        Raises:
            ConnectFailed: the backend refused, could not be reached, or was too slow
                to take the connection.
            OutOfResources: the gateway's own open-files limit (or memory).
        """
        relay, loop, deadlines = self.relay, self.loop, self._deadlines
        assert relay is not None and loop is not None and deadlines is not None, (
            "Connector.start and dial_with first"
        )
        dial = Dial(loop.create_future())
        try:
            link = dial.link = relay.dial(backend.host, backend.port, request, dial)
        except OSError as error:
            if error.errno in OWN_LIMITS:
                raise OutOfResources(error) from None
            raise ConnectFailed(f"connect failed: {error}") from None
        deadlines.set(dial, dial.expire)
        try:
            answer, failure = await dial.future
        except asyncio.CancelledError:
            link.abort()  # the client left: the backend's socket is closed now
            raise
        finally:
            deadlines.cancel(dial)
        if failure and not link.connected:
            if failure in OWN_LIMITS:
                raise OutOfResources(os.strerror(failure))
            if failure == errno.ETIMEDOUT:
                raise ConnectFailed("connect failed: timeout")
            raise ConnectFailed(f"connect failed: [Errno {failure}] {os.strerror(failure)}")
        return Dialed(link, answer, failure)

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
        loop, deadlines = self.loop, self._deadlines
        assert loop is not None and deadlines is not None, "Connector.start first"
        # What asyncio.timeout does, without its per-use objects and running-loop
        # lookups (each a getpid() system call on Python 3.11): this is paid once
        # per upgrade.
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        deadline = _Deadline(task)
        deadlines.set(deadline, deadline.expire)
        error: OSError | None = None
        try:
            context, server_name = backend_tls(backend.tls, backend.host)
        except TlsError as failure:
            deadlines.cancel(deadline)
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
            deadlines.cancel(deadline)
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
        self.relay = None
        if self._deadlines is not None:
            self._deadlines.close()
        for idle in list(self._idle.values()):
            for upstream in list(idle):
                upstream.abandon()
        self._idle.clear()
