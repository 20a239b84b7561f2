"""The connection to Redis: commands packed in C, no retries, no hidden timeouts."""

from __future__ import annotations

from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

__all__ = ["HiredisPackingConnection", "StateUnavailable", "connect", "describe_failure"]


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


def connect(url: str, timeout: float) -> aioredis.Redis:
    """A client that never retries; callers bound each call with ``asyncio.timeout``.

    redis-py's own ``socket_timeout`` is off on purpose: it runs each write under
    ``asyncio.wait_for``, which on Python 3.11 can swallow a cancellation that
    arrives as the write completes, and a cancelled admission must stay cancelled.
    """
    return aioredis.Redis.from_url(
        url,
        socket_timeout=None,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        connection_class=HiredisPackingConnection,
    )
