"""max_connections_per_client in both stores, and shared by replicas through Redis.

The contract tests run against memory and Redis alike; the replica tests use
several RedisStores on one real redis-server, and read Redis itself to show
that no key is left behind for a client with no connection.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from redis import Redis
from test_store_contract import MakeStore, admit_many, backends_of, make_store, pods
from test_store_replicas import NS, MakeReplica, make_replica

from wsgate.admission import Admitted, Limits, Reason, Rejected
from wsgate.admission.redis import key_prefix
from wsgate.config import RateConfig
from wsgate.testbed.processes import RedisServer

__all__ = ["make_replica", "make_store"]  # fixtures, imported to be found

CAP = Limits(max_connections_per_client=2, no_capacity_retry_after=3.0)


async def test_a_client_gets_its_cap_and_no_more(make_store: MakeStore) -> None:
    store = await make_store(CAP)
    mine = await admit_many(store, 3, pods(10), client_key="127.0.0.2")
    assert backends_of(mine) == ["pod-0", "pod-0", None]
    refused = mine[2]
    assert isinstance(refused, Rejected)
    assert refused.reason is Reason.CLIENT_CONNECTION_LIMIT and refused.status == 429
    assert refused.retry_after == 3.0
    # Another client is not held back; a connection without a client key counts for none.
    assert isinstance(await store.admit(pods(10), client_key="127.0.0.3"), Admitted)
    assert isinstance(await store.admit(pods(10)), Admitted)
    assert store.clients_connected() == 2
    # One ends: the client may open one again.
    first = mine[0]
    assert isinstance(first, Admitted)
    await store.release(first.ticket)
    await store.release(first.ticket)  # twice: counted once
    assert isinstance(await store.admit(pods(10), client_key="127.0.0.2"), Admitted)
    assert isinstance(await store.admit(pods(10), client_key="127.0.0.2"), Rejected)


async def test_the_cap_spends_no_token_and_backends_come_first(make_store: MakeStore) -> None:
    store = await make_store(
        Limits(max_connections_per_client=1, connect_rate=RateConfig(per_second=0.01, burst=2))
    )
    assert isinstance(await store.admit(pods(5), client_key="a"), Admitted)
    for decision in await admit_many(store, 3, pods(5), client_key="a"):
        assert isinstance(decision, Rejected)
        assert decision.reason is Reason.CLIENT_CONNECTION_LIMIT
    assert isinstance(await store.admit(pods(5), client_key="b"), Admitted)  # the 2nd token
    last = await store.admit(pods(5), client_key="c")
    assert isinstance(last, Rejected) and last.reason is Reason.RATE_LIMITED
    # With every backend full, the answer is no_capacity, whoever asks.
    full = await make_store(Limits(max_connections_per_client=1))
    assert isinstance(await full.admit(pods(1), client_key="a"), Admitted)
    refused = await full.admit(pods(1), client_key="a")
    assert isinstance(refused, Rejected) and refused.reason is Reason.NO_CAPACITY


def client_keys(server: RedisServer) -> tuple[dict[str, int], list[str]]:
    """The shared per-client counts, and every per-client key of the namespace."""
    prefix = key_prefix(NS)
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        counts = {k: int(v) for k, v in redis.hgetall(f"{prefix}:clients").items()}
        keys = sorted(str(k) for k in redis.scan_iter(match=f"{prefix}:clients*"))
        return counts, keys
    finally:
        redis.close()


@pytest.mark.redis
async def test_replicas_share_one_cap_and_leave_no_keys(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    one = await make_replica(limits=CAP)
    two = await make_replica(limits=CAP)
    first = await one.admit(pods(10), client_key="127.0.0.2")
    second = await two.admit(pods(10), client_key="127.0.0.2")
    assert isinstance(first, Admitted) and isinstance(second, Admitted)
    for store in (one, two):
        refused = await store.admit(pods(10), client_key="127.0.0.2")
        assert isinstance(refused, Rejected)
        assert refused.reason is Reason.CLIENT_CONNECTION_LIMIT
    assert client_keys(redis_server)[0] == {"127.0.0.2": 2}

    # A thousand clients come and go: nothing of them stays in Redis.
    tickets = []
    for i in range(1000):
        decision = await (one if i % 2 else two).admit(
            pods(2000), client_key=f"10.0.{i // 250}.{i}"
        )
        assert isinstance(decision, Admitted)
        tickets.append((one if i % 2 else two, decision.ticket))
    assert len(client_keys(redis_server)[0]) == 1001
    for store, ticket in tickets:
        await store.release(ticket)
    await one.release(first.ticket)
    await two.release(second.ticket)
    counts, keys = client_keys(redis_server)
    assert counts == {} and keys == []


@pytest.mark.redis
async def test_a_dead_replicas_clients_are_freed_with_its_lease(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    ttl = 1.2
    dead = await make_replica(limits=CAP, lease_ttl=ttl)
    alive = await make_replica(limits=CAP, lease_ttl=ttl)
    for _ in range(2):
        assert isinstance(await dead.admit(pods(10), client_key="127.0.0.2"), Admitted)
    assert isinstance(await alive.admit(pods(10), client_key="127.0.0.2"), Rejected)
    await dead.abandon()  # a crash: no release, no goodbye
    deadline = time.monotonic() + 5
    while not isinstance(await alive.admit(pods(10), client_key="127.0.0.2"), Admitted):
        assert time.monotonic() < deadline, "the dead replica's clients were never freed"
        await asyncio.sleep(0.05)
    assert client_keys(redis_server) == (
        {"127.0.0.2": 1},
        [f"{key_prefix(NS)}:clients", f"{key_prefix(NS)}:clients:{alive.replica_id}"],
    )


@pytest.mark.redis
async def test_re_registration_brings_the_clients_back(
    make_replica: MakeReplica, redis_server: RedisServer
) -> None:
    store = await make_replica(limits=CAP, timeout=0.5)
    held = [await store.admit(pods(10), client_key="127.0.0.2") for _ in range(2)]
    assert all(isinstance(d, Admitted) for d in held)
    Redis.from_url(redis_server.url).flushall()  # Redis forgets everything
    await store.refresh()  # the renewal finds the lease lost and re-registers the truth
    await store.refresh()
    assert store.mode == "degraded"  # Redis lost its data: it waits one lease (settling)
    # The passing of that lease, as the script sees it.
    Redis.from_url(redis_server.url).delete(f"{key_prefix(NS)}:settling")
    await store.refresh()
    assert store.mode == "ok"
    assert client_keys(redis_server)[0] == {"127.0.0.2": 2}
    refused = await store.admit(pods(10), client_key="127.0.0.2")
    assert isinstance(refused, Rejected) and refused.reason is Reason.CLIENT_CONNECTION_LIMIT
    for decision in held:
        assert isinstance(decision, Admitted)
        await store.release(decision.ticket)
    assert client_keys(redis_server) == ({}, [])
