"""One gateway on the memory store: caps, connect rate, balancing, affinity, health, leaks.

Every check counts at the far side: the backends' own ``/stats`` (their live
sessions, their peak, the sessions their tripwire refused) and what clients got.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
from gwtools import (
    assert_capacity_free,
    close_all,
    open_many,
    open_one,
    pod_of,
    wait_until,
)
from websockets.asyncio.client import ClientConnection

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import BackendProcess, start_backends, start_gateway


@pytest.fixture
def four(procs: ProcessGroup) -> list[BackendProcess]:
    return start_backends(procs, 4, tripwire=2)


async def test_cap_holds_exactly_and_frees_exactly(
    procs: ProcessGroup, four: list[BackendProcess]
) -> None:
    gateway = start_gateway(procs, four, limits={"max_connections_per_backend": 2})
    first = await open_many(gateway.ws_url, 20)
    try:
        assert first.statuses == Counter({101: 8, 503: 12})
        assert len(first.retry_after) == 12 and min(first.retry_after) >= 1
        assert all(body["error"] == "no_capacity" for body in first.bodies)
        stats = [b.stats() for b in four]
        assert [s["active_connections"] for s in stats] == [2, 2, 2, 2]
        assert max(s["peak_connections"] for s in stats) == 2
        assert sum(s["refused"] for s in stats) == 0

        await close_all(first.open[:3])
        await wait_until(lambda: sum(b.stats()["active_connections"] for b in four) == 5)
        second = await open_many(gateway.ws_url, 10)
        assert second.statuses == Counter({101: 3, 503: 7})
        assert [b.stats()["active_connections"] for b in four] == [2, 2, 2, 2]
        assert max(b.stats()["peak_connections"] for b in four) == 2
        await close_all(second.open)
    finally:
        await close_all(first.open)
    await assert_capacity_free(gateway, four, 2)


async def test_connect_rate_admits_the_burst_then_one_per_second(
    procs: ProcessGroup,
) -> None:
    backends = start_backends(procs, 2)
    gateway = start_gateway(
        procs,
        backends,
        limits={"max_connections_per_backend": 100, "connect_rate": {"per_second": 1, "burst": 10}},
    )
    burst = await open_many(gateway.ws_url, 20)
    try:
        assert burst.statuses == Counter({101: 10, 429: 10})
        assert min(burst.retry_after) >= 1
        assert {body["error"] for body in burst.bodies} == {"rate_limited"}
        assert sum(b.stats()["total_connections"] for b in backends) == 10
        await asyncio.sleep(1.1)
        later = await open_many(gateway.ws_url, 2)
        assert later.statuses == Counter({101: 1, 429: 1})
        await close_all(later.open)
    finally:
        await close_all(burst.open)


async def test_client_rate_is_per_ip(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs,
        backends,
        limits={
            "max_connections_per_backend": 100,
            "client_connect_rate": {"per_second": 0.1, "burst": 2},
        },
    )
    a = await open_many(gateway.ws_url, 4, local_ips=["127.0.0.2"])
    b = await open_many(gateway.ws_url, 4, local_ips=["127.0.0.3"])
    try:
        assert a.statuses == Counter({101: 2, 429: 2})
        assert b.statuses == Counter({101: 2, 429: 2})
        assert {body["error"] for body in a.bodies} == {"client_rate_limited"}
        peers = backends[0].stats()["peers"]
        assert peers.get("127.0.0.2") == 2 and peers.get("127.0.0.3") == 2
    finally:
        await close_all(a.open + b.open)


async def test_least_conn_and_round_robin_spread(
    procs: ProcessGroup, four: list[BackendProcess]
) -> None:
    for policy in ("least_conn", "round_robin"):
        gateway = start_gateway(
            procs,
            four,
            name=f"gw-{policy}",
            balance=policy,
            limits={"max_connections_per_backend": 10},
        )
        conns = [await open_one(gateway.ws_url) for _ in range(8)]
        try:
            pods = Counter([await pod_of(ws) for ws in conns])
            assert sorted(pods.values()) == [2, 2, 2, 2], (policy, pods)
            assert [b.stats()["active_connections"] for b in four] == [2, 2, 2, 2]
        finally:
            await close_all(conns)
        await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in four))
        gateway.process.stop()


async def test_ip_affinity_sticks_and_falls_back_when_full(procs: ProcessGroup) -> None:
    four = start_backends(procs, 4, tripwire=3)
    gateway = start_gateway(
        procs, four, affinity={"by": "ip"}, limits={"max_connections_per_backend": 3}
    )
    opened = []
    try:
        homes: dict[str, str] = {}
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"):
            ws = await open_one(gateway.ws_url, ip)
            opened.append(ws)
            homes[ip] = await pod_of(ws)
        # Each client comes back to its own backend.
        for ip, home in homes.items():
            ws = await open_one(gateway.ws_url, ip)
            opened.append(ws)
            pod = await pod_of(ws)
            if Counter(homes.values())[home] == 1:
                assert pod == home
        # Fill one client's home; its next connection must land elsewhere, not fail.
        ip, home = next(iter(homes.items()))
        home_backend = next(b for b in four if b.pod_id == home)
        while home_backend.stats()["active_connections"] < 3:
            opened.append(await open_one(gateway.ws_url, ip))
        ws = await open_one(gateway.ws_url, ip)
        opened.append(ws)
        assert await pod_of(ws) != home
        assert max(b.stats()["peak_connections"] for b in four) <= 3
    finally:
        await close_all(opened)


async def test_cookie_affinity_sticks_and_ignores_forged_values(procs: ProcessGroup) -> None:
    four = start_backends(procs, 4, tripwire=3)
    gateway = start_gateway(
        procs,
        four,
        balance="round_robin",
        affinity={"by": "cookie", "cookie": "wsgate_backend"},
        limits={"max_connections_per_backend": 3},
    )
    first = await open_one(gateway.ws_url)
    try:
        cookie_header = first.response.headers["Set-Cookie"]
        token = cookie_header.split(";")[0].split("=", 1)[1]
        home = await pod_of(first)
        again = [
            await open_one(gateway.ws_url, additional_headers={"Cookie": f"wsgate_backend={token}"})
            for _ in range(2)
        ]
        assert [await pod_of(ws) for ws in again] == [home, home]
        # The home is now full (3): the next one falls back and gets a new cookie.
        moved = await open_one(
            gateway.ws_url, additional_headers={"Cookie": f"wsgate_backend={token}"}
        )
        assert await pod_of(moved) != home
        assert "Set-Cookie" in moved.response.headers
        forged = await open_one(
            gateway.ws_url, additional_headers={"Cookie": "wsgate_backend=nope"}
        )
        assert "Set-Cookie" in forged.response.headers
        await close_all([*again, moved, forged])
    finally:
        await first.close()


async def test_unhealthy_backend_leaves_rotation_and_returns(procs: ProcessGroup) -> None:
    four = start_backends(procs, 4)
    gateway = start_gateway(
        procs,
        four,
        balance="round_robin",
        limits={"max_connections_per_backend": 10},
        health={
            "interval": "100ms",
            "timeout": "500ms",
            "unhealthy_threshold": 2,
            "healthy_threshold": 2,
        },
    )
    sick = four[1]
    sick.set_health(False)
    await asyncio.sleep(0.6)
    conns = [await open_one(gateway.ws_url) for _ in range(6)]
    try:
        pods = Counter([await pod_of(ws) for ws in conns])
        assert sick.pod_id not in pods
        assert sick.stats()["total_connections"] == 0
        sick.set_health(True)
        await asyncio.sleep(0.6)
        more = [await open_one(gateway.ws_url) for _ in range(8)]
        conns += more
        assert sick.pod_id in {await pod_of(ws) for ws in more}
    finally:
        await close_all(conns)


async def test_all_unhealthy_answers_no_healthy_backend(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(
        procs, backends, health={"interval": "100ms", "timeout": "500ms", "unhealthy_threshold": 1}
    )
    backends[0].set_health(False)
    await asyncio.sleep(0.5)
    outcome = await open_many(gateway.ws_url, 1)
    assert outcome.statuses == Counter({503: 1})
    assert outcome.bodies[0]["error"] == "no_healthy_backend"


async def test_backend_killed_mid_session_frees_its_slots(
    procs: ProcessGroup, four: list[BackendProcess]
) -> None:
    gateway = start_gateway(
        procs, four, limits={"max_connections_per_backend": 2}, health={"interval": "5s"}
    )
    outcome = await open_many(gateway.ws_url, 8)
    assert outcome.statuses[101] == 8
    victim = four[0]
    victim.process.kill()
    # The sessions on the dead backend end at the client too.
    victims = [ws for ws in outcome.open if await _pod_or_none(ws) == victim.pod_id]
    assert len(victims) == 0 or all(ws.close_code is not None for ws in victims)
    await close_all(outcome.open)
    # The survivors' capacity is whole again, and the dead backend's slots are free:
    # a restarted backend on the same port is filled to its cap.
    survivors = four[1:]
    await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in survivors))
    again = await open_many(gateway.ws_url, 6)
    try:
        assert again.statuses[101] == 6
        assert [b.stats()["active_connections"] for b in survivors] == [2, 2, 2]
    finally:
        await close_all(again.open)


async def _pod_or_none(ws: ClientConnection) -> str | None:
    try:
        return await asyncio.wait_for(pod_of(ws), 2)
    except Exception:
        return None


async def test_vanished_client_frees_its_slot(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1, tripwire=1)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": 1})
    ws = await open_one(gateway.ws_url)
    # Vanish: drop the TCP connection with no close frame.
    ws.transport.abort()
    await wait_until(lambda: backends[0].stats()["active_connections"] == 0)
    started = time.monotonic()
    again = await open_one(gateway.ws_url)
    assert await pod_of(again) == "pod-a"
    assert time.monotonic() - started < 2
    await again.close()
    assert backends[0].stats()["refused"] == 0


async def test_queue_waits_for_a_slot_in_order_then_times_out(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1, tripwire=1)
    gateway = start_gateway(
        procs,
        backends,
        limits={"max_connections_per_backend": 1, "queue": {"max": 2, "timeout": "1500ms"}},
    )
    holder = await open_one(gateway.ws_url)
    waiter = asyncio.create_task(open_one(gateway.ws_url))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # queued, not refused
    # One more fits the queue (max 2) behind the waiter; one more does not.
    behind = asyncio.create_task(open_many(gateway.ws_url, 1))
    await asyncio.sleep(0.2)
    over = await open_many(gateway.ws_url, 1)
    assert over.statuses == Counter({503: 1})
    await holder.close()
    queued = await asyncio.wait_for(waiter, 5)  # the first in line gets the freed slot
    assert await pod_of(queued) == "pod-a"
    overflow = await behind  # the second in line gives up at the queue timeout
    assert overflow.statuses == Counter({503: 1})
    # Whoever else waited gave up at the queue timeout with 503 no_capacity.
    assert all(body["error"] == "no_capacity" for body in overflow.bodies)
    assert backends[0].stats()["refused"] == 0
    await queued.close()
    await close_all(overflow.open)


async def test_access_log_has_one_json_line_per_connection(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, limits={"max_connections_per_backend": 1})
    ws = await open_one(gateway.ws_url, additional_headers={"X-Request-Id": "trace-me"})
    await ws.send(b"x" * 1000)
    await ws.recv()
    refused = await open_many(gateway.ws_url, 1)
    await ws.close()
    await wait_until(lambda: '"request_id":"trace-me"' in gateway.process.output())
    # The access log is JSON lines on stdout; the other logs are plain text on stderr.
    lines = [
        json.loads(line) for line in gateway.process.output().splitlines() if line.startswith("{")
    ]
    session = next(line for line in lines if line.get("request_id") == "trace-me")
    assert session["kind"] == "websocket" and session["backend"] == "pod-a"
    assert session["status"] == 101 and session["duration"] > 0
    assert session["bytes_in"] >= 1000 and session["bytes_out"] >= 1000
    assert session["client"] == "127.0.0.1"
    reject = next(line for line in lines if line.get("status") == 503)
    assert reject["outcome"] == "no_capacity"
    assert refused.statuses[503] == 1
