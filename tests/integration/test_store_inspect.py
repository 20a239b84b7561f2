"""``wsgate state`` against a real redis-server that real RedisStore replicas use."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
from fleet import presence

from wsgate.admission import Admitted, Candidate, Limits
from wsgate.admission.redis import RedisStore
from wsgate.config import RateConfig
from wsgate.testbed.processes import RedisServer, free_port, wsgate_argv

LIMITS = Limits(
    connect_rate=RateConfig(per_second=1, burst=10),
    # Slow enough that a client's bucket (kept until it is full again, 20 s) outlives
    # the start of the `wsgate state` command on a busy machine.
    client_connect_rate=RateConfig(per_second=0.05, burst=2),
)
PODS = [Candidate("10.0.0.1:8080", 2), Candidate("10.0.0.2:8080", 2)]

pytestmark = pytest.mark.redis


@pytest.fixture
async def two_gateways(redis_server: RedisServer) -> AsyncIterator[list[RedisStore]]:
    stores = [
        RedisStore(
            redis_server.url,
            namespace="shown",
            replica_id=name,
            lease_ttl=15.0,
            timeout=2.0,
            limits=LIMITS,
        )
        for name in ("gw-a", "gw-b")
    ]
    for store in stores:
        await store.start()
    for i in range(3):
        decision = await stores[i % 2].admit(PODS, client_key=f"127.0.0.{i + 2}")
        assert isinstance(decision, Admitted)
    for store in stores:
        await store.refresh()  # publishes the caps and limits
    yield stores
    for store in stores:
        await store.close()


def backends_held_by(state: dict[str, object]) -> dict[str, dict[str, int]]:
    """Backends held by more than one replica, with who holds what."""
    backends = state["backends"]
    assert isinstance(backends, list)
    return {b["id"]: b["held_by"] for b in backends if len(b["held_by"]) > 1}


async def wsgate_state(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *wsgate_argv("state", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "120"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_json_shows_replicas_counts_caps_and_rate(
    two_gateways: list[RedisStore], redis_server: RedisServer
) -> None:
    started = time.monotonic()
    code, out, err = await wsgate_state(
        "--redis", redis_server.url, "--namespace", "shown", "--json"
    )
    # The bucket refills at 1/s while the command starts (seconds on a busy machine).
    refilled = time.monotonic() - started + 0.5
    assert code == 0, err
    state = json.loads(out)
    assert [r["id"] for r in state["replicas"]] == ["gw-a", "gw-b"]
    for replica in state["replicas"]:
        assert 0 <= replica["lease_age"] < 5
        assert 10 < replica["expires_in"] <= 15
    assert state["replicas"][0]["held"] == {"10.0.0.1:8080": 1, "10.0.0.2:8080": 1}
    assert state["replicas"][1]["held"] == {"10.0.0.1:8080": 1}
    assert backends_held_by(state) == {"10.0.0.1:8080": {"gw-a": 1, "gw-b": 1}}
    backends = {b["id"]: b for b in state["backends"]}
    assert backends["10.0.0.1:8080"]["live"] == 2
    assert backends["10.0.0.1:8080"]["cap"] == 2
    assert backends["10.0.0.2:8080"]["live"] == 1
    assert not any(b["over_cap"] for b in state["backends"])
    assert state["rate"]["per_second"] == 1 and state["rate"]["burst"] == 10
    assert 7 <= state["rate"]["tokens"] <= 7 + refilled  # 3 spent just before
    assert state["client_rate"]["buckets"] == 3
    assert state["totals"] == {
        "replicas": 2, "backends": 2, "live": 3, "capacity": 4, "held": 3, "clients": 0,
    }  # fmt: skip
    # Each is watched by the connection it named, which the server has.
    named = presence(redis_server, "shown")
    for replica in state["replicas"]:
        connection = replica["connection"]
        assert connection["name"] == named[replica["id"]] and connection["open"] is True
        assert 0 <= connection["quiet_for"] <= 2 * 0.5 + 0.25  # says it lives for this long


async def test_table_shows_the_same(
    two_gateways: list[RedisStore], redis_server: RedisServer
) -> None:
    code, out, err = await wsgate_state("--redis", redis_server.url, "--namespace", "shown")
    assert code == 0, err
    assert "2 replicas" in out and "3/4 slots in use" in out
    assert "gw-a" in out and "gw-b" in out
    assert "10.0.0.1:8080" in out and "2 / 2" in out and "1 / 2" in out
    assert "connect rate:" in out and "of 10 tokens" in out


async def test_a_replica_whose_connections_closed_is_shown_so(redis_server: RedisServer) -> None:
    """Nobody else watches it here, so it stays named until its lease runs out."""
    store = RedisStore(
        redis_server.url, namespace="alone", replica_id="gw-gone", lease_ttl=15.0, timeout=2.0
    )
    await store.start()
    named = presence(redis_server, "alone")["gw-gone"]
    await store.abandon()  # its connections close, as a process's do when it ends
    code, out, err = await wsgate_state(
        "--redis", redis_server.url, "--namespace", "alone", "--json"
    )
    assert code == 0, err
    [replica] = json.loads(out)["replicas"]
    assert replica["connection"]["name"] == named and replica["connection"]["open"] is False
    code, out, err = await wsgate_state("--redis", redis_server.url, "--namespace", "alone")
    assert code == 0, err
    assert "gw-gone" in out and "closed" in out


async def test_an_unused_namespace_says_so(redis_server: RedisServer) -> None:
    code, out, _ = await wsgate_state("--redis", redis_server.url, "--namespace", "nobody")
    assert code == 0
    assert "nothing registered in namespace 'nobody'" in out


async def test_unreachable_redis_is_one_line_and_exit_2() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, out, err = await wsgate_state("--redis", url, "--timeout", "500ms")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"wsgate state: error: cannot read the state from {url}")


async def test_bad_flags_are_usage_errors() -> None:
    code, _, err = await wsgate_state("--redis", "http://x", "--namespace", "a")
    assert code == 2 and "--redis" in err
    code, _, err = await wsgate_state("--namespace", "no spaces")
    assert code == 2 and "--namespace" in err


async def test_watch_json_prints_one_line_per_refresh_until_interrupted(
    two_gateways: list[RedisStore], redis_server: RedisServer
) -> None:
    process = await asyncio.create_subprocess_exec(
        *wsgate_argv(
            "state",
            *("--redis", redis_server.url, "--namespace", "shown"),
            *("--watch", "--json", "--interval", "100ms"),
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    lines = []
    try:
        for _ in range(3):
            line = await asyncio.wait_for(process.stdout.readline(), 15)
            lines.append(json.loads(line))
        decision = await two_gateways[0].admit(PODS)
        assert isinstance(decision, Admitted)
        for _ in range(20):
            latest = json.loads(await asyncio.wait_for(process.stdout.readline(), 5))
            if latest["totals"]["live"] == 4:
                break
        else:
            raise AssertionError("the watch never showed the new slot")
    finally:
        process.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(process.wait(), 10)
    assert all(line["totals"]["live"] == 3 for line in lines)
    assert code == 130


async def test_routes_each_show_their_own_state(
    redis_server: RedisServer, tmp_path: object
) -> None:
    """Each route's state lives in a namespace of its own (its own hash tag)."""
    from pathlib import Path

    from wsgate.routing import route_namespace

    stores = {
        route: RedisStore(
            redis_server.url,
            namespace=route_namespace("rt", route),
            replica_id="gw-a",
            lease_ttl=15.0,
            timeout=2.0,
        )
        for route in ("default", "chat")
    }
    for store in stores.values():
        await store.start()
    try:
        for pods, store in ((PODS, stores["default"]), (PODS[:1], stores["chat"])):
            decision = await store.admit(pods, client_key="127.0.0.2")
            assert isinstance(decision, Admitted)
            await store.refresh()
        code, out, err = await wsgate_state(
            "--redis", redis_server.url, "--namespace", "rt", "--route", "default",
            "--route", "chat", "--json",
        )  # fmt: skip
        assert code == 0, err
        routes = json.loads(out)["routes"]
        assert [(r["route"], r["namespace"]) for r in routes] == [
            ("default", "rt"), ("chat", "rt:chat"),
        ]  # fmt: skip
        assert [r["totals"]["live"] for r in routes] == [1, 1]

        config = Path(str(tmp_path)) / "wsgate.yaml"
        config.write_text(
            f"state: {{store: '{redis_server.url}', namespace: rt}}\n"
            "backends: [10.0.0.1:8080]\n"
            "routes: [{name: chat, match: {path_prefix: /chat}}]\n"
        )
        code, out, err = await wsgate_state("-c", str(config))
        assert code == 0, err
        assert "route default  namespace rt " in out and "route chat  namespace rt:chat " in out
    finally:
        for store in stores.values():
            await store.close()
