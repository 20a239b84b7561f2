"""Following the backends: a static list, or the snapshots of a discovery source.

The :class:`BackendFollower` makes the pool match what the config or the
source says. A backend that appears takes connections once healthy; one that
leaves takes no new connections, its idle keep-alive connections are closed,
and its live sessions are closed with 1001 at a frame boundary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from wsgate.config import BackendSpec, ConfigError, DnsDiscovery, FileDiscovery
from wsgate.gateway.outcomes import CloseReason
from wsgate.upstreams.discovery import BackendSource, source_for
from wsgate.upstreams.health import HealthChecker
from wsgate.upstreams.pool import BackendPool
from wsgate.wire import CloseCode

__all__ = ["BackendFollower", "discovery_source"]

log = logging.getLogger("wsgate.backends")


def discovery_source(config: DnsDiscovery | FileDiscovery) -> BackendSource:
    """The source a discovery config names; a source that cannot be built is a config mistake."""
    try:
        return source_for(config)
    except ValueError as error:
        raise ConfigError(f"backends: {error}") from None


class BackendFollower:
    def __init__(
        self,
        pool: BackendPool,
        health: HealthChecker,
        drop_idle: Callable[[str], None],
    ):
        self.pool = pool
        self.health = health
        self._drop_idle = drop_idle  # the connector's: idle connections to a backend that left
        self._task: asyncio.Task[None] | None = None

    async def follow(self, source: BackendSource, *, initial: bool, wait: float = 0.0) -> None:
        """Feed ``source``'s snapshots into the pool from now on; wait up to ``wait``
        seconds for the first one."""
        self.stop()
        first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._discover(source, initial, first), name="discovery")
        if wait > 0:
            try:
                await asyncio.wait_for(asyncio.shield(first), wait)
            except TimeoutError:
                log.warning("no backends from %s after %.0fs; listening anyway", source, wait)

    def stop(self) -> None:
        """Stop following a source (the backends stay as they are)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _discover(
        self, source: BackendSource, initial: bool, first: asyncio.Future[None]
    ) -> None:
        log.info("following backends from %s every %gs", source, source.refresh)
        while True:
            try:
                async for specs in source.snapshots():
                    self.apply(specs, initial=initial)
                    initial = False
                    if not first.done():
                        first.set_result(None)
            except Exception:
                # Sources report their own failures; this is for the unforeseen ones.
                log.exception("following %s failed; trying again", source)
            await asyncio.sleep(source.refresh)

    def apply(self, specs: Iterable[BackendSpec], *, initial: bool = False) -> None:
        """Make the pool match ``specs`` (a snapshot); drain the backends that left.

        New backends take connections once healthy (at start: at once, as with a
        static list).
        """
        added, removed = self.pool.update(specs, initial=initial)
        self.health.sync()
        for backend in added:
            wait = "" if backend.healthy else ", waiting for its health checks"
            log.info("backend %s (%s) added%s", backend.id, backend.address, wait)
        for backend in removed:
            sessions = list(backend.connections)
            log.info(
                "backend %s (%s) removed: no new connections, closing its %d sessions",
                backend.id, backend.address, len(sessions),
            )  # fmt: skip
            self._drop_idle(backend.id)
            for session in sessions:
                session.close_gracefully(CloseCode.GOING_AWAY, CloseReason.BACKEND_REMOVED)
