"""The state script's calls: typed arguments in, typed replies out. No I/O.

Each operation of ``state.lua`` takes a flat ARGV and answers a flat array;
this module is the one place that knows their layout (the script's comments
above each operation say the same). Everything else speaks in the named
tuples below.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from enum import StrEnum
from importlib import resources
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from wsgate.admission.contract import Limits
from wsgate.config import RateConfig

__all__ = [
    "BATCH_ARGS",
    "BATCH_MOST",
    "SCRIPT",
    "SCRIPT_SHA",
    "AdmitReply",
    "AdmitStatus",
    "Arg",
    "PoolUpdate",
    "RateArgs",
    "ReleaseReply",
    "RenewReply",
    "RenewStatus",
    "ScriptCall",
    "admit_call",
    "alive_call",
    "batch_call",
    "batches_of",
    "close_tokens_call",
    "decode_admit",
    "decode_release",
    "decode_renew",
    "delayed",
    "depart_call",
    "evalsha",
    "key_prefix",
    "leave_call",
    "presence_key",
    "rate_args",
    "release_call",
    "renew_call",
    "run_script",
]

SCRIPT = resources.files("wsgate.admission.redis").joinpath("state.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()

Arg = str | int | float
#: One call of the script: its ARGV (operation, deadline, then the operation's own).
ScriptCall = tuple[Arg, ...]


def delayed(call: ScriptCall, waited: float) -> ScriptCall:
    """``call`` as it leaves after waiting ``waited`` seconds in this replica's queue.

    A deadline counts from when the call leaves, like the caller's clock: a call
    that waited behind the batch in flight has had no chance to reach Redis yet.
    A call without a deadline (0: harmless when late) is left as it is.
    """
    deadline = call[1]
    if not isinstance(deadline, int) or deadline <= 0 or waited <= 0:
        return call
    return (call[0], deadline + round(waited * 1e6), *call[2:])


#: Calls per batch at most: one run of the script holds Redis for all of them.
BATCH_MOST = 64
#: Arguments per batch at most (a call with a whole pool in it can carry thousands).
BATCH_ARGS = 16_384


def batches_of(calls: Sequence[ScriptCall]) -> list[list[ScriptCall]]:
    """``calls`` in order, cut into batches within ``BATCH_MOST`` and ``BATCH_ARGS``.

    A call larger than ``BATCH_ARGS`` on its own makes a batch of its own.
    """
    batches: list[list[ScriptCall]] = []
    current: list[ScriptCall] = []
    size = 0
    for call in calls:
        if current and (len(current) == BATCH_MOST or size + len(call) + 1 > BATCH_ARGS):
            batches.append(current)
            current, size = [], 0
        current.append(call)
        size += len(call) + 1
    if current:
        batches.append(current)
    return batches


def batch_call(calls: Sequence[ScriptCall]) -> ScriptCall:
    """One call of the script that runs ``calls`` in order; its reply is theirs, in order.

    Each keeps its own ARGV (and so its own deadline); the script's set-up and
    the command's own cost are paid once for all of them.
    """
    flat: list[Arg] = ["batch", len(calls)]
    for call in calls:
        flat.append(len(call))
        flat.extend(call)
    return tuple(flat)


def key_prefix(namespace: str) -> str:
    """The hash tag every key of a namespace starts with (one Cluster slot)."""
    return "{wsgate:" + namespace + "}"


def replicas_key(namespace: str) -> str:
    """The script's one declared key; it derives every other name from it."""
    return key_prefix(namespace) + ":replicas"


def presence_key(namespace: str) -> str:
    """Which connection each replica holds open to be watched by (read by the others)."""
    return key_prefix(namespace) + ":presence"


async def evalsha(client: aioredis.Redis, key: str, call: ScriptCall) -> Any:
    """EVALSHA the state script, loading it once when Redis does not know it."""
    try:
        return await client.evalsha(SCRIPT_SHA, 1, key, *call)
    except NoScriptError:
        await client.script_load(SCRIPT)
        return await client.evalsha(SCRIPT_SHA, 1, key, *call)


