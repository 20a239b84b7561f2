"""The admin HTTP server (aiohttp): probes, metrics, the JSON API and the dashboard.

It runs on the gateway's own event loop and only reads the gateway (see
:mod:`.snapshot`). With ``admin_token`` set, everything but the probes needs
``Authorization: Bearer TOKEN``; a browser, which cannot send that header on a
page load, signs in once on the dashboard's form and then carries a cookie
derived from the token (never the token itself).

The dashboard is fed by server-sent events: one ticker reads the gateway every
``push_interval`` while someone watches and hands the same encoded event to all
streams, so ten open dashboards cost one reading, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from wsgate.admin.metrics import CONTENT_TYPE, GatewayCollector, render
from wsgate.admin.snapshot import (
    RateHistory,
    clusters_json,
    overview_json,
    stats_text,
    take_snapshot,
)
from wsgate.config import parse_address

if TYPE_CHECKING:
    from wsgate.gateway.server import Gateway

__all__ = ["OPEN_PATHS", "SESSION_COOKIE", "AdminServer"]

log = logging.getLogger("wsgate.admin")

OPEN_PATHS = frozenset({"/ready", "/healthz", "/login"})
SESSION_COOKIE = "wsgate_admin"
# The dashboard shows the last few points again in every event, so a stream
# that missed a tick (slow client) still gets every point of the chart.
_RECENT_POINTS = 5

_INDEX = """wsgate admin

/ready        readiness (200 while taking connections, 503 while starting or draining)
/healthz      liveness
/metrics      Prometheus metrics
/clusters     backends with their global and local counts (JSON)
/stats        the same figures as name: value lines
/config_dump  the effective configuration, secrets redacted (JSON)
/snapshot     everything the dashboard shows, with recent rates (JSON)
/events       the snapshot as server-sent events
/dashboard    the live dashboard
"""


def _page(name: str) -> str:
    return resources.files("wsgate.admin").joinpath(name).read_text(encoding="utf-8")


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class AdminServer:
    def __init__(
        self,
        gateway: Gateway,
        address: str,
        token: str | None = None,
        *,
        push_interval: float = 0.5,
    ):
        self.gateway = gateway
        self.host, self.port = parse_address(address)
        self.token = token or None
        self.push_interval = push_interval
        self.history = RateHistory()
        self.collector = GatewayCollector(gateway)
        self._session_value = (
            hmac.new(self.token.encode(), b"wsgate admin session", hashlib.sha256).hexdigest()
            if self.token
            else ""
        )
        self.app = web.Application(middlewares=[self._authorize])
        routes = self.app.router
        routes.add_get("/", self.index)
        routes.add_get("/ready", self.ready)
        routes.add_get("/healthz", self.healthz)
        routes.add_get("/metrics", self.metrics)
        routes.add_get("/clusters", self.clusters)
        routes.add_get("/stats", self.stats)
        routes.add_get("/config_dump", self.config_dump)
        routes.add_get("/snapshot", self.snapshot)
        routes.add_get("/events", self.events)
        routes.add_get("/dashboard", self.dashboard)
        routes.add_post("/login", self.login)
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._tick = asyncio.Condition()
        self._latest = b""
        self._watchers = 0
        self._stopping = False

    async def start(self) -> None:
        self.gateway.stats.registry.register(self.collector)
        # Streams end when stop() says so; the timeout only bounds a stuck client.
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        try:
            await web.TCPSite(self._runner, self.host, self.port).start()
        except OSError:
            await self._runner.cleanup()
            self.gateway.stats.registry.unregister(self.collector)
            raise
        self._ticker = asyncio.create_task(self._tick_forever(), name="admin-ticker")

    async def stop(self) -> None:
        self._stopping = True
        async with self._tick:
            self._tick.notify_all()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            with contextlib.suppress(KeyError):
                self.gateway.stats.registry.unregister(self.collector)

    # -- authorization --------------------------------------------------------------------------
    def _authorized(self, request: web.Request) -> bool:
        assert self.token is not None
        header = request.headers.get("Authorization", "")
        scheme, _, credentials = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self.token.encode()
        ):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return bool(cookie) and hmac.compare_digest(cookie.encode(), self._session_value.encode())

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.token is None or request.path in OPEN_PATHS or self._authorized(request):
            return await handler(request)
        if request.path == "/dashboard" and request.method == "GET":
            return self._login_page(status=401)
        return web.json_response(
            {"error": "unauthorized", "detail": "send Authorization: Bearer <admin_token>"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="wsgate admin"'},
        )

    def _login_page(self, status: int, problem: str = "") -> web.Response:
        page = _page("login.html").replace("{{problem}}", problem)
        return web.Response(
            status=status,
            text=page,
            content_type="text/html",
            headers={"WWW-Authenticate": 'Bearer realm="wsgate admin"'},
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """The dashboard's sign-in form: a right token earns the session cookie."""
        if self.token is None:
            raise web.HTTPSeeOther("/dashboard")
        form = await request.post()
        given = form.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            return self._login_page(status=401, problem="That token is not the admin token.")
        response = web.HTTPSeeOther("/dashboard")
        response.set_cookie(
            SESSION_COOKIE, self._session_value, httponly=True, samesite="Strict", path="/"
        )
        return response

    # -- probes ---------------------------------------------------------------------------------
    async def ready(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        stores_ok = all(store.mode == "ok" for store in gateway.routes.stores)
        usable = stores_ok or gateway.config.state.on_failure == "local"
        if gateway.ready and not gateway.draining and usable:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    # -- the API --------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=_INDEX)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=render(self.gateway), headers={"Content-Type": CONTENT_TYPE})

    async def clusters(self, request: web.Request) -> web.Response:
        return web.json_response(clusters_json(take_snapshot(self.gateway)))

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(text=stats_text(take_snapshot(self.gateway)))

    async def config_dump(self, request: web.Request) -> web.Response:
        return web.json_response(
            self.gateway.config.public_dump(), dumps=lambda data: json.dumps(data, indent=2)
        )

    async def snapshot(self, request: web.Request) -> web.Response:
        overview = overview_json(take_snapshot(self.gateway), self.history.points())
        return web.json_response(overview)

    async def dashboard(self, request: web.Request) -> web.Response:
        return web.Response(
            text=_page("dashboard.html"),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: the full picture first, then one event per tick."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies must not hold events back
            }
        )
        await response.prepare(request)
        self._watchers += 1
        try:
            first = overview_json(take_snapshot(self.gateway), self.history.points())
            await response.write(b"retry: 2000\n" + _sse(first))
            while not self._stopping:
                async with self._tick:
                    await self._tick.wait()
                if self._stopping:
                    break
                await response.write(self._latest)
        except ConnectionResetError:
            pass  # the page went away
        finally:
            self._watchers -= 1
        return response

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_sample = loop.time()
        stats = self.gateway.stats
        while True:
            try:
                if loop.time() >= next_sample:
                    next_sample += RateHistory.INTERVAL
                    if next_sample < loop.time():
                        next_sample = loop.time() + RateHistory.INTERVAL
                    rejected = {str(reason): n for reason, n in stats.rejected.items()}
                    self.history.sample(time.time(), stats.admitted_total, rejected)
                if self._watchers:
                    recent = self.history.points()[-_RECENT_POINTS:]
                    self._latest = _sse(overview_json(take_snapshot(self.gateway), recent))
                    async with self._tick:
                        self._tick.notify_all()
            except Exception:
                log.exception("admin ticker failed; retrying")
            await asyncio.sleep(self.push_interval)
