"""The WebSocket sessions of ``wsgate load``: they connect, talk, and reconnect.

A run simulates ``--clients`` client pods, each opening ``--connections``
sessions; every session sends a message every ``--message-interval`` and reads
the answer that names the pod. Refusals (429, 503) are retried no sooner than
their ``Retry-After`` and then with jittered backoff; sessions the server closes
with 1001, 1012 or 1013 are reopened after a jittered pause.

The sessions run on :class:`~wsgate.testbed.wsclient.WebSocketClient`
protocols; a session costs one protocol object and one sleeping coroutine, and
back-to-back ping-pong (``--message-interval 0``) is driven from the protocol's
callback without any task switch. Every decision about timing lives in
:mod:`wsgate.testbed.load_plan`, every count in :mod:`wsgate.testbed.report`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import errno
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from wsgate.testbed.load_plan import (
    ConnectPacer,
    LoadPlan,
    Target,
    answer_pod,
    message_text,
    parse_retry_after,
    reconnect_delay,
    refusal_reason,
    retry_delay,
)
from wsgate.testbed.report import LoadStats
from wsgate.testbed.wsclient import CloseInfo, WebSocketClient
from wsgate.wire import CloseCode, Opcode, ProtocolError, opening_request

__all__ = ["Refusal", "Session", "SimulatedClient", "WebSocketLoad"]

log = logging.getLogger("wsgate.load")


@dataclass
class SimulatedClient:
    """One client pod: its address, the URL it uses and the cookies it was given."""

    index: int
    target: Target
    source_ip: str | None
    cookies: dict[str, str] = field(default_factory=dict)

    def remember(self, set_cookies: list[str]) -> None:
        for header in set_cookies:
            name, sep, value = header.split(";", 1)[0].partition("=")
            if sep and name.strip():
                self.cookies[name.strip()] = value.strip()

    def fail_over(self, failed: Target, targets: list[Target]) -> None:
        """After ``failed`` could not be reached, use the next URL (as a client with a list).

        Attempts that were already under way against ``failed`` do not move it again.
        """
        if self.target == failed and len(targets) > 1:
            self.target = targets[(targets.index(failed) + 1) % len(targets)]

    def cookie_header(self) -> str | None:
        if not self.cookies:
            return None
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())


@dataclass(frozen=True)
class Refusal:
    """A connect attempt that did not open a session (refused, failed or timed out)."""

    retry_after: float | None


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


class Session:
    """One connection slot of a simulated client: it connects, talks and reconnects."""

    def __init__(self, load: WebSocketLoad, client: SimulatedClient, number: int) -> None:
        self.load = load
        self.client = client
        self.number = number
        self.protocol: WebSocketClient | None = None
        self.pod: str | None = None
        self.closing = False
        self.dropped = False  # lost on purpose, by --storm: reopened whatever the code
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Future[bool] | None = None
        # Send times of messages still waiting for their answer, with who waits for it.
        self._pending: collections.deque[tuple[int, asyncio.Future[bytes] | None]] = (
            collections.deque()
        )
        self._payload = message_text(number, load.plan.message_size).encode()

    @property
    def is_open(self) -> bool:
        return self.protocol is not None and self.protocol.is_open

    def _closed(self, closed: asyncio.Future[CloseInfo]) -> None:
        if self.protocol is not None and self.protocol.closed is closed:
            self.wake()  # the conversation of this protocol ends; an older one's wakes nothing

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(True)

    async def pause(self, delay: float) -> bool:
        """Sleep ``delay`` seconds, or less when woken; ``True`` when the session is to end.

        A session ends when the run stops or it was closed on purpose, never on
        a wake-up alone: a closing protocol wakes its conversation through a
        callback that may run only once a later pause (a reconnect's) has
        begun, and that pause is then merely cut short.
        """
        if self.load.stopping or self.closing:
            return True
        loop = self.load.loop
        future: asyncio.Future[bool] = loop.create_future()
        self._wake = future
        timer = loop.call_later(delay, _resolve, future, False)
        try:
            await future
        finally:
            timer.cancel()
            self._wake = None
        return self.load.stopping or self.closing

    def close(self, code: int = CloseCode.NORMAL_CLOSURE) -> None:
        """Close on purpose (``close N``): the slot ends and is not reopened."""
        self.closing = True
        if self.protocol is not None:
            self.protocol.close(code)
        self.wake()

    def drop(self) -> None:
        """Lose the connection without a closing handshake, as a network blip does."""
        if self.protocol is not None and not self.protocol.closed.done():
            self.dropped = True
            self.protocol.abort()

    async def run(self) -> None:
        load = self.load
        try:
            while not (load.stopping or self.closing):
                protocol = await self.connect()
                if protocol is None:
                    return
                info = await self.converse(protocol)
                dropped, self.dropped = self.dropped, False
                if load.stopping or self.closing or not (info.by_server or dropped):
                    return
                if not dropped and info.code not in load.plan.reconnect_codes:
                    log.info(
                        "Session %d closed by the server (%d), not reopened", self.number, info.code
                    )
                    return
                load.stats.reconnects += 1
                delay = reconnect_delay(load.rng, load.plan.reconnect_delay)
                log.info(
                    "Session %d closed by the server (%d); reconnecting in %.2fs",
                    self.number,
                    info.code,
                    delay,
                )
                if await self.pause(delay):
                    return
        finally:
            load.sessions.pop(self, None)

    async def connect(self) -> WebSocketClient | None:
        load = self.load
        attempt = 0
        while not (load.stopping or self.closing):
            if load.pacer is not None:
                wait = load.pacer.wait(load.loop.time())
                if wait > 0 and await self.pause(wait):
                    return None
            async with load.pending:
                if load.stopping or self.closing:
                    return None
                outcome = await load.attempt(self.client)
            if isinstance(outcome, WebSocketClient):
                return outcome
            delay = retry_delay(
                attempt,
                outcome.retry_after,
                load.rng,
                base=load.plan.backoff_base,
                cap=load.plan.backoff_max,
            )
            attempt += 1
            if await self.pause(delay):
                return None
        return None

    async def converse(self, protocol: WebSocketClient) -> CloseInfo:
        load = self.load
        stats = load.stats
        self.protocol = protocol
        self.pod = None
        self._pending.clear()
        protocol.on_message = self.on_message
        protocol.closed.add_done_callback(self._closed)
        stats.opened(protocol.connect_microseconds)
        interval = load.plan.message_interval
        info = CloseInfo(CloseCode.ABNORMAL_CLOSURE, "", by_server=False)
        try:
            self.say()  # the first answer names the pod this session landed on
            while not (load.stopping or self.closing or protocol.closed.done()):
                if interval is None or interval.back_to_back:
                    await self.pause(3600.0)
                elif not await self.pause(interval.draw(load.rng)):
                    self.say(message_text(next(load.sequence), load.plan.message_size).encode())
            if self._pending and not protocol.closed.done():
                await self.drain(load.plan.answer_timeout)
            if not protocol.closed.done():
                protocol.close(CloseCode.NORMAL_CLOSURE)
                await asyncio.wait([protocol.closed], timeout=protocol.close_timeout + 1)
            if not protocol.closed.done():
                protocol.abort()
                await asyncio.wait([protocol.closed], timeout=1)
            if protocol.closed.done():
                info = protocol.closed.result()
        finally:
            # A drop of our own (--storm) is no close by the server.
            stats.closed(self.pod, info.code if info.by_server and not self.dropped else None)
            self.protocol = None  # its closing callback, if still due, wakes no later pause
        self._pending.clear()
        return info

    async def drain(self, within: float) -> None:
        """Wait for the answers still due (bounded), before closing."""
        deadline = self.load.loop.time() + within
        protocol = self.protocol
        while self._pending and protocol is not None and not protocol.closed.done():
            left = deadline - self.load.loop.time()
            if left <= 0:
                return
            sent_at, waiter = self._pending[-1]
            if waiter is None:
                waiter = self.load.loop.create_future()
                self._pending[-1] = (sent_at, waiter)
            closed: asyncio.Future[Any] = protocol.closed
            answered: asyncio.Future[Any] = waiter
            await asyncio.wait(
                [answered, closed], timeout=left, return_when=asyncio.FIRST_COMPLETED
            )

    def say(
        self, payload: bytes | None = None, waiter: asyncio.Future[bytes] | None = None
    ) -> bool:
        protocol = self.protocol
        sent_at = time.perf_counter_ns()  # before framing and writing: both are part of the trip
        if protocol is None or not protocol.send(Opcode.TEXT, payload or self._payload):
            return False
        self.load.stats.sent += 1
        self._pending.append((sent_at, waiter))
        return True

    def ask(self, text: str) -> asyncio.Future[bytes] | None:
        """Send ``text`` and return the future of its answer (interactive ``send``)."""
        waiter: asyncio.Future[bytes] = self.load.loop.create_future()
        return waiter if self.say(text.encode(), waiter) else None

    def on_message(self, opcode: int, payload: bytes) -> None:
        now = time.perf_counter_ns()
        load = self.load
        stats = load.stats
        stats.received += 1
        waiter = None
        if self._pending:
            sent_at, waiter = self._pending.popleft()
            stats.rtt.record_value(max(1, (now - sent_at) // 1000))
        if self.pod is None:
            pod = answer_pod(payload)
            if pod is not None:
                self.pod = pod
                stats.pod_known(pod)
        if load.log_responses:
            log.info(
                "Response from pod %s at %s on session %d: %s",
                self.pod or "?",
                time.strftime("%H:%M:%S"),
                self.number,
                payload[:300].decode(errors="replace"),
            )
        if waiter is not None and not waiter.done():
            waiter.set_result(payload)
        interval = load.plan.message_interval
        if interval is not None and interval.back_to_back and not (load.stopping or self.closing):
            self.say()


class WebSocketLoad:
    """The sessions of a WebSocket run and what they share: pacing, counts, randomness."""

    def __init__(self, plan: LoadPlan, stats: LoadStats) -> None:
        self.plan = plan
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(plan.seed)
        self.stopping = False
        self.sessions: dict[Session, None] = {}
        self.pending = asyncio.Semaphore(plan.max_pending)
        self.pacer = ConnectPacer(plan.connect_rate) if plan.connect_rate else None
        self.sequence = itertools.count()
        self.log_responses = log.isEnabledFor(logging.INFO)
        self.clients = [
            SimulatedClient(index, plan.target(index), plan.source_ip(index))
            for index in range(plan.clients)
        ]
        self._numbers = itertools.count(1)
        self._ssl = plan.ssl_context()
        self._ramps: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()

    def start(self) -> None:
        """Start every client's ramp: one new session every ``connect_interval``.

        Under ``--stages`` nothing opens here: :meth:`resize` follows the schedule.
        """
        if self.plan.stages is not None:
            return
        for client in self.clients:
            self._ramps.append(asyncio.create_task(self._ramp(client)))

    def resize(self, target: int) -> None:
        """Hold ``target`` session slots: open new ones, or close the newest on purpose.

        A slot still connecting or backing off counts, as a k6 virtual user that waits does.
        """
        kept = [session for session in self.sessions if not session.closing]
        for index in range(len(kept), target):
            self.add_session(self.clients[index % len(self.clients)])
        if len(kept) > target:
            for session in sorted(kept, key=lambda s: s.number)[target:]:
                session.close()

    def drop_all(self) -> int:
        """Drop every open session at once (``--storm``); each reconnects. Returns how many."""
        opened = self.open_sessions()
        for session in opened:
            session.drop()
        return len(opened)

    async def _ramp(self, client: SimulatedClient) -> None:
        for slot in range(self.plan.connections):
            if self.stopping:
                return
            if slot and self.plan.connect_interval > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), self.plan.connect_interval)
                if self.stopping:
                    return
            self.add_session(client)
            if slot % 500 == 499:
                await asyncio.sleep(0)  # let a large ramp's connects start as it goes

    def add_session(self, client: SimulatedClient | None = None) -> Session:
        session = Session(self, client or self.clients[0], next(self._numbers))
        self.sessions[session] = None
        session.task = asyncio.create_task(session.run())
        return session

    def open_sessions(self) -> list[Session]:
        return [session for session in self.sessions if session.is_open]

    async def attempt(self, client: SimulatedClient) -> WebSocketClient | Refusal:
        """One connect attempt: a session, or why not and when to retry."""
        plan = self.plan
        stats = self.stats
        stats.attempted += 1
        target = client.target
        key = base64.b64encode(os.urandom(16)).decode()
        headers = dict(plan.headers)
        cookie = client.cookie_header()
        if cookie:
            headers["Cookie"] = cookie
        request = opening_request(target.host_header, target.path, key, headers)
        protocol = WebSocketClient(request, key, self.loop)
        started = time.perf_counter_ns()
        local = (client.source_ip, 0) if client.source_ip else None
        try:
            async with asyncio.timeout(plan.connect_timeout):
                await self.loop.create_connection(
                    lambda: protocol,
                    target.host,
                    target.port,
                    local_addr=local,
                    ssl=self._ssl,
                    server_hostname=target.host if self._ssl else None,
                )
                head = await protocol.opened
        except TimeoutError:
            stats.failed["timeout"] += 1
            protocol.abort()
            client.fail_over(target, plan.targets)
            return Refusal(None)
        except ProtocolError as error:
            stats.failed["protocol"] += 1
            log.warning("Handshake with %s failed: %s", target.url, error)
            return Refusal(None)
        except OSError as error:
            name = errno.errorcode.get(error.errno or 0, "") if error.errno else ""
            stats.failed[name or type(error).__name__] += 1
            log.info("Cannot connect to %s: %s", target.url, error)
            client.fail_over(target, plan.targets)
            return Refusal(None)
        client.remember(head.cookies)
        if head.status == 101:
            protocol.connect_microseconds = (time.perf_counter_ns() - started) // 1000
            return protocol
        reason = refusal_reason(head.body)
        retry_after = parse_retry_after(head.header("retry-after"))
        stats.refused(head.status, reason, retry_after)
        log.info(
            "Refused by %s: %d %s (Retry-After %s)",
            target.url,
            head.status,
            reason or head.reason,
            head.header("retry-after"),
        )
        return Refusal(retry_after)

    async def stop(self, grace: float = 15.0) -> None:
        """Stop sending, collect the answers still due, close every session (bounded)."""
        self.stopping = True
        self._stopped.set()
        for ramp in self._ramps:
            ramp.cancel()
        sessions = list(self.sessions)
        for session in sessions:
            session.wake()
        tasks = [session.task for session in sessions if session.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2)
        await asyncio.gather(*self._ramps, return_exceptions=True)
