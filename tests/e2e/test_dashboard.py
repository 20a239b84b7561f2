"""The dashboard in a real headless Chromium: the numbers of /clusters, live.

Chromium comes from the system (Debian's ``chromium``, or ``$WSGATE_CHROMIUM``);
Playwright for Python drives it through ``executable_path``, so no browser
download is needed. The test skips, saying why, only where no Chromium exists.
It leaves a screenshot in ``artifacts/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from wsgate.testbed.processes import ProcessGroup, wait_for_port
from wsgate.testbed.topology import GatewayProcess, start_backends, start_gateway

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
TOKEN = "dashboard-test-token"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip

# What the page shows for each backend, read from the visible text of its row.
READ_ROWS = """() => [...document.querySelectorAll("#backends tbody tr")].map((tr) => {
  const text = (name) => tr.querySelector(`[data-field="${name}"]`).textContent.trim();
  const number = (name) => Number(text(name).replace(/,/g, ""));
  return {
    route: text("route"), id: text("id"), address: text("address"),
    healthy: text("healthy") === "healthy",
    active: number("active"), active_here: number("active_here"),
    max_connections: number("max_connections"), admitted_total: number("admitted_total"),
    rejected_total: number("rejected_total"),
  };
})"""


def find_chromium() -> str | None:
    candidates = [
        os.environ.get("WSGATE_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def clusters_rows(gateway: GatewayProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = gateway.admin("/clusters", token=TOKEN)["backends"]
    return rows


async def page_matches(page: Any, gateway: GatewayProcess, within: float) -> list[dict[str, Any]]:
    """Wait until the page's rows equal /clusters (read afresh each time), up to ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        expected = await asyncio.to_thread(clusters_rows, gateway)
        shown = await page.evaluate(READ_ROWS)
        if shown == expected:
            return shown
        if time.monotonic() > deadline:
            raise AssertionError(f"dashboard shows {shown}, /clusters says {expected}")
        await asyncio.sleep(0.1)


async def traffic(gateway: GatewayProcess, seconds: float) -> None:
    """Plain requests faster than the connect rate: some admitted, some 429."""
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            async with http.get(f"{gateway.http_url}/work") as response:
                await response.read()
            await asyncio.sleep(0.06)


async def test_dashboard_shows_clusters_and_follows_a_change(procs: ProcessGroup) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary found: install Debian's chromium or set WSGATE_CHROMIUM")
    playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright")

    backends = start_backends(procs, 3)
    gateway = start_gateway(
        procs,
        backends,
        admin_token=TOKEN,
        limits={
            "max_connections_per_backend": 2,
            "connect_rate": {"per_second": 4, "burst": 12},
        },
    )
    wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    sessions: list[ClientConnection] = []
    for _ in range(5):
        sessions.append(await connect(gateway.ws_url, open_timeout=5, ping_interval=None))

    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 960})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on(
                "console",
                lambda message: problems.append(message.text) if message.type == "error" else None,
            )

            # The admin API needs the token: sign in on the page, as an operator would.
            await page.goto(f"{gateway.admin_url}/dashboard")
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_selector('#backends tr[data-backend="pod-a"]', timeout=5000)
            problems.clear()  # the sign-in page itself was a 401
            shown = await page_matches(page, gateway, within=2.0)
            assert [row["id"] for row in shown] == ["pod-a", "pod-b", "pod-c"]
            assert sum(row["active"] for row in shown) == 5
            assert await page.text_content("#link") == "live"
            assert await page.text_content("#mode") == "ok"

            # A new session is on the page within two seconds, and so is its end.
            sessions.append(await connect(gateway.ws_url, open_timeout=5, ping_interval=None))
            started = time.monotonic()
            await page.wait_for_function(
                "() => document.getElementById('active').textContent === '6'", timeout=2000
            )
            opened_after = time.monotonic() - started
            await page_matches(page, gateway, within=0.5)
            await sessions.pop().close()
            started = time.monotonic()
            await page.wait_for_function(
                "() => document.getElementById('active').textContent === '5'", timeout=2000
            )
            closed_after = time.monotonic() - started
            print(
                f"dashboard followed an open in {opened_after:.2f}s, a close in {closed_after:.2f}s"
            )

            # Some admissions and 429s for the chart, one full backend, then the picture.
            await traffic(gateway, 3.0)
            for _ in range(2):
                result = await asyncio.gather(
                    connect(gateway.ws_url, open_timeout=5, ping_interval=None),
                    return_exceptions=True,
                )
                sessions.extend(r for r in result if isinstance(r, ClientConnection))
            for session in sessions[:2]:
                await session.close()
            await asyncio.sleep(1.5)
            await page_matches(page, gateway, within=2.0)
            chart_drawn = await page.evaluate(
                """() => { const c = document.getElementById('chart');
                           const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                           for (let i = 3; i < d.length; i += 4) if (d[i]) return true;
                           return false; }"""
            )
            assert chart_drawn
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            assert problems == []
        finally:
            await browser.close()
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


