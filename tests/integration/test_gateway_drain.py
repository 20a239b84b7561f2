"""Graceful drain on SIGTERM, seen from the clients, the backends and the shared state.

While the gateway drains: ``/ready`` answers 503, nobody new gets in, every
WebSocket client receives a close frame with 1001 before the process exits,
an HTTP request already in flight gets its whole answer, and the slots held
in Redis come back to what the backends really hold.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from gwtools import close_all, open_many, raw_request, wait_until
from lifecycle import close_seen, exited, ready_status, started

from wsgate.admission.redis import key_prefix
from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import start_backends, start_gateway

SLOW_REQUEST = b"GET /slow?min=2&max=2 HTTP/1.1\r\nHost: test\r\n\r\n"


@pytest.mark.slow
async def test_sigterm_closes_every_session_with_1001_and_finishes_requests(
    procs: ProcessGroup,
) -> None:
    backends = start_backends(procs, 2)
    gateway = started(
        start_gateway(
            procs, backends, drain_timeout="10s", limits={"max_connections_per_backend": 5}
        )
    )
    sessions = (await open_many(gateway.ws_url, 4)).open
    assert len(sessions) == 4
    closes = [asyncio.create_task(close_seen(ws)) for ws in sessions]
    slow = asyncio.create_task(raw_request("127.0.0.1", gateway.port, SLOW_REQUEST))
    await wait_until(lambda: sum(b.stats()["http_in_flight"] for b in backends) == 1)
    assert ready_status(gateway) == 200

    gateway.process.signal(signal.SIGTERM)
    await wait_until(lambda: ready_status(gateway) == 503, within=2)
    # The listener is closed: a new client is not let in.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", gateway.port)

    results = await asyncio.gather(*closes)
    assert [(code, reason) for _, code, reason in results] == [(1001, "drain")] * 4
    # The request in flight keeps the drain going, and gets its whole answer.
    assert ready_status(gateway) == 503
    status, headers, body = await slow
    assert status == 200 and headers.get("connection") == "close" and body
    exit_time, code = await exited(gateway, within=10)
    assert code == 0
    assert max(when for when, _, _ in results) < exit_time
    # The backends saw their side closed, not cut: nothing is left open there.
    await wait_until(lambda: all(b.stats()["active_connections"] == 0 for b in backends))
    assert all(b.stats()["http_in_flight"] == 0 for b in backends)
    output = gateway.process.output()
    assert "drained in" in output
    assert output.count('"outcome":"closed_drain"') == 4


@pytest.mark.slow
async def test_drain_timeout_cuts_what_is_left(procs: ProcessGroup) -> None:
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, drain_timeout="1s")
    slow = asyncio.create_task(
        raw_request(
            "127.0.0.1",
            gateway.port,
            b"GET /slow?min=30&max=30 HTTP/1.1\r\nHost: test\r\n\r\n",
            read_timeout=15,
        )
    )
    await wait_until(lambda: backends[0].stats()["http_in_flight"] == 1)
    started = time.monotonic()
    gateway.process.signal(signal.SIGTERM)
    _, code = await exited(gateway, within=8)
    assert code == 0
    assert time.monotonic() - started < 5
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError)):
        await slow
    assert "drain stopped after" in gateway.process.output()


@pytest.mark.slow
async def test_drain_with_redis_gives_every_slot_back(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    import redis

    backends = start_backends(procs, 2)
    shared = {
        "state": {"store": redis_server.url, "namespace": "drain", "lease_ttl": "3s"},
        "drain_timeout": "10s",
        "limits": {"max_connections_per_backend": 4},
    }
    leaving = start_gateway(procs, backends, name="leaving", **shared)
    staying = start_gateway(procs, backends, name="staying", **shared)
    gone = (await open_many(leaving.ws_url, 5)).open
    kept = (await open_many(staying.ws_url, 2)).open
    client = redis.Redis.from_url(redis_server.url)
    total_key = f"{key_prefix('drain')}:total"

    def shared_total() -> int:
        return sum(int(v) for v in client.hgetall(total_key).values())

    try:
        assert len(gone) == 5 and len(kept) == 2
        assert shared_total() == 7
        closes = [asyncio.create_task(close_seen(ws)) for ws in gone]
        leaving.process.signal(signal.SIGTERM)
        results = await asyncio.gather(*closes)
        assert [code for _, code, _ in results] == [1001] * 5
        exit_time, code = await exited(leaving, within=10)
        assert code == 0 and max(when for when, _, _ in results) < exit_time
        # At once, not after a lease expires: the drained replica gave its slots back.
        assert shared_total() == 2
        assert sum(b.stats()["active_connections"] for b in backends) == 2
        # The other replica can fill the capacity again, exactly.
        more = await open_many(staying.ws_url, 7)
        assert more.statuses[101] == 6 and more.statuses[503] == 1
        assert shared_total() == 8
        await close_all(more.open)
    finally:
        await close_all(kept)
        client.close()
    await wait_until(lambda: shared_total() == 0)
