"""``wsgate backend``: the demo backend (a "pod") that runs behind wsgate in tests and demos.

It speaks WebSocket on any path and a little HTTP, and it keeps its own count of
what it serves (``GET /stats``). Those counts are the truth the tests and the demo
check the gateway against: a gateway that over-admits shows up here as a peak above
the cap, or as refusals when ``--max-connections`` (the tripwire) is set.

Endpoints:

- WebSocket upgrade on any path: each text message is answered with JSON
  ``{"pod", "pod_ip", "ts", "echo", "active_connections"}``; binary messages are
  echoed as they are; the client's close code and reason are echoed back.
- ``GET /health`` (200 ``ok``, or 503 after ``POST /health/fail`` until ``POST /health/ok``).
- ``GET /slow?min=S&max=S``: answers after a uniform random delay.
- ``POST /echo``: streams the request body back (Content-Length or chunked, mirrored).
- ``GET /stats``, ``POST /stats/reset``: the backend's own counts.
- ``POST /sessions/close?code=C&reason=R&count=N``: closes the N oldest sessions from this side.
- Any other ``GET``: JSON naming the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from wsgate.args import UsageError, count_arg, duration_arg
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging
from wsgate.wire import CloseCode, check_close_code

__all__ = ["BackendCounts", "BackendIdentity", "add_arguments", "build_app", "run", "serve"]

log = logging.getLogger("wsgate.backend")

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _sendable(code: int) -> bool:
    """Whether a client's close code may be echoed (a few must never be on the wire)."""
    try:
        check_close_code(code)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class BackendIdentity:
    """Who this backend says it is in every answer."""

    pod: str
    pod_ip: str


@dataclass
class BackendCounts:
    """The backend's own truth about what it served (no I/O: the handlers call it)."""

    active_connections: int = 0
    peak_connections: int = 0
    total_connections: int = 0
    refused: int = 0
    http_in_flight: int = 0
    peak_http_in_flight: int = 0
    http_requests: int = 0
    messages: int = 0
    peers: dict[str, int] = field(default_factory=dict)

    def session_opened(self, peer: str) -> int:
        self.active_connections += 1
        self.total_connections += 1
        self.peak_connections = max(self.peak_connections, self.active_connections)
        self.peers[peer] = self.peers.get(peer, 0) + 1
        return self.active_connections

    def session_closed(self) -> int:
        self.active_connections -= 1
        return self.active_connections

    def request_started(self, peer: str) -> None:
        self.http_in_flight += 1
        self.http_requests += 1
        self.peak_http_in_flight = max(self.peak_http_in_flight, self.http_in_flight)
        self.peers[peer] = self.peers.get(peer, 0) + 1

    def request_finished(self) -> None:
        self.http_in_flight -= 1

    def reset(self) -> None:
        """Zero the history; what is open now stays open and sets the new peaks."""
        self.peak_connections = self.active_connections
        self.peak_http_in_flight = self.http_in_flight
        self.total_connections = 0
        self.refused = 0
        self.http_requests = 0
        self.messages = 0
        self.peers = {}

    def snapshot(self, pod: str) -> dict[str, Any]:
        return {
            "pod": pod,
            "active_connections": self.active_connections,
            "peak_connections": self.peak_connections,
            "total_connections": self.total_connections,
            "refused": self.refused,
            "http_in_flight": self.http_in_flight,
            "peak_http_in_flight": self.peak_http_in_flight,
            "http_requests": self.http_requests,
            "messages": self.messages,
            "peers": dict(self.peers),
        }


@dataclass
class _State:
    identity: BackendIdentity
    max_connections: int | None
    slow_min: float
    slow_max: float
    counts: BackendCounts = field(default_factory=BackendCounts)
    healthy: bool = True
    # A dict keeps the order sessions opened in: /sessions/close closes the oldest first.
    sessions: dict[web.WebSocketResponse, None] = field(default_factory=dict)
    closing: set[asyncio.Task[bool]] = field(default_factory=set)


_STATE: web.AppKey[_State] = web.AppKey("state", _State)