async def run_script(client: aioredis.Redis, namespace: str, *call: Arg) -> Any:
    """One call of the script in ``namespace`` (``wsgate state`` reads this way)."""
    return await evalsha(client, replicas_key(namespace), call)


# -- arguments --------------------------------------------------------------------------------


class RateArgs(NamedTuple):
    """The connect-rate limits as the script takes them (0 0 for none)."""

    per_second: str
    burst: str
    client_per_second: str
    client_burst: str


def _rate(rate: RateConfig | None) -> tuple[str, str]:
    return ("0", "0") if rate is None else (repr(rate.per_second), str(rate.burst))


def rate_args(limits: Limits) -> RateArgs:
    return RateArgs(*_rate(limits.connect_rate), *_rate(limits.client_connect_rate))


class PoolUpdate(NamedTuple):
    """What changed in a replica's pool since ``base``, the version Redis last
    acknowledged: (backend, cap, position) entries, cap 0 for one that left.
    With ``reset`` the entries are the whole pool."""

    base: str
    version: str
    reset: bool
    entries: Sequence[tuple[str, int, int]]


def admit_call(
    deadline: int,
    replica: str,
    token: str,
    pool: PoolUpdate,
    rates: RateArgs,
    *,
    client_key: str | None,
    least_loaded: bool,
    first: Sequence[str],
    exclude: Collection[str],
    client_cap: int | None = None,
) -> ScriptCall:
    call: list[Arg] = [
        "admit",
        deadline,
        replica,
        token,
        "1" if least_loaded else "0",
        rates.per_second,
        rates.burst,
        client_key or "",
        rates.client_per_second,
        rates.client_burst,
        client_cap or 0,
        pool.base,
        pool.version,
        "1" if pool.reset else "0",
        len(pool.entries),
    ]
    for backend, cap, position in pool.entries:
        call += (backend, cap, position)
    call.append(len(first))
    call += first
    call.append(len(exclude))
    call += exclude
    return tuple(call)


def release_call(replica: str, token: str, backend: str, client: str | None = None) -> ScriptCall:
    """``client``: the client the slot counted for (max_connections_per_client), if any."""
    # A release is harmless when late: it carries no deadline.
    return ("release", 0, replica, token, backend, client or "")


def renew_call(
    deadline: int,
    replica: str,
    token: str,
    ttl_ms: int,
    rates: RateArgs,
    caps: Mapping[str, int],
    *,
    register: tuple[str, Mapping[str, int]] | None = None,
    clients: Mapping[str, int] | None = None,
    epoch: str = "",
    presence: str = "",
    alive_for: float = 0.0,
) -> ScriptCall:
    """A renewal; with ``register`` (new token, held truth), a re-registration, which
    also sends ``clients``, the connections held per client (max_connections_per_client).

    ``epoch`` is the one this replica last saw ("" if none): another one in
    Redis means it lost its data since. ``presence`` names the connection the
    replica holds open for the others to watch ("run_id:client_id", "" for none);
    ``alive_for``: the seconds within which it says it lives again (no departure
    reaps it before).
    """
    new_token, held = register if register is not None else ("", {})
    call: list[Arg] = [
        "renew",
        deadline,
        replica,
        token,
        ttl_ms,
        "0" if register is None else "1",
        new_token,
    ]
    call.append(len(held))
    for backend, count in held.items():
        call += [backend, count]
    call.append(len(caps))
    for backend, cap in caps.items():
        call += [backend, cap]
    call += rates
    call.append(epoch)
    call.append(presence)
    call.append(max(0, round(alive_for * 1000)))
    if register is not None and clients:
        call.append(len(clients))
        for client, count in clients.items():
            call += [client, count]
    return tuple(call)


def leave_call(replica: str, token: str) -> ScriptCall:
    return ("leave", 0, replica, token)


