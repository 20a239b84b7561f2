"""The admin HTTP server (aiohttp): readiness and liveness, then the rest of the API."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from wsgate.config import parse_address

if TYPE_CHECKING:
    from wsgate.gateway.server import Gateway

__all__ = ["AdminServer"]


class AdminServer:
    def __init__(self, gateway: Gateway, address: str, token: str | None = None):
        self.gateway = gateway
        self.host, self.port = parse_address(address)
        self.token = token
        self.app = web.Application()
        self.app.router.add_get("/ready", self.ready)
        self.app.router.add_get("/healthz", self.healthz)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def ready(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        usable = gateway.store.mode == "ok" or gateway.config.state.on_failure == "local"
        if gateway.ready and not gateway.draining and usable:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")
