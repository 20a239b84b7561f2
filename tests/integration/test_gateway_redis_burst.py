"""Hundreds of admissions in flight at once on the Redis store: all decided, none refused."""

from __future__ import annotations

from collections import Counter

from gwtools import close_all, open_many

from wsgate.testbed.processes import ProcessGroup, RedisServer
from wsgate.testbed.topology import start_backends, start_gateway


async def test_a_burst_beyond_the_client_pool_size_is_admitted(
    procs: ProcessGroup, redis_server: RedisServer
) -> None:
    # redis-py's pool holds 100 connections; a store that took one per call in
    # flight answered the 101st with 503 state_unavailable.
    backends = start_backends(procs, 2)
    # What is tested is the client's pool, not Redis's latency: on a shared 2-core
    # machine one batch of 150+ calls, read between 300 handshakes on the same
    # cores, can take longer than the default 100 ms bound, which then (rightly)
    # refuses with state_unavailable.
    state = {"store": redis_server.url, "timeout": "1s"}
    gateway = start_gateway(
        procs, backends, state=state, limits={"max_connections_per_backend": 1000}
    )
    outcome = await open_many(gateway.ws_url, 300, local_ips=[f"127.0.0.{i}" for i in range(2, 12)])
    try:
        assert outcome.statuses == Counter({101: 300}), outcome.bodies[:3]
        assert sum(b.stats()["active_connections"] for b in backends) == 300
    finally:
        await close_all(outcome.open)
