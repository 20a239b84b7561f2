"""The load driver: raw WebSocket clients spread over several processes.

Each driver process runs one uvloop event loop with plain ``asyncio.Protocol``
clients. A client sends its opening handshake, checks the ``101`` and the
``Sec-WebSocket-Accept`` it gets back, and then exchanges one pre-built masked
frame at a time: it writes the frame and counts bytes until the same number has
come back. Nothing is decoded or allocated per message, so the driver costs
little next to what it drives; the direct path (no proxy) shows how much room
it leaves.

The parent talks to its driver processes over pipes with small command objects
(:class:`Open`, :class:`Exchange`, :class:`Handshakes`, :class:`CloseAll`).
Start and stop times are absolute ``time.monotonic()`` values, a clock all
processes of the machine share, so every process measures the same window.
Connections are spread over the source addresses 127.0.0.2, 127.0.0.3, ... so
that many thousands of them never run out of ephemeral ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import ssl
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import cast

from bench.wire import HEAD_END, HandshakeError, masked_frame, response_status
from wsgate.runtime import raise_open_files_limit
from wsgate.wire import accept_key, opening_request

__all__ = [
    "DriverError",
    "DriverPool",
    "ExchangeTotals",
    "OpenTotals",
    "SetupTotals",
    "Target",
    "default_sources",
    "split",
]

# Linux: let connect() pick the port for the whole 4-tuple after bind(addr, 0).
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
_ACCEPT = accept_key(_KEY).encode()
_MAX_RESPONSE_HEAD = 16 * 1024


class DriverError(Exception):
    """A driver process failed or stopped answering."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    tls: bool = False  # wss://: the client speaks TLS (the bench's own certificate)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


_CLIENT_TLS: ssl.SSLContext | None = None


def _client_tls() -> ssl.SSLContext:
    """The drivers' TLS context: one per process, shared by its clients.

    It does not verify: the certificate is the bench's own, every proxy serves
    the same one, and a verification would cost the load side, not the proxy.
    Session resumption is off (a new context per process and no tickets kept),
    so every set-up is a full handshake.
    """
    global _CLIENT_TLS
    if _CLIENT_TLS is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["http/1.1"])
        _CLIENT_TLS = context
    return _CLIENT_TLS


def default_sources(count: int = 16) -> tuple[str, ...]:
    """Loopback source addresses for the clients (127.0.0.1 is left to the proxies)."""
    return tuple(f"127.0.0.{2 + i}" for i in range(count))


