"""Routes behind one gateway: each with its own pool, cap, rate and shared state.

Every count is taken at the far side: the backends' own ``/stats`` (live
sessions, their peak, and what their ``--max-connections`` tripwire refused)
and what the clients got. Two replicas share one real redis-server; a reload
adds, changes and removes routes under live sessions.
"""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
from gwtools import Outcomes, close_all, open_many, pod_of, raw_request, wait_until
from lifecycle import close_seen, logged, rewrite, started
from redis import Redis

from wsgate.admission.redis import key_prefix
from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import BackendProcess, GatewayProcess, start_backends, start_gateway

pytestmark = [pytest.mark.slow]


def pool(backends: list[BackendProcess]) -> list[dict[str, str]]:
    return [{"address": b.address, "id": b.pod_id} for b in backends]


async def open_at_host(gateway: GatewayProcess, host: str, path: str, count: int) -> Outcomes:
    """Open ``count`` sessions whose Host header names ``host``, through the gateway."""
    url = f"ws://{host}:{gateway.port}{path}"
    return await open_many(url, count, host="127.0.0.1", port=gateway.port)


def live(backends: list[BackendProcess]) -> dict[str, int]:
    return {b.pod_id: b.stats()["active_connections"] for b in backends}


def served(backends: list[BackendProcess]) -> int:
    """Everything the backends were ever asked: sessions and plain requests."""
    return sum(s["total_connections"] + s["http_requests"] for s in (b.stats() for b in backends))


def never_over(backends: list[BackendProcess], cap: int) -> None:
    stats = {b.pod_id: b.stats() for b in backends}
    assert all(s["peak_connections"] <= cap for s in stats.values()), stats
    assert all(s["refused"] == 0 for s in stats.values()), stats


def two_routes(
    chat: list[BackendProcess], api: list[BackendProcess], **api_extra: Any
) -> list[Any]:
    return [
        {
            "name": "chat",
            "match": {"path_prefix": "/chat"},
            "backends": pool(chat),
            "limits": {"max_connections_per_backend": 1},
        },
        {
            "name": "api",
            "match": {"host": "api.example.com"},
            "backends": pool(api),
            "limits": {"max_connections_per_backend": 2, **api_extra},
        },
    ]


async def test_each_route_has_its_pool_and_cap_and_no_route_is_404(procs: ProcessGroup) -> None:
    chat = start_backends(procs, 2, prefix="chat", tripwire=1)
    api = start_backends(procs, 1, prefix="api", tripwire=2)
    gateway = started(start_gateway(procs, [], routes=two_routes(chat, api)))
    url = f"ws://127.0.0.1:{gateway.port}"

    chats = await open_many(f"{url}/chat/room-1", 3)
    apis = await open_at_host(gateway, "API.Example.com", "/chat/room-1", 3)
    try:
        # /chat: two backends with a cap of 1; the host route wins over the prefix.
        assert chats.statuses == {101: 2, 503: 1}, chats.statuses
        assert apis.statuses == {101: 2, 503: 1}, apis.statuses
        assert sorted([await pod_of(ws) for ws in chats.open]) == ["chat-a", "chat-b"]
        assert [await pod_of(ws) for ws in apis.open] == ["api-a", "api-a"]
        assert live(chat + api) == {"chat-a": 1, "chat-b": 1, "api-a": 2}
        never_over(chat, 1)
        never_over(api, 2)

        # No route: 404 no_route, and no backend hears of it.
        before = served(chat + api)
        for target, host in (("/chatx", "127.0.0.1"), ("/", "other.example.com")):
            status, headers, body = await raw_request(
                "127.0.0.1",
                gateway.port,
                f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(),
            )
            assert (status, json.loads(body)) == (404, {"error": "no_route"})
            assert "retry-after" not in headers
        refused = await open_many(f"{url}/wsx", 1)
        assert refused.statuses == {404: 1} and refused.bodies == [{"error": "no_route"}]
        assert served(chat + api) == before

        clusters = gateway.admin("/clusters")
        routes = {r["name"]: r for r in clusters["routes"]}
        assert (routes["chat"]["active"], routes["chat"]["capacity"]) == (2, 2)
        assert (routes["api"]["active"], routes["api"]["capacity"]) == (2, 2)
        assert routes["api"]["match"] == {"host": "api.example.com", "path_prefix": "/"}
        assert {(b["route"], b["id"]) for b in clusters["backends"]} == {
            ("chat", "chat-a"), ("chat", "chat-b"), ("api", "api-a"),
        }  # fmt: skip
        metrics = gateway_metrics(gateway)
        assert 'wsgate_rejected_total{reason="no_route"} 3.0' in metrics
        assert 'wsgate_route_rejected_total{reason="no_capacity",route="chat"} 1.0' in metrics
    finally:
        await close_all(chats.open + apis.open)
    await wait_until(lambda: sum(live(chat + api).values()) == 0)


