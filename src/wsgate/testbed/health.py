"""``GET /health`` for a load generator that runs as a Kubernetes pod (seed 000)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

__all__ = ["serve_health"]


async def serve_health(host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Answer ``GET /health`` on ``host:port``; return the coroutine function that stops it."""

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner.cleanup