def split(total: int, parts: int) -> list[int]:
    """``total`` spread as evenly as possible over ``parts``."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ---------------------------------------------------------------- commands and answers


@dataclass(frozen=True)
class Open:
    """Open ``count`` connections and keep them (idle) for later commands."""

    target: Target
    count: int
    first_index: int
    sources: tuple[str, ...]
    concurrency: int
    timeout: float
    deadline: float
    max_failures: int


@dataclass(frozen=True)
class Opened:
    opened: int
    failed: int
    first_error: str | None


@dataclass(frozen=True)
class Exchange:
    """Ping-pong on every open connection: one frame out, wait for its echo, again.

    Echoes that arrive in ``[measure_from, measure_to)`` are counted with their
    round trip. ``interval`` > 0 paces each connection to one frame per interval
    (for latency at a fixed rate); 0 sends again as soon as the echo is in.
    ``once`` sends one frame per connection and stops (a liveness check).
    ``phase`` (0..1) shifts this driver's paced sends within its stagger step,
    so that the drivers' sends interleave instead of leaving in pairs.
    ``port``, when set, limits the exchange to the connections open to that
    target port; the others stay open and idle.
    """

    payload_size: int
    start_at: float
    measure_from: float
    measure_to: float
    interval: float
    once: bool
    grace: float
    phase: float = 0.0
    port: int | None = None


@dataclass(frozen=True)
class Exchanged:
    completed: int
    total: int  # every echo of the round, window or not
    latencies_ns: bytes
    errors: int
    first_error: str | None
    connections: int


@dataclass(frozen=True)
class Handshakes:
    """Open, upgrade and close connections in a closed loop; count upgrades in the window."""

    target: Target
    concurrency: int
    first_index: int
    sources: tuple[str, ...]
    timeout: float
    start_at: float
    measure_from: float
    measure_to: float


@dataclass(frozen=True)
class Handshaken:
    completed: int
    total: int
    failed: int
    first_error: str | None


@dataclass(frozen=True)
class CloseAll:
    timeout: float = 10.0


@dataclass(frozen=True)
class Closed:
    count: int


@dataclass(frozen=True)
class _Stop:
    pass


@dataclass(frozen=True)
class _Failure:
    text: str


_Command = Open | Exchange | Handshakes | CloseAll
_Answer = Opened | Exchanged | Handshaken | Closed


# ---------------------------------------------------------------- inside a driver process


class _Client(asyncio.Protocol):
    """One raw WebSocket client connection; its hot path is :meth:`data_received`."""

    __slots__ = (
        "checking",
        "expect",
        "head",
        "lost",
        "next_at",
        "on_lost",
        "port",
        "ready",
        "round",
        "sent_at",
        "transport",
    )

    def __init__(self, ready: asyncio.Future[None], port: int) -> None:
        self.ready = ready
        self.port = port  # of the target: an exchange may involve one target's clients only
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.expect = 0  # bytes of the echo still to come
        self.sent_at = 0
        self.next_at = 0
        self.round: _Round | None = None
        self.checking: bytearray | None = None  # the first echo of a round, compared in full
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        expect = self.expect
        if expect:
            round_ = self.round
            assert round_ is not None
            if self.checking is not None:
                round_.verify(self, data)
                return
            expect -= len(data)
            if expect > 0:
                self.expect = expect
                return
            self.expect = 0
            if expect < 0:
                round_.fail(self, "more bytes came back than were sent")
            else:
                round_.echoed(self)
            return
        if self.ready.done():
            self._unexpected(data)
            return
        self._handshake(data)

    def _handshake(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(HEAD_END)
        if end < 0:
            if len(self.head) > _MAX_RESPONSE_HEAD:
                self.ready.set_exception(HandshakeError("response head too long"))
            return
        head = bytes(self.head[:end])
        extra = len(self.head) - end - len(HEAD_END)
        try:
            status = response_status(head)
        except HandshakeError as error:
            self.ready.set_exception(error)
            return
        if status != 101:
            body = bytes(self.head[end + len(HEAD_END) :][:80]).decode("utf-8", "replace")
            self.ready.set_exception(
                HandshakeError(f"answered {status} instead of 101 {body}".rstrip())
            )
        elif _ACCEPT not in head or b"sec-websocket-accept:" not in head.lower():
            self.ready.set_exception(HandshakeError("wrong or missing Sec-WebSocket-Accept"))
        elif extra:
            self.ready.set_exception(HandshakeError("bytes after the 101 head"))
        else:
            self.head = bytearray()
            self.ready.set_result(None)

    def _unexpected(self, data: bytes) -> None:
        if self.round is not None:
            self.round.fail(self, f"{len(data)} bytes nobody asked for")
        elif self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))
        elif self.round is not None:
            self.round.fail(self, "connection closed by the far side")


class _Round:
    """The state of one :class:`Exchange` inside one driver process."""

    def __init__(self, command: Exchange, clients: Sequence[_Client]) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.frame = masked_frame(command.payload_size)
        self.frame_len = len(self.frame)
        self.measure_from = int(command.measure_from * 1e9)
        self.measure_to = int(command.measure_to * 1e9)
        self.interval = int(command.interval * 1e9)
        self.once = command.once
        self.phase = command.phase
        self.latencies = array("q")
        self.completed = 0
        self.total = 0
        self.errors = 0
        self.first_error: str | None = None
        self.outstanding = len(clients)
        self.done: asyncio.Future[None] = loop.create_future()
        if not clients:
            self.done.set_result(None)

    def start(self, clients: Sequence[_Client]) -> None:
        now = time.monotonic_ns()
        for position, client in enumerate(clients):
            client.round = self
            client.checking = bytearray()
            if self.interval:
                # Stagger paced connections over one interval so sends do not come in bursts.
                client.next_at = now + int(self.interval * (position + self.phase) / len(clients))
                self.loop.call_later((client.next_at - now) / 1e9, self.send, client)
            else:
                self.send(client)

    def send(self, client: _Client) -> None:
        if client.round is not self or client.transport is None:
            return
        if client.transport.is_closing():
            # Closed by the far side, its connection_lost not delivered yet.
            self.fail(client, "the connection was closed")
            return
        client.expect = self.frame_len
        client.sent_at = time.monotonic_ns()
        client.transport.write(self.frame)

    def verify(self, client: _Client, data: bytes) -> None:
        checking = client.checking
        assert checking is not None
        checking += data
        if len(checking) < self.frame_len:
            return
        client.checking = None
        client.expect = 0
        if checking != self.frame:
            self.fail(client, "the echo differs from the frame sent")
        else:
            self.echoed(client)

    def echoed(self, client: _Client) -> None:
        now = time.monotonic_ns()
        self.total += 1
        if self.measure_from <= now < self.measure_to:
            self.completed += 1
            self.latencies.append(now - client.sent_at)
        if self.once or now >= self.measure_to:
            self._finish(client)
        elif self.interval:
            client.next_at += self.interval
            delay = client.next_at - now
            if delay > 0:
                self.loop.call_later(delay / 1e9, self.send, client)
            else:
                client.next_at = now
                self.send(client)
        else:
            assert client.transport is not None
            client.expect = self.frame_len
            client.sent_at = now
            client.transport.write(self.frame)

    def fail(self, client: _Client, reason: str) -> None:
        if client.round is not self:
            return
        self.errors += 1
        if self.first_error is None:
            self.first_error = reason
        client.checking = None
        client.expect = 0
        if client.transport is not None:
            client.transport.close()
        client.lost = True
        self._finish(client)

    def _finish(self, client: _Client) -> None:
        client.round = None
        self.outstanding -= 1
        if self.outstanding == 0 and not self.done.done():
            self.done.set_result(None)


class _Worker:
    """What one driver process holds between commands: its open connections."""

    def __init__(self) -> None:
        self.clients: list[_Client] = []

    async def handle(self, command: _Command) -> _Answer:
        if isinstance(command, Open):
            return await self.open(command)
        if isinstance(command, Exchange):
            return await self.exchange(command)
        if isinstance(command, Handshakes):
            return await self.handshakes(command)
        return await self.close_all(command)

    async def connect(self, target: Target, source: str, limit: float) -> _Client:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(limit):
                sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.bind((source, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (target.host, target.port))
                ready: asyncio.Future[None] = loop.create_future()
                transport, client = await loop.create_connection(
                    lambda: _Client(ready, target.port),
                    sock=sock,
                    ssl=_client_tls() if target.tls else None,
                    server_hostname="localhost" if target.tls else None,
                )
                transport.write(opening_request(f"{target.host}:{target.port}", "/", _KEY))
                await ready
            return client
        except BaseException:
            if transport is not None:
                transport.close()
            else:
                sock.close()
            raise

    async def open(self, command: Open) -> Opened:
        remaining = iter(range(command.first_index, command.first_index + command.count))
        opened = failed = 0
        first_error: str | None = None

        async def opener() -> None:
            nonlocal opened, failed, first_error
            for index in remaining:
                if failed >= command.max_failures or time.monotonic() > command.deadline:
                    return
                source = command.sources[index % len(command.sources)]
                try:
                    client = await self.connect(command.target, source, command.timeout)
                except (OSError, TimeoutError, HandshakeError) as error:
                    failed += 1
                    first_error = first_error or _describe(error)
                    continue
                self.clients.append(client)
                opened += 1

        workers = max(1, min(command.concurrency, command.count))
        await asyncio.gather(*(opener() for _ in range(workers)))
        return Opened(opened, failed, first_error)

    async def exchange(self, command: Exchange) -> Exchanged:
        self.clients = [client for client in self.clients if not client.lost]
        clients = [c for c in self.clients if command.port is None or c.port == command.port]
        await _sleep_until(command.start_at)
        round_ = _Round(command, clients)
        round_.start(clients)
        wait = max(0.0, command.measure_to - time.monotonic()) + command.grace
        try:
            await asyncio.wait_for(asyncio.shield(round_.done), wait)
        except TimeoutError:
            for client in clients:
                if client.round is round_:
                    round_.fail(client, f"no echo within {command.grace:g}s of the window's end")
        self.clients = [client for client in self.clients if not client.lost]
        return Exchanged(
            completed=round_.completed,
            total=round_.total,
            latencies_ns=round_.latencies.tobytes(),
            errors=round_.errors,
            first_error=round_.first_error,
            connections=len(clients),
        )

    async def handshakes(self, command: Handshakes) -> Handshaken:
        completed = total = failed = 0
        first_error: str | None = None
        await _sleep_until(command.start_at)

        async def connector(offset: int) -> None:
            nonlocal completed, total, failed, first_error
            index = command.first_index + offset
            while time.monotonic() < command.measure_to:
                source = command.sources[index % len(command.sources)]
                index += command.concurrency
                try:
                    client = await self.connect(command.target, source, command.timeout)
                except (OSError, TimeoutError, HandshakeError) as error:
                    failed += 1
                    first_error = first_error or _describe(error)
                    await asyncio.sleep(0.01)
                    continue
                assert client.transport is not None
                client.transport.close()
                total += 1
                if command.measure_from <= time.monotonic() < command.measure_to:
                    completed += 1

        await asyncio.gather(*(connector(offset) for offset in range(command.concurrency)))
        return Handshaken(completed, total, failed, first_error)

    async def close_all(self, command: CloseAll) -> Closed:
        clients, self.clients = self.clients, []
        open_ = [client for client in clients if not client.lost]
        if open_:
            all_lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            remaining = len(open_)

            def one_lost() -> None:
                nonlocal remaining
                remaining -= 1
                if remaining == 0 and not all_lost.done():
                    all_lost.set_result(None)

            for client in open_:
                client.on_lost = one_lost
                if client.transport is not None:
                    client.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_lost, command.timeout)
        return Closed(len(clients))


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}" if isinstance(error, OSError) else text


async def _sleep_until(moment: float) -> None:
    # uvloop's timers count whole milliseconds of a clock read once per turn of
    # the loop: a sleep can end up to a millisecond early, and an echo on
    # loopback can come back within that millisecond, before its window opens.
    while (delay := moment - time.monotonic()) > 0:  # noqa: ASYNC110 (a moment, no event)
        await asyncio.sleep(delay)


def _driver_main(pipe: Connection) -> None:
    import uvloop

    raise_open_files_limit()
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = _Worker()
    try:
        while True:
            try:
                command = pipe.recv()
            except (EOFError, KeyboardInterrupt):
                break
            if isinstance(command, _Stop):
                break
            answer: _Answer | _Failure
            try:
                answer = loop.run_until_complete(worker.handle(command))
            except Exception:
                answer = _Failure(traceback.format_exc())
            pipe.send(answer)
        loop.run_until_complete(worker.close_all(CloseAll(timeout=2.0)))
    finally:
        loop.close()


# ---------------------------------------------------------------- the parent's side


@dataclass(frozen=True)
class OpenTotals:
    opened: int
    failed: int
    first_error: str | None


@dataclass(frozen=True)
class ExchangeTotals:
    completed: int
    total: int
    seconds: float
    latencies_ns: array[int]
    errors: int
    first_error: str | None
    connections: int

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SetupTotals:
    rate: float  # upgrades per second in the window
    total: int  # upgrades from start to end, window or not
    failed: int
    first_error: str | None


class DriverPool:
    """Driver processes forked once and given commands for the whole run."""

    def __init__(self, processes: int, sources: tuple[str, ...] | None = None) -> None:
        if processes < 1:
            raise ValueError("a driver pool needs at least one process")
        self.sources = sources or default_sources()
        self._context = multiprocessing.get_context("fork")
        self._workers: list[tuple[BaseProcess, Connection]] = []
        for _ in range(processes):
            self._fork()

    def _fork(self) -> None:
        parent_end, child_end = self._context.Pipe()
        process = self._context.Process(
            target=_driver_main,
            args=(child_end,),
            name=f"bench-driver-{len(self._workers)}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._workers.append((process, parent_end))

    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers if process.pid is not None]

    def _run(self, commands: Sequence[_Command], timeout: float) -> list[_Answer]:
        for (_, pipe), command in zip(self._workers, commands, strict=True):
            pipe.send(command)
        answers: list[_Answer] = []
        failure: str | None = None
        deadline = time.monotonic() + timeout
        for process, pipe in self._workers:
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                self._restart()
                raise DriverError(f"{process.name} did not answer within {timeout:g}s")
            answer = pipe.recv()
            if isinstance(answer, _Failure):
                failure = failure or answer.text
            else:
                answers.append(answer)
        if failure is not None:
            raise DriverError(f"a driver process failed:\n{failure}")
        return answers

    def _restart(self) -> None:
        """Replace every driver process: one that missed its deadline is out of step."""
        count = len(self._workers)
        self.stop()
        for _ in range(count):
            self._fork()

    def open(
        self,
        target: Target,
        count: int,
        *,
        concurrency: int = 64,
        timeout: float = 5.0,
        time_limit: float = 60.0,
        max_failures: int | None = None,
    ) -> OpenTotals:
        """Open ``count`` idle connections spread over the driver processes."""
        shares = split(count, self.size)
        starts = [sum(shares[:i]) for i in range(self.size)]
        per_process = max(1, concurrency // self.size)
        deadline = time.monotonic() + time_limit
        failures = max_failures if max_failures is not None else max(1, count)
        commands = [
            Open(target, share, start, self.sources, per_process, timeout, deadline, failures)
            for share, start in zip(shares, starts, strict=True)
        ]
        answers = self._run(commands, time_limit + timeout + 15.0)
        opened = [answer for answer in answers if isinstance(answer, Opened)]
        return OpenTotals(
            opened=sum(answer.opened for answer in opened),
            failed=sum(answer.failed for answer in opened),
            first_error=next((a.first_error for a in opened if a.first_error), None),
        )

    def exchange(
        self,
        payload_size: int,
        *,
        warmup: float,
        duration: float,
        interval: float = 0.0,
        once: bool = False,
        grace: float = 5.0,
        port: int | None = None,
    ) -> ExchangeTotals:
        """Ping-pong on every open connection (to ``port``, if given); see :class:`Exchange`."""
        start_at = time.monotonic() + 0.05
        measure_from = start_at + warmup
        measure_to = measure_from + duration
        commands = [
            Exchange(
                payload_size,
                start_at,
                measure_from,
                measure_to,
                interval,
                once,
                grace,
                i / self.size,
                port,
            )
            for i in range(self.size)
        ]
        answers = self._run(commands, warmup + duration + grace + 15.0)
        exchanged = [answer for answer in answers if isinstance(answer, Exchanged)]
        latencies: array[int] = array("q")
        for answer in exchanged:
            latencies.frombytes(answer.latencies_ns)
        return ExchangeTotals(
            completed=sum(answer.completed for answer in exchanged),
            total=sum(answer.total for answer in exchanged),
            seconds=duration,
            latencies_ns=latencies,
            errors=sum(answer.errors for answer in exchanged),
            first_error=next((a.first_error for a in exchanged if a.first_error), None),
            connections=sum(answer.connections for answer in exchanged),
        )

    def check(self, payload_size: int = 64, timeout: float = 10.0) -> ExchangeTotals:
        """One echo on every open connection; the ones that fail are dropped."""
        return self.exchange(payload_size, warmup=0.0, duration=timeout, once=True, grace=0.0)

    def handshakes(
        self,
        target: Target,
        *,
        concurrency: int,
        warmup: float,
        duration: float,
        timeout: float = 5.0,
    ) -> SetupTotals:
        """Upgrades per second in a closed loop of ``concurrency`` connectors."""
        start_at = time.monotonic() + 0.05
        measure_from = start_at + warmup
        measure_to = measure_from + duration
        shares = split(concurrency, self.size)
        starts = [sum(shares[:i]) for i in range(self.size)]
        commands = [
            Handshakes(
                target,
                max(1, share),
                start,
                self.sources,
                timeout,
                start_at,
                measure_from,
                measure_to,
            )
            for share, start in zip(shares, starts, strict=True)
        ]
        answers = self._run(commands, warmup + duration + timeout + 15.0)
        done = [answer for answer in answers if isinstance(answer, Handshaken)]
        return SetupTotals(
            rate=sum(answer.completed for answer in done) / duration,
            total=sum(answer.total for answer in done),
            failed=sum(answer.failed for answer in done),
            first_error=next((a.first_error for a in done if a.first_error), None),
        )

    def close_all(self, timeout: float = 10.0) -> int:
        answers = self._run([CloseAll(timeout)] * self.size, timeout + 15.0)
        return sum(answer.count for answer in answers if isinstance(answer, Closed))

    def stop(self) -> None:
        for _, pipe in self._workers:
            with contextlib.suppress(OSError):
                pipe.send(_Stop())
        for process, pipe in self._workers:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
            pipe.close()
        self._workers = []

    def __enter__(self) -> DriverPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