def alive_call(replica: str, token: str, quiet: float) -> ScriptCall:
    """``replica`` lives, and says so again within ``quiet`` seconds: no departure
    reaps it until then."""
    return ("alive", 0, replica, token, max(0, round(quiet * 1000)))


def depart_call(replica: str, presence: str) -> ScriptCall:
    """Reap ``replica`` now: the connection ``presence`` names was found closed
    (void while it is within the while it last said it lives for)."""
    return ("depart", 0, replica, presence)


def close_tokens_call(per_second: float, burst: int, want: int) -> ScriptCall:
    return ("close_tokens", 0, repr(per_second), burst, want)


# -- replies ----------------------------------------------------------------------------------


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def pairs(flat: Sequence[Any]) -> dict[str, int]:
    """A flat ``[field, count, ...]`` reply (HGETALL) as a dict."""
    return {text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}


class AdmitStatus(StrEnum):
    OK = "ok"
    NO_CAPACITY = "no_capacity"
    RATE_LIMITED = "rate_limited"
    CLIENT_RATE_LIMITED = "client_rate_limited"
    CLIENT_CONNECTION_LIMIT = "client_connection_limit"
    STALE = "stale"  # token refused or lease expired: out of sync
    LATE = "late"  # ran after its deadline: void
    POOL = "pool"  # Redis holds another version of the pool: send it whole


class AdmitReply(NamedTuple):
    status: AdmitStatus
    backend: str  # the admitted backend ("" unless OK)
    retry_after: float  # seconds, for the rate refusals
    rate_offset: float  # seconds until the global bucket is full again
    live_replicas: int
    total: int  # the admitted backend's global count after the decision
    pool_version: str  # the version of this replica's pool Redis holds now


def decode_admit(raw: Sequence[Any]) -> AdmitReply:
    status = AdmitStatus(text(raw[0]))
    if len(raw) == 1:
        return AdmitReply(status, "", 0.0, 0.0, 1, 0, "")
    if status is AdmitStatus.POOL:
        return AdmitReply(status, "", 0.0, 0.0, 1, 0, text(raw[1]))
    return AdmitReply(
        status,
        text(raw[1]),
        float(raw[2]) / 1e6,
        float(raw[3]) / 1e6,
        int(raw[4]),
        int(raw[5]),
        text(raw[6]),
    )


class ReleaseReply(NamedTuple):
    stale: bool
    total: int  # the backend's global count after the release


def decode_release(raw: Sequence[Any]) -> ReleaseReply:
    return ReleaseReply(text(raw[0]) == "stale", int(raw[1]))


class RenewStatus(StrEnum):
    OK = "ok"
    LOST = "lost"  # the session token is gone: register again
    LATE = "late"  # a re-registration that ran after its deadline: void


class RenewReply(NamedTuple):
    status: RenewStatus
    live_replicas: int
    rate_offset: float  # seconds
    totals: dict[str, int]  # every backend's global count (empty unless OK)
    excess: dict[str, int]  # re-registration only: backends over their cap, by how much
    reaped: list[str]  # replicas whose lease expired in this call
    held: dict[str, int]  # what Redis holds for this replica
    server_time: float  # Redis's clock, seconds
    epoch: str  # when Redis's data set began ("" if not told)
    settling: float  # seconds left of the wait after a loss of data (0 if none)


def decode_renew(raw: Sequence[Any]) -> RenewReply:
    status = RenewStatus(text(raw[0]))
    if status is RenewStatus.LATE:
        return RenewReply(status, 1, 0.0, {}, {}, [], {}, 0.0, "", 0.0)
    return RenewReply(
        status,
        max(1, int(raw[1])),
        float(raw[2]) / 1e6,
        pairs(raw[3]),
        pairs(raw[4]),
        [text(name) for name in raw[5]],
        pairs(raw[6]),
        float(raw[7]) / 1e6,
        text(raw[8]),
        int(raw[9]) / 1000,
    )
