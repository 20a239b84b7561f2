"""Script calls made while another batch is out leave together as one pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from wsgate.admission.redis.connection import StateUnavailable, describe_failure
from wsgate.admission.redis.script import SCRIPT, SCRIPT_SHA, ScriptCall, delayed, evalsha

__all__ = ["ScriptCaller", "ScriptPipeline"]


def _consume(future: asyncio.Future[Any]) -> None:
    """Mark a failure as seen even when its caller stopped waiting for it."""
    if not future.cancelled():
        future.exception()


@dataclass(slots=True)
class _Queued:
    """A script call waiting for its batch, and when it was made (loop time)."""

    call: ScriptCall
    reply: asyncio.Future[Any]
    submitted: float
    on_sent: Callable[[], None] | None


class ScriptPipeline:
    """Script calls made while another batch is out go to Redis together.

    The first call goes at once; calls made while a batch is on its way wait
    for it and then leave together as one pipeline (one write, one round trip).
    Each call stays its own atomic run of the script: batching only saves round
    trips and per-command work when many connections arrive at once.
    """

    def __init__(self, key: str, timeout: float):
        self._key = key
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None

    def submit(
        self,
        client: aioredis.Redis,
        call: ScriptCall,
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> asyncio.Future[Any]:
        """The raw reply of one script call, or StateUnavailable.

        ``on_sent`` runs as the call leaves: a caller's clock starts there, not
        while it waits behind the batch in flight (that batch is bounded by
        ``timeout`` of its own).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_consume)
        self._queue.append(_Queued(call, future, loop.time(), on_sent))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all(client))
        return future

    def cancel(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        for queued in self._queue:
            queued.reply.cancel()
        self._queue = []

    async def _send_all(self, client: aioredis.Redis) -> None:
        while self._queue:
            batch = [queued for queued in self._queue if not queued.reply.done()]
            self._queue = []
            if batch:
                await self._send(client, batch)

    async def _send(self, client: aioredis.Redis, batch: list[_Queued]) -> None:
        now = asyncio.get_running_loop().time()
        calls = [delayed(queued.call, now - queued.submitted) for queued in batch]
        for queued in batch:
            if queued.on_sent is not None:
                queued.on_sent()
        try:
            async with asyncio.timeout(self._timeout):
                if len(calls) == 1:
                    results: list[Any] = [await evalsha(client, self._key, calls[0])]
                else:
                    results = await self._many(client, calls)
        except (TimeoutError, RedisError, RedisClusterException, OSError) as error:
            results = [error] * len(batch)
        for queued, result in zip(batch, results, strict=True):
            future = queued.reply
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(StateUnavailable(describe_failure(result)))
            else:
                future.set_result(result)

    async def _many(self, client: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
        results = await self._pipelined(client, calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            await client.script_load(SCRIPT)
            again = await self._pipelined(client, [calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipelined(self, client: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
        if isinstance(client, RedisCluster):
            # A cluster pipeline refuses scripts: the calls go side by side instead,
            # each to the shard of its key (all of a namespace's keys share one slot).
            runs = (client.evalsha(SCRIPT_SHA, 1, self._key, *call) for call in calls)
            return list(await asyncio.gather(*runs, return_exceptions=True))
        pipe = client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(SCRIPT_SHA, 1, self._key, *call)
        return list(await pipe.execute(raise_on_error=False))


def _pass_on(waiter: asyncio.Future[Any], reply: asyncio.Future[Any]) -> None:
    """Give a script call's outcome to the caller waiting for it, unless it stopped."""
    if waiter.done():
        return
    if reply.cancelled():
        waiter.cancel()
    elif (error := reply.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(reply.result())


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class ScriptCaller:
    """Script calls bounded by ``timeout``, with the calls in flight counted.

    A re-registration must wait until none of the replica's calls is in flight,
    and a renewal must know whether it ran alone: both read the counts here.
    """

    def __init__(self, key: str, timeout: float):
        self.timeout = timeout
        self.client: aioredis.Redis | None = None
        self.in_flight = 0
        self.started = 0  # calls ever started, to tell a renewal that ran alone
        self._pipeline = ScriptPipeline(key, timeout)
        self._idle = asyncio.Event()
        self._idle.set()

    async def disconnect(self) -> None:
        self._pipeline.cancel()
        client, self.client = self.client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    def send(self, call: ScriptCall) -> asyncio.Future[Any] | None:
        """Send without waiting (None when not connected); the reply settles later."""
        client = self.client
        if client is None:
            return None
        self._started()
        reply = self._pipeline.submit(client, call)
        reply.add_done_callback(self._settled)
        return reply

    async def call(
        self, call: ScriptCall, *, abandoned: Callable[[asyncio.Future[Any]], None] | None = None
    ) -> Any:
        """One script call and its raw reply, or StateUnavailable.

        If the caller is cancelled, the call still completes; ``abandoned`` then
        gets its outcome, so that what it did in Redis can be undone.
        """
        client = self.client
        if client is None:
            raise StateUnavailable("not connected")
        self._started()
        # The caller waits on a future of its own, so that its cancellation or its
        # timeout leaves the reply to the pipeline (what asyncio.shield and
        # asyncio.timeout would do, for one future and one timer: this runs once
        # per admission). Its clock starts as the call leaves: time spent queued
        # behind the batch in flight says nothing about Redis (and that batch's
        # own bound covers a stalled Redis).
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        timer: asyncio.TimerHandle | None = None

        def start_clock() -> None:
            nonlocal timer
            timer = loop.call_later(self.timeout, _expire, waiter)

        reply = self._pipeline.submit(client, call, on_sent=start_clock)
        reply.add_done_callback(functools.partial(_pass_on, waiter))
        try:
            return await waiter
        except TimeoutError:
            raise StateUnavailable(f"no answer within {self.timeout * 1000:g}ms") from None
        except asyncio.CancelledError:
            if abandoned is not None:
                reply.add_done_callback(abandoned)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            self._settled()

    async def wait_idle(self) -> bool:
        """Wait for every call in flight to settle (each is bounded by ``timeout``)."""
        try:
            async with asyncio.timeout(self.timeout * 2 + 0.5):
                while self.in_flight:
                    await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _started(self) -> None:
        self.in_flight += 1
        self.started += 1
        self._idle.clear()

    def _settled(self, _reply: object = None) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()
