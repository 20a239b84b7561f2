"""Active health checks: GET ``health.path`` on every backend, every ``interval``,
spread over the interval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from wsgate.config import HealthConfig
from wsgate.edge.tls import TlsError, backend_tls
from wsgate.upstreams.pool import Backend, BackendPool

__all__ = ["HealthChecker", "probe"]

log = logging.getLogger("wsgate.health")


async def probe(backend: Backend, path: str, limit: float) -> bool:
    """One check: a 2xx answer within ``limit`` seconds is healthy (over TLS to a TLS backend)."""
    writer: asyncio.StreamWriter | None = None
    try:
        context, server_name = backend_tls(backend.tls, backend.host)
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(
                backend.host, backend.port, ssl=context, server_hostname=server_name
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {backend.address}\r\n"
                "User-Agent: wsgate-health\r\nConnection: close\r\n\r\n".encode()
            )
            status_line = await reader.readline()
    except (OSError, TimeoutError, TlsError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = status_line.split()
    return len(parts) >= 2 and parts[1].startswith(b"2")


class HealthChecker:
    def __init__(self, pool: BackendPool, config: HealthConfig):
        self.pool = pool
        self.config = config
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def sync(self) -> None:
        """Start checks for new backends, stop them for backends that left."""
        if not self.config.enabled:
            # Checks turned off (at start or by a reload): every backend counts as healthy.
            for task in self._tasks.values():
                task.cancel()
            self._tasks.clear()
            for backend in self.pool:
                backend.healthy = True
            self.pool.changed()
            return
        present = {backend.id: backend for backend in self.pool}
        for backend_id, task in list(self._tasks.items()):
            if backend_id not in present:
                task.cancel()
                del self._tasks[backend_id]
        for backend_id, backend in present.items():
            if backend_id not in self._tasks:
                self._tasks[backend_id] = asyncio.create_task(
                    self._check_forever(backend), name=f"health:{backend_id}"
                )

    async def _check_forever(self, backend: Backend) -> None:
        # Spread the checks over the whole interval, so a thousand backends make a
        # steady trickle of probes rather than a burst every interval. A backend
        # waiting for its first passing check (one discovery added) goes soon.
        spread = self.config.interval if backend.healthy else min(self.config.interval, 0.2)
        await asyncio.sleep(random.uniform(0, spread))
        while True:
            config = self.config
            ok = await probe(backend, config.path, config.timeout)
            self.observe(backend, ok)
            await asyncio.sleep(config.interval)

    def observe(self, backend: Backend, ok: bool) -> None:
        config = self.config
        if ok:
            backend.check_failures = 0
            backend.check_successes += 1
            if not backend.healthy and backend.check_successes >= config.healthy_threshold:
                backend.healthy = True
                self.pool.changed()
                log.info("backend %s is healthy", backend.id)
        else:
            backend.check_successes = 0
            backend.check_failures += 1
            if backend.healthy and backend.check_failures >= config.unhealthy_threshold:
                backend.healthy = False
                self.pool.changed()
                log.warning(
                    "backend %s is unhealthy after %d failed checks",
                    backend.id,
                    backend.check_failures,
                )

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        for task in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
