"""A real HAProxy in front: the gateway sees each client's own address, not the balancer's.

Clients connect from 127.0.0.2, 127.0.0.3, ...; HAProxy connects to the gateway
from 127.0.0.1, the one address the gateway trusts. Each client address gets
its own per-IP budget only if the gateway resolved it: with the balancer's
address, all of them would share one. The truth is read at the far side (the
backend's own count of peers, from the X-Real-IP the gateway sent) and in the
gateway's access log.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from edgetools import access_records, metric
from gwtools import access_log_written, close_all, open_many, wait_until
from haproxy import start_haproxy

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway

pytestmark = pytest.mark.slow

CLIENTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PER_CLIENT = 2
# Two connections per client address, ever (the bucket refills in 100 s).
CLIENT_RATE = {"per_second": 0.01, "burst": PER_CLIENT}


async def open_from_each(url: str, attempts: int, **kwargs: object) -> dict[str, Counter[int]]:
    results: dict[str, Counter[int]] = {}
    opened = []
    for ip in CLIENTS:
        outcome = await open_many(url, attempts, local_ips=[ip], **kwargs)
        results[ip] = outcome.statuses
        opened += outcome.open
    await close_all(opened)
    return results


async def test_tcp_mode_with_proxy_protocol_v2(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        proxy_protocol={"trusted": ["127.0.0.1/32"]},
        limits={"max_connections_per_backend": 100, "client_connect_rate": CLIENT_RATE},
    )
    # HAProxy's health checks send a LOCAL header, as an NLB's do: no error, no client.
    port, _ = start_haproxy(
        procs, gateway.port, mode="tcp", server_options="send-proxy-v2 check inter 100ms"
    )
    results = await open_from_each(f"ws://127.0.0.1:{port}/", PER_CLIENT + 1)
    for ip in CLIENTS:
        assert results[ip] == Counter({101: PER_CLIENT, 429: 1}), (ip, results)
    await wait_until(lambda: backends[0].stats()["active_connections"] == 0)
    assert backends[0].stats()["peers"] == dict.fromkeys(CLIENTS, PER_CLIENT)
    await access_log_written()
    sessions = [r for r in access_records(gateway) if r.get("kind") == "websocket"]
    seen = Counter((r["client"], r["status"]) for r in sessions)
    for ip in CLIENTS:
        assert seen[(ip, 101)] == PER_CLIENT and seen[(ip, 429)] == 1, seen
    assert not [r for r in sessions if r["client"] == "127.0.0.1"]
    assert metric(gateway, "wsgate_proxy_protocol_errors_total") == 0
    headers = metric(gateway, "wsgate_proxy_protocol_headers_total")
    assert headers >= len(CLIENTS) * (PER_CLIENT + 1)


async def test_http_mode_with_forwardfor_ignores_what_clients_forge(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        trusted_proxies=["127.0.0.1/32"],
        limits={"max_connections_per_backend": 100, "client_connect_rate": CLIENT_RATE},
    )
    port, _ = start_haproxy(procs, gateway.port, mode="http")
    # Every client claims to be 6.6.6.6; HAProxy appends the address it really saw.
    spoof = {"X-Forwarded-For": "6.6.6.6"}
    results = await open_from_each(
        f"ws://127.0.0.1:{port}/", PER_CLIENT + 1, additional_headers=spoof
    )
    for ip in CLIENTS:
        assert results[ip] == Counter({101: PER_CLIENT, 429: 1}), (ip, results)
    # Plain HTTP through HAProxy's keep-alive connections: each request is resolved on its own.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.5", 0))
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        http.get(f"http://127.0.0.1:{port}/hello", headers=spoof) as answer,
    ):
        assert answer.status == 200
    await wait_until(lambda: backends[0].stats()["active_connections"] == 0)
    peers = backends[0].stats()["peers"]
    assert peers == {**dict.fromkeys(CLIENTS, PER_CLIENT), "127.0.0.5": 1}
    await access_log_written()
    clients = Counter(r["client"] for r in access_records(gateway) if "client" in r)
    assert "6.6.6.6" not in clients and "127.0.0.1" not in clients
    assert clients["127.0.0.5"] == 1


async def test_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored(
    procs: ProcessGroup,
) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        trusted_proxies=["127.0.0.1/32"],
        limits={"max_connections_per_backend": 100, "client_connect_rate": CLIENT_RATE},
    )
    # 127.0.0.2 is no proxy of ours: what it says about anyone is not believed.
    forged = [{"X-Forwarded-For": f"203.0.113.{i}"} for i in range(PER_CLIENT + 1)]
    outcomes = await asyncio.gather(
        *(
            open_many(gateway.ws_url, 1, local_ips=["127.0.0.2"], additional_headers=headers)
            for headers in forged
        )
    )
    statuses = sum((o.statuses for o in outcomes), Counter[int]())
    assert statuses == Counter({101: PER_CLIENT, 429: 1})
    await close_all([ws for o in outcomes for ws in o.open])
    await wait_until(lambda: backends[0].stats()["active_connections"] == 0)
    assert backends[0].stats()["peers"] == {"127.0.0.2": PER_CLIENT}
