"""Script calls made while another batch is out leave together as one pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from wsgate.admission.redis.connection import StateUnavailable, describe_failure
from wsgate.admission.redis.script import (
    SCRIPT,
    SCRIPT_SHA,
    ScriptCall,
    batch_call,
    batches_of,
    delayed,
)

__all__ = ["PatientTimer", "ScriptCaller", "ScriptPipeline"]

_T = TypeVar("_T")

# A timer that fires later than this was kept waiting by this process's own loop.
_LATE = 0.010
# However busy the loop, a timeout is given at most this many times its length.
_MOST_STRETCH = 10


class PatientTimer:
    """A timeout that does not count the time this process's own event loop was busy.

    When the loop spends 50 ms on one iteration (a burst of accepts), a reply
    can sit read but unprocessed in a callback queued behind the expired timer,
    and libuv runs due timers before the rest. A timer that fires late shows
    exactly that, so it waits again for as long as it was kept waiting; the
    timeout holds when it fires on time (then Redis, not this process, is slow)
    or once it has waited ``_MOST_STRETCH`` times its length in all. Redis's own
    deadline on admissions still voids what arrives there too late.
    """

    __slots__ = ("_due", "_expire", "_handle", "_last", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, expire: Callable[[], None]):
        self._loop = loop
        self._expire = expire
        self._due = loop.time() + timeout
        self._last = self._due + timeout * (_MOST_STRETCH - 1)
        self._handle = loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > _LATE and now < self._last:
            self._due = min(now + late, self._last)
            self._handle = self._loop.call_at(self._due, self._fire)
            return
        self._expire()

    def cancel(self) -> None:
        self._handle.cancel()


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


class ScriptPipeline:
    """Script calls made while another batch is out go to Redis together.

    The first call goes at once; calls made while a batch is on its way wait
    for it and then leave together as one ``batch`` call of the script (or a
    few, see ``batches_of``, in one pipeline): one write, one round
    trip, and the script's set-up paid once. Each call keeps its own ARGV,
    deadline and reply, and is decided on what the calls before it left, as if
    it had been its own run of the script.
    """

    def __init__(self, key: str, timeout: float):
        self._key = key
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._sender: asyncio.Task[None] | None = None
        # The connection the batches go on, and the client whose pool it is of
        # (closing that client closes it).
        self._connection: AbstractConnection | None = None
        self._connection_of: aioredis.Redis | None = None

    def submit(self, client: aioredis.Redis, call: ScriptCall) -> asyncio.Future[Any]:
        """The raw reply of one script call, or StateUnavailable.

        It settles within two timeouts: the batch in flight is bounded by one,
        then the call's own batch by another.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(_consume)
        self._queue.append(_Queued(call, future, loop.time()))
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send_all(client))
        return future

    def cancel(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        for queued in self._queue:
            queued.reply.cancel()
        self._queue = []
        self._connection = self._connection_of = None

    async def _send_all(self, client: aioredis.Redis) -> None:
        while self._queue:
            batch = [queued for queued in self._queue if not queued.reply.done()]
            self._queue = []
            if batch:
                await self._send(client, batch)

    async def _send(self, client: aioredis.Redis, batch: list[_Queued]) -> None:
        now = asyncio.get_running_loop().time()
        calls = [delayed(queued.call, now - queued.submitted) for queued in batch]
        try:
            results = await self._bounded(self._calls(client, calls))
        except (TimeoutError, RedisError, RedisClusterException, OSError) as error:
            results = [error] * len(batch)
        except asyncio.CancelledError:
            for queued in batch:
                queued.reply.cancel()  # the pipeline is closing (cancel): as the queued ones
            raise
        for queued, result in zip(batch, results, strict=True):
            future = queued.reply
            if future.done():
                continue
            if isinstance(result, TimeoutError):
                future.set_exception(
                    StateUnavailable(f"no answer within {self._timeout * 1000:g}ms")
                )
            elif isinstance(result, BaseException):
                future.set_exception(StateUnavailable(describe_failure(result)))
            else:
                future.set_result(result)

    async def _bounded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """``work``, or TimeoutError after ``timeout`` (of a :class:`PatientTimer`).

        ``work`` runs in the sender's own task, which the timer cancels (as
        ``asyncio.timeout`` does, with the timer's patience), rather than in a
        task of its own made to be cancelled: under a set-up load most batches
        are of one call, and that task's start and wake-up were paid for each.
        A cancellation of the sender from outside (:meth:`cancel`) stays one:
        only the timer's own becomes a timeout.
        """
        task = asyncio.current_task()
        assert task is not None  # the sender's
        cancelling = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = PatientTimer(asyncio.get_running_loop(), self._timeout, expire)
        try:
            return await work
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise TimeoutError from None
            raise
        finally:
            timer.cancel()

    async def _calls(self, client: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
        """The reply of each call, or its failure: one call as it is, more as batches."""
        if len(calls) == 1:
            return await self._runs(client, [calls[0]])
        batches = batches_of(calls)
        replies = await self._runs(client, [batch_call(batch) for batch in batches])
        results: list[Any] = []
        for batch, reply in zip(batches, replies, strict=True):
            if isinstance(reply, BaseException):
                results += [reply] * len(batch)  # the whole batch failed: each call with it
            elif isinstance(reply, list) and len(reply) == len(batch):
                results += reply
            else:
                results += [RedisError(f"a batch of {len(batch)} got {reply!r}")] * len(batch)
        return results

    async def _runs(self, client: aioredis.Redis, runs: list[ScriptCall]) -> list[Any]:
        """The reply of each run of the script, or its error; loads the script if missing."""
        replies = await self._evalshas(client, runs)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await client.script_load(SCRIPT)
            again = await self._evalshas(client, [runs[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _evalshas(self, client: aioredis.Redis, runs: list[ScriptCall]) -> list[Any]:
        """Each run's reply, or the error Redis answered it with, in one write."""
        if isinstance(client, RedisCluster):
            # A cluster pipeline refuses scripts: the runs go side by side instead,
            # each to the shard of its key (all of a namespace's keys share one slot).
            sent = (client.evalsha(SCRIPT_SHA, 1, self._key, *run) for run in runs)
            return list(await asyncio.gather(*sent, return_exceptions=True))
        # One batch is out at a time, so one connection serves them all: it is
        # held rather than taken from the pool and given back for each batch,
        # and a command's way through the client (its retry wrapper, the pool,
        # the reply callbacks) is not walked for each. Redis-py's connection
        # still packs and reads, and drops itself when cut or cancelled
        # mid-reply; the next batch connects it again with ``connect()``, which
        # asks the sentinels for the master (the reconnect inside a send would
        # go back to the address it had).
        connection = self._connection
        if connection is None or self._connection_of is not client:
            pool = client.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call, unused-ignore]
            self._connection, self._connection_of = connection, client
        elif not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call, unused-ignore]
        commands = [("EVALSHA", SCRIPT_SHA, 1, self._key, *run) for run in runs]
        await connection.send_packed_command(connection.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as error:  # the others' replies are still to be read
                replies.append(error)
        return replies


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

    @property
    def next_call(self) -> int:
        """The place the next call started will have among all calls: they run
        in Redis in the order they start, so a reply's view is as recent as
        its place (``ReplicaSync`` keeps the most recent)."""
        return self.started + 1

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
        # The caller waits on a future of its own, so that its cancellation leaves
        # the reply to the pipeline (what asyncio.shield would do, for one future:
        # this runs once per admission). No timer of its own: the batches bound
        # the wait (see submit), with one PatientTimer for all of a batch's calls.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        reply = self._pipeline.submit(client, call)
        reply.add_done_callback(functools.partial(_pass_on, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            if abandoned is not None:
                reply.add_done_callback(abandoned)
            raise
        finally:
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