# What the page shows for each route, read from the visible text of its row.
READ_ROUTES = """() => [...document.querySelectorAll("#routes tbody tr")].map((tr) => {
  const cell = (name) => tr.querySelector(`[data-field="${name}"]`);
  const number = (name) => Number(cell(name).textContent.trim().replace(/,/g, ""));
  const count = tr.querySelector(".count").textContent.split("/").map((s) => Number(s.trim()));
  return {
    name: cell("name").textContent.trim(), host: cell("host").dataset.value || null,
    path_prefix: cell("path_prefix").textContent.trim(), active: count[0], capacity: count[1],
    backends: number("backends"), queued: number("queued"),
    admitted_total: number("admitted_total"), rejected_total: number("rejected_total"),
  };
})"""
ROUTE_FIELDS = ("name", "active", "capacity", "backends", "queued", "admitted_total",
                "rejected_total")  # fmt: skip


def clusters_routes(gateway: GatewayProcess) -> list[dict[str, Any]]:
    routes = gateway.admin("/clusters", token=TOKEN)["routes"]
    return [{**{k: r[k] for k in ROUTE_FIELDS}, **r["match"]} for r in routes]


async def test_dashboard_shows_routes(procs: ProcessGroup) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary found: install Debian's chromium or set WSGATE_CHROMIUM")
    playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright")

    main = start_backends(procs, 2, prefix="main")
    chat = start_backends(procs, 2, prefix="chat")
    gateway = start_gateway(
        procs, main, admin_token=TOKEN,
        routes=[{
            "name": "chat", "match": {"host": "chat.example.com", "path_prefix": "/ws"},
            "backends": [{"address": b.address, "id": b.pod_id} for b in chat],
            "limits": {"max_connections_per_backend": 1},
        }],
    )  # fmt: skip
    wait_for_port("127.0.0.1", gateway.admin_port, process=gateway.process)
    at_chat = {"host": "127.0.0.1", "port": gateway.port}
    chat_url = f"ws://chat.example.com:{gateway.port}/ws/room"
    sessions = [await connect(gateway.ws_url, open_timeout=5, ping_interval=None)]
    sessions += [
        await connect(chat_url, open_timeout=5, ping_interval=None, **at_chat) for _ in range(2)
    ]
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1100})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            await page.goto(f"{gateway.admin_url}/dashboard")
            await page.fill("#token", TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_selector('#routes tr[data-route="chat"]', timeout=5000)

            deadline = time.monotonic() + 3
            while True:
                expected = await asyncio.to_thread(clusters_routes, gateway)
                shown = await page.evaluate(READ_ROUTES)
                if shown == expected or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert shown == expected
            assert [(r["name"], r["host"], r["path_prefix"]) for r in shown] == [
                ("default", None, "/"), ("chat", "chat.example.com", "/ws"),
            ]  # fmt: skip
            # What the backends themselves count, route by route.
            truth = {b.pod_id: b.stats()["active_connections"] for b in main + chat}
            assert [r["active"] for r in shown] == [
                truth["main-a"] + truth["main-b"], truth["chat-a"] + truth["chat-b"],
            ]  # fmt: skip
            assert shown[1]["active"] == shown[1]["capacity"] == 2
            rows = await page.evaluate(READ_ROWS)
            assert {(r["route"], r["id"]) for r in rows} == {
                ("default", "main-a"), ("default", "main-b"),
                ("chat", "chat-a"), ("chat", "chat-b"),
            }  # fmt: skip
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard-routes.png"), full_page=True)
            assert problems == []
        finally:
            await browser.close()
    await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
