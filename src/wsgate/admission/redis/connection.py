"""The connection to Redis: commands packed in C, no retries, no hidden timeouts.

Redis is one server (a URL), a master found through Sentinel, or a Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection
from redis.backoff import NoBackoff

from wsgate.config import StateConfig, parse_address, redact_url

__all__ = [
    "ClusterNodes",
    "HiredisPackingConnection",
    "Sentinels",
    "StateUnavailable",
    "Target",
    "connect",
    "describe_failure",
    "describe_target",
    "state_target",
]


@dataclass(frozen=True)
class Sentinels:
    """A master found through Sentinel: asked for on every new connection."""

    addresses: tuple[tuple[str, int], ...]
    service: str
    password: str | None = None
    sentinel_password: str | None = None


@dataclass(frozen=True)
class ClusterNodes:
    """A Redis Cluster, known by some of its nodes; it tells the rest."""

    addresses: tuple[tuple[str, int], ...]
    password: str | None = None


#: Where the shared state lives: a URL, a Sentinel service, or a Cluster.
Target = str | Sentinels | ClusterNodes


def state_target(state: StateConfig) -> Target:
    """Where the config's ``state`` lives: its URL, its Sentinel service, or its Cluster."""
    if state.sentinels is not None:
        assert state.service is not None  # the config requires it with sentinels
        addresses = tuple(parse_address(a) for a in state.sentinels)
        return Sentinels(addresses, state.service, state.password, state.sentinel_password)
    if state.cluster is not None:
        return ClusterNodes(tuple(parse_address(a) for a in state.cluster), state.password)
    return state.store


def describe_target(target: Target) -> str:
    """The target as status pages show it, without passwords."""
    if isinstance(target, str):
        return redact_url(target)
    nodes = ",".join(f"{host}:{port}" for host, port in target.addresses)
    if isinstance(target, Sentinels):
        return f"sentinel://{nodes}/{target.service}"
    return f"cluster://{nodes}"


class StateUnavailable(Exception):
    """Redis did not answer in time, or answered with an error."""


def describe_failure(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


class HiredisPackingConnection(aioredis.Connection):
    """A TCP connection that packs commands with hiredis (C) instead of Python.

    redis-py's asyncio connections pack every command in Python, and every
    admission and release is a command: on the connection set-up path that
    packing was a tenth of the gateway's CPU. Everything else stays redis-py's.
    (``rediss://`` and ``unix://`` URLs keep redis-py's own connection classes.)
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # "SCRIPT LOAD" and the like are one name in redis-py, two words on the wire.
        if (isinstance(first, str) and " " in first) or (
            isinstance(first, bytes) and b" " in first
        ):
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]


class HiredisSentinelConnection(HiredisPackingConnection, SentinelManagedConnection):
    """A connection to the master Sentinel names now, packing with hiredis.

    redis-py asks the sentinels on every connect, and drops the connection when
    the server answers READONLY (a demoted master): the call fails like any
    other, and the next connection goes to the new master.
    """


def connect(target: Target, timeout: float) -> aioredis.Redis:
    """A client that never retries; callers bound each call with ``asyncio.timeout``.

    redis-py's own ``socket_timeout`` is off on purpose: it runs each write under
    ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that
    arrives as the write completes, and a cancelled admission must stay cancelled.
    """
    if isinstance(target, Sentinels):
        return _sentinel_master(target, timeout)
    if isinstance(target, ClusterNodes):
        return _cluster(target, timeout)  # type: ignore[return-value]
    return aioredis.Redis.from_url(
        target,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        connection_class=HiredisPackingConnection,
    )


def _sentinel_master(target: Sentinels, timeout: float) -> aioredis.Redis:
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8
        list(target.addresses),
        sentinel_kwargs={
            "password": target.sentinel_password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        },
        password=target.password,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    master: aioredis.Redis = sentinel.master_for(
        target.service, connection_class=HiredisSentinelConnection
    )
    return master


def _cluster(target: ClusterNodes, timeout: float) -> RedisCluster:
    """A cluster client: each call goes to the shard of its key's slot.

    MOVED and ASK are followed inside the call (the slot map is refreshed on
    MOVED); a node that does not answer fails the call, and the next one uses
    the refreshed map. No retry hides a failure from the replica's sync.
    """
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.addresses],
        password=target.password,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        cluster_error_retry_attempts=0,
        reinitialize_steps=1,
    )
