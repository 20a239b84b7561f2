"""Script calls made while a batch is out run together: one EVALSHA, each call its own reply.

Against a real redis-server; what left is counted by Redis itself (INFO
commandstats), not by the client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from wsgate.admission.redis.connection import StateUnavailable
from wsgate.admission.redis.pipeline import ScriptPipeline
from wsgate.admission.redis.script import BATCH_MOST, SCRIPT, replicas_key
from wsgate.testbed.processes import RedisServer

INSPECT = ("inspect", 0)  # read-only, harmless when late


async def _evalsha_runs(client: aioredis.Redis) -> int:
    """EVALSHA commands Redis ran (and checks that none failed: no reload hides in them)."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    assert stats.get("failed_calls", 0) == 0, stats
    return int(stats.get("calls", 0))


async def _submit_together(client: aioredis.Redis, calls: list[tuple[Any, ...]]) -> list[Any]:
    """``calls`` made in one go, as a burst of connections makes them; each reply or failure."""
    pipeline = ScriptPipeline(replicas_key("batches"), timeout=5.0)
    sent = [pipeline.submit(client, call) for call in calls]
    return list(await asyncio.gather(*sent, return_exceptions=True))


@pytest.fixture
async def client(redis_server: RedisServer) -> Any:
    connection = aioredis.Redis.from_url(redis_server.url)
    await connection.script_load(SCRIPT)
    await connection.config_resetstat()
    yield connection
    await connection.aclose()


def _is_inspect_reply(reply: Any) -> bool:
    # inspect answers the server time first, then the replicas (none here).
    return isinstance(reply, list) and float(reply[0]) > 0 and reply[1] == []


async def test_calls_made_together_leave_as_one_run_of_the_script(
    client: aioredis.Redis,
) -> None:
    replies = await _submit_together(client, [INSPECT] * 6)
    assert all(_is_inspect_reply(reply) for reply in replies), replies
    assert await _evalsha_runs(client) == 1


async def test_more_calls_than_a_batch_holds_leave_as_several_in_one_pipeline(
    client: aioredis.Redis,
) -> None:
    count = 2 * BATCH_MOST + 3
    replies = await _submit_together(client, [INSPECT] * count)
    assert len(replies) == count and all(_is_inspect_reply(reply) for reply in replies)
    assert await _evalsha_runs(client) == 3


async def test_calls_made_while_a_batch_is_out_leave_after_it_together(
    client: aioredis.Redis,
) -> None:
    pipeline = ScriptPipeline(replicas_key("batches"), timeout=5.0)
    first = pipeline.submit(client, INSPECT)
    await asyncio.sleep(0)  # the first batch is on its way
    await asyncio.sleep(0)
    rest = [pipeline.submit(client, INSPECT) for _ in range(4)]
    replies = await asyncio.gather(first, *rest)
    assert all(_is_inspect_reply(reply) for reply in replies), replies
    assert await _evalsha_runs(client) == 2


async def test_a_call_that_fails_in_a_batch_fails_alone(client: aioredis.Redis) -> None:
    good, bad, after = await _submit_together(client, [INSPECT, ("no_such_op", 0), INSPECT])
    assert _is_inspect_reply(good) and _is_inspect_reply(after)
    assert isinstance(bad, StateUnavailable) and "unknown operation" in str(bad)


async def test_a_call_that_raises_in_a_batch_fails_alone(client: aioredis.Redis) -> None:
    # A release without its arguments makes the script pass nil to Redis: an error
    # raised mid-operation, not an error reply.
    good, bad, after = await _submit_together(client, [INSPECT, ("release", 0), INSPECT])
    assert _is_inspect_reply(good) and _is_inspect_reply(after)
    assert isinstance(bad, StateUnavailable), bad


async def test_a_late_call_in_a_batch_is_void_and_the_others_run(client: aioredis.Redis) -> None:
    # A deadline (server µs) long past: the script answers 'late' and does nothing.
    replies = await _submit_together(client, [INSPECT, ("inspect", 1), INSPECT])
    assert _is_inspect_reply(replies[0]) and _is_inspect_reply(replies[2])
    assert replies[1] == [b"late"]


async def test_a_batch_reloads_a_script_redis_forgot(client: aioredis.Redis) -> None:
    await client.script_flush()
    replies = await _submit_together(client, [INSPECT] * 3)
    assert all(_is_inspect_reply(reply) for reply in replies), replies
    stats = (await client.info("commandstats"))["cmdstat_evalsha"]
    assert (stats["calls"], stats["failed_calls"]) == (2, 1)  # refused once, then run


async def test_batches_share_one_connection_and_one_cut_by_its_timeout_is_not_reused(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    pipeline_client = aioredis.Redis.from_url(redis_server.url)
    pipeline = ScriptPipeline(replicas_key("batches"), timeout=0.2)
    try:
        for _ in range(5):
            assert _is_inspect_reply(await pipeline.submit(pipeline_client, INSPECT))
        stats = await client.info("stats")
        assert (await client.info("clients"))["connected_clients"] == 2  # the test's, the batches'
        await client.execute_command("CLIENT", "PAUSE", 600)  # the next batch's reply comes late
        late = pipeline.submit(pipeline_client, ("inspect", 1))  # Redis would answer 'late'
        with pytest.raises(StateUnavailable):
            await late
        await asyncio.sleep(0.6)
        # Had the cut connection been kept, this would read the reply owed to the one before.
        assert _is_inspect_reply(await pipeline.submit(pipeline_client, INSPECT))
        again = await client.info("stats")
        assert again["total_connections_received"] == stats["total_connections_received"] + 1
    finally:
        pipeline.cancel()
        await pipeline_client.aclose()


async def test_a_pipeline_closed_while_its_batch_is_out_settles_it_and_no_timeout_follows(
    client: aioredis.Redis, redis_server: RedisServer
) -> None:
    pipeline_client = aioredis.Redis.from_url(redis_server.url)
    pipeline = ScriptPipeline(replicas_key("batches"), timeout=0.2)
    try:
        assert _is_inspect_reply(await pipeline.submit(pipeline_client, INSPECT))
        await client.execute_command("CLIENT", "PAUSE", 500)  # its reply is held up
        out = pipeline.submit(pipeline_client, INSPECT)
        await asyncio.sleep(0.05)  # written, waiting
        pipeline.cancel()
        await asyncio.sleep(0.3)  # past the batch's timeout
        # Cancelled as the calls still queued are: neither left waiting nor, had the
        # close been taken for the timer's own cancel, failed as a timeout.
        assert out.cancelled()
    finally:
        pipeline.cancel()
        await pipeline_client.aclose()
