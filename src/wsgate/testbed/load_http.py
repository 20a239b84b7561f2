"""``wsgate load --http``: long HTTP requests from many workers (seed 004's client).

``--concurrency`` workers each keep one request in flight, pause for a think
time, and send the next, on keep-alive connections (one aiohttp connection pool
per source address, so ``--source-ips`` spreads them over client addresses).
Each response's ``pod`` field is counted per backend; refusals are retried no
sooner than their ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import aiohttp

from wsgate.testbed.load_plan import (
    ConnectPacer,
    LoadPlan,
    answer_pod,
    parse_retry_after,
    refusal_reason,
    retry_delay,
)
from wsgate.testbed.report import LoadStats

__all__ = ["HttpLoad"]

log = logging.getLogger("wsgate.load")

_REFUSALS = frozenset({429, 502, 503, 504})


class HttpLoad:
    """The workers of an HTTP run and the connection pools they share."""

    def __init__(self, plan: LoadPlan, stats: LoadStats) -> None:
        self.plan = plan
        self.stats = stats
        self.rng = random.Random(plan.seed)
        self.stopping = False
        self.log_responses = log.isEnabledFor(logging.INFO)
        self.pacer = ConnectPacer(plan.connect_rate) if plan.connect_rate else None
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}
        self._workers: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()

    def _session(self, source_ip: str | None) -> aiohttp.ClientSession:
        session = self._sessions.get(source_ip)
        if session is None:
            connector = aiohttp.TCPConnector(
                limit=0,
                local_addr=(source_ip, 0) if source_ip else None,
                ssl=self.plan.ssl_context() or True,
                keepalive_timeout=75,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.plan.connect_timeout),
                headers=self.plan.headers,
            )
            self._sessions[source_ip] = session
        return session

    async def start_async(self) -> None:
        count = self.plan.target_count
        per_client = max(1, -(-count // self.plan.clients))
        for index in range(count):
            client = index // per_client
            delay = (index % per_client) * self.plan.connect_interval
            self._workers.append(asyncio.create_task(self._worker(index, client, delay)))
            if index % 500 == 499:
                await asyncio.sleep(0)

    async def _pause(self, delay: float) -> bool:
        """Sleep; ``True`` when the run stopped meanwhile."""
        if delay > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
            except TimeoutError:
                return False
        return self.stopping

    async def _worker(self, index: int, client: int, start_delay: float) -> None:
        plan = self.plan
        stats = self.stats
        target = plan.target(client)
        session = self._session(plan.source_ip(client))
        if await self._pause(start_delay):
            return
        attempt = 0
        while not self.stopping:
            if self.pacer is not None and await self._pause(self.pacer.wait(time.monotonic())):
                return
            stats.attempted += 1
            stats.sent += 1
            stats.open += 1
            stats.peak_open = max(stats.peak_open, stats.open)
            started = time.perf_counter_ns()
            status = 0
            body = b""
            retry_after = None
            try:
                async with session.get(target.url) as response:
                    stats.connect_latency.record_value(
                        max(1, (time.perf_counter_ns() - started) // 1000)
                    )
                    status = response.status
                    retry_after = response.headers.get("Retry-After")
                    body = await response.read()
            except asyncio.CancelledError:
                stats.open -= 1
                stats.failed["cut short at the end"] += 1
                raise
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                stats.open -= 1
                stats.failed[type(error).__name__] += 1
                log.info("Request to %s failed: %s", target.url, error)
                attempt += 1
                if await self._pause(
                    retry_delay(
                        attempt, None, self.rng, base=plan.backoff_base, cap=plan.backoff_max
                    )
                ):
                    return
                continue
            stats.open -= 1
            stats.received += 1
            stats.rtt.record_value(max(1, (time.perf_counter_ns() - started) // 1000))
            if 200 <= status < 300:
                attempt = 0
                stats.established += 1
                pod = answer_pod(body) or "unknown"
                stats.by_backend[pod] += 1
                if self.log_responses:
                    log.info(
                        "Response from Pod %s at %s: %s",
                        pod,
                        time.strftime("%H:%M:%S"),
                        body[:200].decode(errors="replace"),
                    )
                if await self._pause(plan.think.draw(self.rng)):
                    return
                continue
            wait = parse_retry_after(retry_after)
            if status in _REFUSALS:
                stats.refused(status, refusal_reason(body), wait)
            else:
                stats.failed[str(status)] += 1
            delay = retry_delay(
                attempt,
                wait,
                self.rng,
                base=plan.backoff_base,
                cap=plan.backoff_max,
            )
            attempt += 1
            if await self._pause(delay):
                return

    async def stop(self, grace: float = 5.0) -> None:
        """Stop sending; requests still in flight after ``grace`` seconds are abandoned."""
        self.stopping = True
        self._stop.set()
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        for session in self._sessions.values():
            await session.close()