def gateway_metrics(gateway: GatewayProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.redis
async def test_two_replicas_hold_each_routes_cap_and_rate_exactly(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    chat = start_backends(procs, 2, prefix="chat", tripwire=1)
    api = start_backends(procs, 1, prefix="api", tripwire=5)
    state = {"store": redis_server.url, "namespace": "rt", "lease_ttl": "2s", "timeout": "250ms"}
    # api: a cap of 5, but a burst of 3 tokens shared by both replicas and no refill to speak of.
    routes = two_routes(chat, api, connect_rate={"per_second": 0.01, "burst": 3})
    routes[1]["limits"]["max_connections_per_backend"] = 5
    gateways = [
        started(start_gateway(procs, [], name=f"rt-{i}", state=state, routes=routes))
        for i in range(2)
    ]
    attempts = [
        open_many(f"ws://127.0.0.1:{gw.port}/chat/{i}", 3) for i, gw in enumerate(gateways)
    ] + [open_at_host(gw, "api.example.com", "/", 4) for gw in gateways]
    outcomes = await asyncio.gather(*attempts)
    opened = [ws for outcome in outcomes for ws in outcome.open]
    try:
        chat_in = sum(o.statuses[101] for o in outcomes[:2])
        api_in = sum(o.statuses[101] for o in outcomes[2:])
        assert chat_in == 2 and sum(o.statuses[503] for o in outcomes[:2]) == 4
        assert api_in == 3 and sum(o.statuses[429] for o in outcomes[2:]) == 5
        assert live(chat + api) == {"chat-a": 1, "chat-b": 1, "api-a": 3}
        never_over(chat, 1)
        never_over(api, 5)
        # Each route's state is under its own hash tag: a Redis Cluster spreads routes.
        assert redis_total(redis_server, "rt:chat") == {"chat-a": 1, "chat-b": 1}
        assert redis_total(redis_server, "rt:api") == {"api-a": 3}
    finally:
        await close_all(opened)
    await wait_until(lambda: sum(live(chat + api).values()) == 0)
    await wait_until(lambda: sum(redis_total(redis_server, "rt:chat").values()) == 0)


def redis_total(server: RedisServer, namespace: str) -> dict[str, int]:
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        total = client.hgetall(f"{key_prefix(namespace)}:total")
        return {k: int(v) for k, v in total.items() if int(v)}
    finally:
        client.close()


async def test_reload_adds_changes_and_removes_routes_under_live_sessions(
    procs: ProcessGroup,
) -> None:
    main = start_backends(procs, 1, prefix="main")
    chat = start_backends(procs, 1, prefix="chat")
    api = start_backends(procs, 1, prefix="api")
    chat_route = {"name": "chat", "match": {"path_prefix": "/chat"}, "backends": pool(chat)}
    gateway = started(start_gateway(procs, main, routes=[chat_route]))
    url = f"ws://127.0.0.1:{gateway.port}"
    first = await open_many(f"{url}/", 1)
    chatting = await open_many(f"{url}/chat", 1)
    opened = first.open + chatting.open
    try:
        assert [await pod_of(ws) for ws in opened] == ["main-a", "chat-a"]

        # Add api (cap 1) and remove chat: chat's session is told 1001, main's stays.
        api_route = {
            "name": "api",
            "match": {"path_prefix": "/api"},
            "backends": pool(api),
            "limits": {"max_connections_per_backend": 1},
        }
        rewrite(gateway, routes=[api_route])
        gateway.process.signal(signal.SIGHUP)
        await logged(gateway, "config reloaded")
        _, code, _ = await close_seen(chatting.open[0], within=10)
        assert code == 1001
        await wait_until(lambda: live(chat)["chat-a"] == 0)
        assert await pod_of(first.open[0]) == "main-a" and live(main)["main-a"] == 1
        moved = await open_many(f"{url}/chat/1", 1)  # no chat route: the default takes it
        apis = await open_many(f"{url}/api/v1", 2)
        opened += moved.open + apis.open
        assert [await pod_of(ws) for ws in moved.open] == ["main-a"]
        assert apis.statuses == {101: 1, 503: 1}
        assert live(api)["api-a"] == 1

        # Change api's cap to 2: its live session stays, one more gets in.
        rewrite(gateway, routes=[{**api_route, "limits": {"max_connections_per_backend": 2}}])
        gateway.process.signal(signal.SIGHUP)
        await logged(gateway, "config reloaded", times=2)
        more = await open_many(f"{url}/api/v2", 2)
        opened += more.open
        assert more.statuses == {101: 1, 503: 1}
        assert live(api)["api-a"] == 2 and live(main)["main-a"] == 2
        assert [r["name"] for r in gateway.admin("/clusters")["routes"]] == ["default", "api"]
    finally:
        await close_all(opened)
    assert "gateway_stopped" not in gateway.process.output()
