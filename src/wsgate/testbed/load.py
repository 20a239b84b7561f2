"""``wsgate load``: many real clients against a gateway (or straight at backends).

A run simulates ``--clients`` client pods, each opening ``--connections``
WebSocket sessions one every ``--connect-interval`` (seed 000's client), each
session sending a message every ``--message-interval`` and reading the answer
that names the pod. Refusals (429, 503) are retried no sooner than their
``Retry-After`` and then with jittered backoff; sessions the server closes with
1001, 1012 or 1013 are reopened after a jittered pause. ``--http`` runs seed
004's long HTTP requests instead (see :mod:`wsgate.testbed.load_http`).

The sessions run on :class:`~wsgate.testbed.wsclient.WebSocketClient`
protocols; a session costs one protocol object and one sleeping coroutine, and
back-to-back ping-pong (``--message-interval 0``) is driven from the protocol's
callback without any task switch. Every decision about timing lives in
:mod:`wsgate.testbed.load_plan`, every count in :mod:`wsgate.testbed.report`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import errno
import itertools
import json
import logging
import os
import random
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsgate.cli import count_arg, duration_arg
from wsgate.config import ConfigError
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging
from wsgate.testbed.load_plan import (
    ConnectPacer,
    Interval,
    Target,
    answer_pod,
    message_text,
    parse_interval,
    parse_retry_after,
    parse_source_ips,
    parse_target,
    reconnect_delay,
    refusal_reason,
    retry_delay,
)
from wsgate.testbed.report import LoadStats, build_report, format_report, write_csv, write_plot
from wsgate.testbed.wsclient import (
    CloseInfo,
    Opcode,
    ProtocolError,
    WebSocketClient,
    opening_request,
)

__all__ = [
    "LoadPlan",
    "Session",
    "WebSocketLoad",
    "add_arguments",
    "plan_from_args",
    "run",
    "run_load",
]

log = logging.getLogger("wsgate.load")


@dataclass
class LoadPlan:
    """A load run, parsed and checked (the flags of ``wsgate load`` as values)."""

    targets: list[Target]
    clients: int = 1
    connections: int = 1
    connect_interval: float = 0.0
    connect_rate: float | None = None
    message_interval: Interval | None = field(default_factory=lambda: Interval(10.0, 20.0))
    message_size: int = 64
    duration: float | None = None
    source_ips: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    reconnect_codes: frozenset[int] = frozenset({1001, 1012, 1013})
    reconnect_delay: float = 1.0
    backoff_base: float = 0.5
    backoff_max: float = 10.0
    connect_timeout: float = 5.0
    answer_timeout: float = 10.0
    max_pending: int = 1000
    http: bool = False
    think: Interval = field(default_factory=lambda: Interval(1.0, 3.0))
    concurrency: int | None = None
    insecure: bool = False
    seed: int | None = None

    @property
    def target_count(self) -> int:
        if self.http and self.concurrency is not None:
            return self.concurrency
        return self.clients * self.connections

    @property
    def urls(self) -> list[str]:
        return [target.url for target in self.targets]

    def source_ip(self, index: int) -> str | None:
        return self.source_ips[index % len(self.source_ips)] if self.source_ips else None

    def target(self, index: int) -> Target:
        return self.targets[index % len(self.targets)]

    def ssl_context(self) -> ssl.SSLContext | None:
        if not any(target.tls for target in self.targets):
            return None
        context = ssl.create_default_context()
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


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

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(True)

    async def pause(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; ``True`` when woken early (stop, close)."""
        if self.load.stopping or self.closing:
            return True
        loop = self.load.loop
        future: asyncio.Future[bool] = loop.create_future()
        self._wake = future
        timer = loop.call_later(delay, _resolve, future, False)
        try:
            return await future
        finally:
            timer.cancel()
            self._wake = None

    def close(self, code: int = 1000) -> None:
        """Close on purpose (``close N``): the slot ends and is not reopened."""
        self.closing = True
        if self.protocol is not None:
            self.protocol.close(code)
        self.wake()

    async def run(self) -> None:
        load = self.load
        try:
            while not (load.stopping or self.closing):
                protocol = await self.connect()
                if protocol is None:
                    return
                info = await self.converse(protocol)
                if load.stopping or self.closing or not info.by_server:
                    return
                if info.code not in load.plan.reconnect_codes:
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
        protocol.closed.add_done_callback(lambda _: self.wake())
        stats.opened(protocol.connect_microseconds)
        interval = load.plan.message_interval
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
                protocol.close(1000)
                await asyncio.wait([protocol.closed], timeout=protocol.close_timeout + 1)
            if not protocol.closed.done():
                protocol.abort()
                await asyncio.wait([protocol.closed], timeout=1)
            info = (
                protocol.closed.result() if protocol.closed.done() else CloseInfo(1006, "", False)
            )
        finally:
            stats.closed(self.pod, None)
        if info.by_server:
            stats.closed_by_server[str(info.code)] += 1
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
        """Start every client's ramp: one new session every ``connect_interval``."""
        for client in self.clients:
            self._ramps.append(asyncio.create_task(self._ramp(client)))

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
            return Refusal(None)
        except ProtocolError as error:
            stats.failed["protocol"] += 1
            log.warning("Handshake with %s failed: %s", target.url, error)
            return Refusal(None)
        except OSError as error:
            name = errno.errorcode.get(error.errno or 0, "") if error.errno else ""
            stats.failed[name or type(error).__name__] += 1
            log.info("Cannot connect to %s: %s", target.url, error)
            return Refusal(None)
        client.remember(head.cookies)
        if head.status == 101:
            protocol.connect_microseconds = (time.perf_counter_ns() - started) // 1000
            return protocol
        reason = refusal_reason(head.body)
        stats.refused(head.status, reason)
        retry_after = parse_retry_after(head.header("retry-after"))
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