def _peer(request: web.Request) -> str:
    real_ip = request.headers.get("X-Real-IP")
    if real_ip:
        return real_ip.strip()
    return request.remote or "unknown"


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(data, separators=(",", ":")), content_type="application/json"
    )


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


async def _websocket(request: web.Request, state: _State) -> web.StreamResponse:
    counts = state.counts
    if state.max_connections is not None and counts.active_connections >= state.max_connections:
        counts.refused += 1
        log.warning(
            "Refused a session: %d open, tripwire at %d (refused so far: %d)",
            counts.active_connections,
            state.max_connections,
            counts.refused,
        )
        return _json({"error": "backend_full", "pod": state.identity.pod}, status=503)
    ws = web.WebSocketResponse(autoclose=False, max_msg_size=_MAX_MESSAGE_BYTES, compress=False)
    await ws.prepare(request)
    log.info("Active connections: %d", counts.session_opened(_peer(request)))
    state.sessions[ws] = None
    identity = state.identity
    try:
        # receive() rather than ``async for``: iteration ends before handing over the
        # CLOSE frame, and its code and reason are what this backend echoes.
        while True:
            message = await ws.receive()
            if message.type is WSMsgType.TEXT:
                counts.messages += 1
                answer = {
                    "pod": identity.pod,
                    "pod_ip": identity.pod_ip,
                    "ts": time.time(),
                    "echo": message.data,
                    "active_connections": counts.active_connections,
                }
                await ws.send_str(json.dumps(answer, separators=(",", ":")))
            elif message.type is WSMsgType.BINARY:
                counts.messages += 1
                await ws.send_bytes(message.data)
            elif message.type is WSMsgType.CLOSE:
                code = message.data if _sendable(message.data) else CloseCode.NORMAL_CLOSURE
                await ws.close(code=code, message=(message.extra or "").encode())
                break
            elif message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
    except ConnectionError:
        pass
    finally:
        state.sessions.pop(ws, None)
        log.info("Active connections: %d", counts.session_closed())
    return ws


async def _application_request(request: web.Request, state: _State) -> web.StreamResponse:
    """Count one HTTP request in flight around the handler that answers it."""
    state.counts.request_started(_peer(request))
    try:
        if request.path == "/slow":
            return await _slow(request, state)
        if request.path == "/echo" and request.method == "POST":
            return await _echo(request)
        return _json(
            {
                "pod": state.identity.pod,
                "pod_ip": state.identity.pod_ip,
                "ts": time.time(),
                "path": request.path,
            }
        )
    finally:
        state.counts.request_finished()


async def _slow(request: web.Request, state: _State) -> web.Response:
    try:
        low = float(request.query.get("min", state.slow_min))
        high = float(request.query.get("max", state.slow_max))
    except ValueError:
        return _json({"error": "min and max must be numbers of seconds"}, status=400)
    if low < 0 or high < low:
        return _json({"error": "need 0 <= min <= max"}, status=400)
    delay = random.uniform(low, high)
    await asyncio.sleep(delay)
    return _json(
        {
            "pod": state.identity.pod,
            "pod_ip": state.identity.pod_ip,
            "ts": time.time(),
            "delay": delay,
        }
    )


async def _echo(request: web.Request) -> web.StreamResponse:
    # Mirror the framing: a Content-Length body comes back with that length,
    # anything else comes back chunked; both stream without holding the body.
    response = web.StreamResponse()
    response.content_type = request.content_type or "application/octet-stream"
    if request.content_length is not None:
        response.content_length = request.content_length
    else:
        response.enable_chunked_encoding()
    await response.prepare(request)
    async for chunk in request.content.iter_any():
        await response.write(chunk)
    await response.write_eof()
    return response


