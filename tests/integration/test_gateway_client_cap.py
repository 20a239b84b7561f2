"""limits.max_connections_per_client through real gateways: 429 client_connection_limit,
shared by replicas through Redis, shown in metrics and ``wsgate state``, nothing left behind.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import pytest
from edgetools import metric
from gwtools import close_all, open_many, wait_until
from redis import Redis
from test_store_inspect import wsgate_state

from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import start_backends, start_gateway

pytestmark = pytest.mark.slow

PER_CLIENT = 2


@pytest.mark.redis
async def test_two_replicas_share_each_clients_cap(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    backends = start_backends(procs, 2)
    shared = {
        "state": {"store": redis_server.url, "namespace": "capped", "timeout": "1s"},
        "limits": {"max_connections_per_backend": 50, "max_connections_per_client": PER_CLIENT},
    }
    one = start_gateway(procs, backends, name="one", **shared)
    two = start_gateway(procs, backends, name="two", **shared)
    first = await open_many(one.ws_url, 1, local_ips=["127.0.0.2"])
    second = await open_many(two.ws_url, 1, local_ips=["127.0.0.2"])
    assert first.statuses[101] == second.statuses[101] == 1
    # The client has its two, one through each replica: a third is refused by either.
    for gateway in (one, two):
        refused = await open_many(gateway.ws_url, 1, local_ips=["127.0.0.2"])
        assert refused.statuses == Counter({429: 1})
        assert refused.bodies[0]["error"] == "client_connection_limit"
        assert refused.retry_after == [5]  # limits.retry_after
        assert metric(gateway, "wsgate_rejected_total", reason="client_connection_limit") == 1
        assert metric(gateway, "wsgate_clients_connected") == 1
    # Another client is not held back by it.
    other = await open_many(one.ws_url, PER_CLIENT, local_ips=["127.0.0.3"])
    assert other.statuses[101] == PER_CLIENT
    total = sum(b.stats()["active_connections"] for b in backends)
    assert total == 2 + PER_CLIENT

    code, out, _ = await wsgate_state("--redis", redis_server.url, "--namespace", "capped")
    assert code == 0 and "2 clients counted" in out, out
    code, out, _ = await wsgate_state(
        "--redis", redis_server.url, "--namespace", "capped", "--json"
    )
    assert json.loads(out)["totals"]["clients"] == 2

    # One ends: the client may open one again, through either replica.
    await close_all(first.open)
    await wait_until(lambda: sum(b.stats()["active_connections"] for b in backends) == 3)
    again = await open_many(two.ws_url, 1, local_ips=["127.0.0.2"])
    assert again.statuses[101] == 1
    await close_all(second.open + other.open + again.open)
    await wait_until(lambda: sum(b.stats()["active_connections"] for b in backends) == 0)
    # Clients with no connection left leave nothing behind in Redis.
    redis = Redis.from_url(redis_server.url, decode_responses=True)
    try:

        def client_keys() -> dict[str, str]:
            found = {}
            for key in redis.scan_iter(match="{wsgate:capped}:clients*"):
                found[str(key)] = str(redis.hgetall(key))
            return found

        await wait_until(lambda: client_keys() == {}, within=5)
    finally:
        redis.close()


async def test_http_requests_in_flight_count_too(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        limits={"max_connections_per_backend": 50, "max_connections_per_client": PER_CLIENT},
    )
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.4", 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def slow() -> int:
            async with http.get(f"{gateway.http_url}/slow?min=1.5&max=1.5") as answer:
                await answer.read()
                return answer.status

        waiting = [asyncio.ensure_future(slow()) for _ in range(PER_CLIENT)]
        await wait_until(lambda: backends[0].stats()["http_in_flight"] == PER_CLIENT)
        async with http.get(f"{gateway.http_url}/hello") as refused:
            assert refused.status == 429
            assert (await refused.json())["error"] == "client_connection_limit"
            assert refused.headers["Retry-After"] == "5"
        assert await asyncio.gather(*waiting) == [200] * PER_CLIENT
        async with http.get(f"{gateway.http_url}/hello") as answer:
            assert answer.status == 200
    assert backends[0].stats()["peak_http_in_flight"] == PER_CLIENT


async def test_a_route_inherits_the_cap_and_counts_its_clients_on_its_own(
    procs: ProcessGroup,
) -> None:
    main = start_backends(procs, 1, prefix="main")
    chat = start_backends(procs, 1, prefix="chat")
    chat_route = {
        "name": "chat",
        "match": {"path_prefix": "/chat"},
        "backends": [{"address": b.address, "id": b.pod_id} for b in chat],
    }
    gateway = start_gateway(
        procs,
        main,
        limits={"max_connections_per_backend": 50, "max_connections_per_client": 1},
        routes=[chat_route],
    )
    url = f"ws://127.0.0.1:{gateway.port}"
    held = []
    for path in ("/", "/chat"):
        one = await open_many(f"{url}{path}", 1, local_ips=["127.0.0.2"])
        assert one.statuses == Counter({101: 1}), path
        held += one.open
        refused = await open_many(f"{url}{path}", 1, local_ips=["127.0.0.2"])
        assert refused.statuses == Counter({429: 1}), path
        assert refused.bodies[0]["error"] == "client_connection_limit"
    # What the backends hold: the client's one session on each route, no more.
    assert [b.stats()["active_connections"] for b in (*main, *chat)] == [1, 1]
    assert metric(gateway, "wsgate_clients_connected") == 2
    await close_all(held)
    await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in (*main, *chat)))
    await wait_until(lambda: metric(gateway, "wsgate_clients_connected") == 0)