async def _health_server(host: str, port: int) -> Callable[[], Any]:
    """``/health`` for a load generator running as a Kubernetes pod (seed 000)."""
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner.cleanup


async def run_load(
    plan: LoadPlan,
    *,
    view: str = "auto",
    stop: asyncio.Event | None = None,
    banner: list[str] | None = None,
    progress_interval: float = 2.0,
    health: tuple[str, int] | None = None,
) -> tuple[dict[str, Any], LoadStats]:
    """Run ``plan`` until its duration ends or ``stop`` is set; return the report and counts."""
    from wsgate.testbed.load_view import watch

    stats = LoadStats(mode="http" if plan.http else "websocket", target=plan.target_count)
    stop = stop or asyncio.Event()
    cleanup_health = await _health_server(*health) if health else None
    started = time.monotonic()
    runner: Any
    if plan.http:
        from wsgate.testbed.load_http import HttpLoad

        runner = HttpLoad(plan, stats)
    else:
        runner = WebSocketLoad(plan, stats)
    try:
        await runner.start_async() if plan.http else runner.start()
        await watch(
            stats,
            plan,
            started,
            stop,
            view=view,
            banner=banner or [],
            progress_interval=progress_interval,
        )
        await runner.stop()
        stats.sample(time.monotonic() - started)
    finally:
        if cleanup_health is not None:
            await cleanup_health()
    report = build_report(stats, elapsed=time.monotonic() - started, urls=plan.urls)
    return report, stats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("urls", nargs="+", metavar="URL", help="ws:// URLs (http:// with --http)")
    shape = parser.add_argument_group("shape")
    shape.add_argument(
        "--clients",
        type=count_arg,
        default=1,
        metavar="N",
        help="simulated client pods (default 1)",
    )
    shape.add_argument(
        "--connections",
        type=count_arg,
        default=1,
        metavar="M",
        help="connections per client (default 1)",
    )
    shape.add_argument(
        "--connect-interval",
        type=duration_arg,
        default=0.0,
        metavar="D",
        help="each client opens one new connection every D until it has M (seed: 10s; default 0)",
    )
    shape.add_argument(
        "--connect-rate",
        type=float,
        metavar="R",
        help="at most R connect attempts per second, all clients together",
    )
    shape.add_argument(
        "--message-interval",
        default="10s-20s",
        metavar="A-B",
        help="uniform random wait before each message (default 10s-20s; 0: back-to-back; off)",
    )
    shape.add_argument(
        "--message-size",
        type=count_arg,
        default=64,
        metavar="BYTES",
        help="message size (default 64)",
    )
    shape.add_argument(
        "--duration", type=duration_arg, metavar="D", help="stop after D (default: at Ctrl-C)"
    )
    shape.add_argument(
        "--source-ips",
        metavar="RANGE",
        help="client addresses, e.g. 127.0.0.2-127.0.0.11 (one per client)",
    )
    shape.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra request header",
    )
    behaviour = parser.add_argument_group("retries and reconnects")
    behaviour.add_argument(
        "--reconnect-codes",
        default="1001,1012,1013",
        metavar="CODES",
        help="close codes that trigger a reconnect",
    )
    behaviour.add_argument(
        "--reconnect-delay",
        type=duration_arg,
        default=1.0,
        metavar="D",
        help="mean pause before a reconnect",
    )
    behaviour.add_argument(
        "--backoff-base",
        type=duration_arg,
        default=0.5,
        metavar="D",
        help="first backoff step after a refusal",
    )
    behaviour.add_argument(
        "--backoff-max", type=duration_arg, default=10.0, metavar="D", help="largest backoff step"
    )
    behaviour.add_argument("--connect-timeout", type=duration_arg, default=5.0, metavar="D")
    behaviour.add_argument("--answer-timeout", type=duration_arg, default=10.0, metavar="D")
    behaviour.add_argument(
        "--max-pending",
        type=count_arg,
        default=1000,
        metavar="N",
        help="handshakes in progress at once",
    )
    http = parser.add_argument_group("HTTP mode (seed 004)")
    http.add_argument(
        "--http", action="store_true", help="send long HTTP requests instead of WebSocket sessions"
    )
    http.add_argument(
        "--concurrency",
        type=count_arg,
        metavar="N",
        help="requests in flight (default clients x connections)",
    )
    http.add_argument(
        "--think",
        default="1s-3s",
        metavar="A-B",
        help="pause between a worker's requests (default 1s-3s)",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--report-json", type=Path, metavar="FILE")
    output.add_argument("--csv", type=Path, metavar="FILE", help="the timeline, one row a sample")
    output.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="open connections and rejections over time"
    )
    output.add_argument(
        "--view",
        choices=["auto", "live", "plain", "none"],
        default="auto",
        help="live view on a terminal, plain lines otherwise",
    )
    output.add_argument("--progress-interval", type=duration_arg, default=2.0, metavar="D")
    output.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="info logs every response with its pod (default warning)",
    )
    other = parser.add_argument_group("other")
    other.add_argument(
        "--health-port", type=int, metavar="PORT", help="serve GET /health on this port"
    )
    other.add_argument("--health-host", default="0.0.0.0", metavar="HOST")
    other.add_argument(
        "--interactive",
        action="store_true",
        help="a prompt: connect N, send TEXT, status, close N, quit",
    )
    other.add_argument(
        "--insecure", action="store_true", help="do not verify TLS certificates (wss://)"
    )
    other.add_argument("--seed", type=int, help="random seed, for repeatable runs")


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    targets = [parse_target(url, args.http) for url in args.urls]
    headers: dict[str, str] = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header: expected 'Name: value', got {header!r}")
        headers[name.strip()] = value.strip()
    try:
        codes = frozenset(int(code) for code in args.reconnect_codes.split(",") if code.strip())
    except ValueError:
        raise ConfigError(
            f"--reconnect-codes: expected numbers like 1001,1012, got {args.reconnect_codes!r}"
        ) from None
    think = parse_interval(args.think, "--think") or Interval(0.0, 0.0)
    if args.connect_rate is not None and args.connect_rate <= 0:
        raise ConfigError("--connect-rate must be above 0")
    return LoadPlan(
        targets=targets,
        clients=args.clients,
        connections=args.connections,
        connect_interval=args.connect_interval,
        connect_rate=args.connect_rate,
        message_interval=parse_interval(args.message_interval),
        message_size=args.message_size,
        duration=args.duration,
        source_ips=parse_source_ips(args.source_ips) if args.source_ips else [],
        headers=headers,
        reconnect_codes=codes,
        reconnect_delay=args.reconnect_delay,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        connect_timeout=args.connect_timeout,
        answer_timeout=args.answer_timeout,
        max_pending=args.max_pending,
        http=args.http,
        think=think,
        concurrency=args.concurrency,
        insecure=args.insecure,
        seed=args.seed,
    )


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.report_json:
        args.report_json.write_text(json.dumps(report, indent=2) + "\n")
    if args.csv:
        write_csv(report, args.csv)
    if args.plot:
        write_plot(report, args.plot)


async def _main(args: argparse.Namespace, plan: LoadPlan) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    health = (args.health_host, args.health_port) if args.health_port else None
    if args.interactive:
        from wsgate.testbed.load_shell import interactive

        report = await interactive(plan, stop, health=health)
    else:
        if plan.duration is not None:
            loop.call_later(plan.duration, stop.set)
        report, _ = await run_load(
            plan, view=args.view, stop=stop, progress_interval=args.progress_interval, health=health
        )
    print(format_report(report), flush=True)
    write_outputs(report, args)
    attempted = report["connections"]["attempted"]
    return 1 if attempted and not report["connections"]["established"] else 0


def run(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    setup_logging(args.log_level)
    limit = raise_open_files_limit()
    if plan.target_count + 100 > limit:
        log.warning("%d connections wanted but only %d files may be open", plan.target_count, limit)
    try:
        return run_async(_main(args, plan))
    except OSError as error:
        print(f"wsgate load: error: {error}", file=sys.stderr)
        return 2