def build_app(
    identity: BackendIdentity,
    *,
    max_connections: int | None = None,
    slow_min: float = 20.0,
    slow_max: float = 60.0,
) -> web.Application:
    """The aiohttp application of one backend (tests may run it in-process)."""
    state = _State(identity, max_connections, slow_min, slow_max)
    app = web.Application(client_max_size=_MAX_MESSAGE_BYTES)
    app[_STATE] = state

    async def health(request: web.Request) -> web.Response:
        if state.healthy:
            return web.Response(text="ok")
        return web.Response(status=503, text="failing")

    async def set_health(request: web.Request) -> web.Response:
        state.healthy = request.match_info["how"] == "ok"
        log.info("Health checks now answer %s", 200 if state.healthy else 503)
        return web.Response(text="ok" if state.healthy else "failing")

    async def stats(request: web.Request) -> web.Response:
        return _json(state.counts.snapshot(identity.pod))

    async def reset_stats(request: web.Request) -> web.Response:
        state.counts.reset()
        return _json(state.counts.snapshot(identity.pod))

    async def close_sessions(request: web.Request) -> web.Response:
        try:
            code = int(request.query.get("code", CloseCode.GOING_AWAY))
            count = int(request.query.get("count", len(state.sessions)))
        except ValueError:
            return _json({"error": "code and count must be integers"}, status=400)
        reason = request.query.get("reason", "").encode()
        chosen = list(state.sessions)[:count]
        # Close frames go out now; the handshakes finish in the background so this
        # answer does not wait on clients that are slow to answer them.
        for ws in chosen:
            task = asyncio.create_task(ws.close(code=code, message=reason))
            state.closing.add(task)
            task.add_done_callback(state.closing.discard)
        await asyncio.sleep(0)
        return _json({"closed": len(chosen)})

    async def anything(request: web.Request) -> web.StreamResponse:
        if _is_upgrade(request):
            return await _websocket(request, state)
        return await _application_request(request, state)

    async def close_all_sessions(app: web.Application) -> None:
        await asyncio.gather(
            *(
                ws.close(code=CloseCode.GOING_AWAY, message=b"backend stopping")
                for ws in list(state.sessions)
            ),
            return_exceptions=True,
        )

    app.on_shutdown.append(close_all_sessions)
    app.router.add_get("/health", health)
    app.router.add_post(r"/health/{how:ok|fail}", set_health)
    app.router.add_get("/stats", stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_post("/sessions/close", close_sessions)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def _default_pod_ip(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    with contextlib.suppress(OSError):
        return socket.gethostbyname(socket.gethostname())
    return "127.0.0.1"


async def serve(args: argparse.Namespace) -> None:
    identity = BackendIdentity(
        pod=args.pod_id or os.environ.get("POD_ID") or socket.gethostname(),
        pod_ip=args.pod_ip or os.environ.get("POD_IP") or _default_pod_ip(args.host),
    )
    app = build_app(
        identity,
        max_connections=args.max_connections,
        slow_min=args.slow_min,
        slow_max=args.slow_max,
    )
    # handler_cancellation: a request whose client went away stops counting as in flight.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096, reuse_address=True)
    await site.start()
    log.info(
        "Backend %s (%s) listening on %s:%d, tripwire %s",
        identity.pod,
        identity.pod_ip,
        args.host,
        args.port,
        args.max_connections if args.max_connections is not None else "off",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=9001, help="port to listen on (default 9001)")
    parser.add_argument(
        "--pod-id", help="name in every answer (default $POD_ID, else the hostname)"
    )
    parser.add_argument("--pod-ip", help="address in every answer (default $POD_IP, else the host)")
    parser.add_argument(
        "--max-connections",
        type=count_arg,
        metavar="N",
        help="tripwire: refuse WebSocket sessions beyond N with 503 and count the refusals",
    )
    parser.add_argument(
        "--slow-min",
        type=duration_arg,
        default=20.0,
        metavar="S",
        help="/slow default minimum delay",
    )
    parser.add_argument(
        "--slow-max",
        type=duration_arg,
        default=60.0,
        metavar="S",
        help="/slow default maximum delay",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    if args.slow_max < args.slow_min:
        raise UsageError(f"--slow-max ({args.slow_max}) is below --slow-min ({args.slow_min})")
    setup_logging(args.log_level)
    raise_open_files_limit()
    try:
        run_async(serve(args))
    except OSError as error:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {error.strerror or error}"
        ) from None
    return 0
