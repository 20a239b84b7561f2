"""Departures: a replica whose process ended gives its slots back in about a second.

A lease is what keeps a replica's slots counted while it cannot renew; it has
to outlast any outage the replica should ride out, so it is long (15 s by
default). A process that crashed, or was killed, is not riding anything out,
and the lease makes its clients wait for slots nobody holds. This module tells
the two apart by what the Redis server sees.

THEORY OF OPERATION
===================

Each replica holds one connection to Redis open that it uses for nothing else
(the *holder*) and names it, ``run_id:client_id``, in every renewal: the
script keeps the names in ``P:presence``. When the process ends, on a host that
stays up, its kernel closes that connection and the server drops the client
at once. When instead the network between the replica and Redis fails, or the
process is frozen, nothing reaches the server: the client stays in its list
and the lease decides, as before.

Every ``interval`` each replica's *watcher*, on a connection of its own, first
says its replica lives (the script's ``alive``, with its token: ``P:seen``),
then reads the server's ``run_id``, the names in ``P:presence`` that carry it,
and asks the server which of those clients it still has (``CLIENT LIST ID``).
For each one gone it calls the script's ``depart``, which reaps that replica
as an expired lease would, only if ``P:presence`` still holds the name that
was found gone (a replica that came back has named another connection) and
the while the replica last said it lives for is over: each says it will be
heard from again within ``quiet`` (two of its intervals and a quarter of a
second), so a crash is seen within about three intervals.

Why it does not reap the living:

* A name is judged only on the server whose ``run_id`` it carries: after a
  restart or a failover client ids start again on another server, so every
  name is left alone until its replica renews and names its connection there.
* The holder carries no call that can time out: a slow Redis never makes a
  replica close it. It sends ``CLIENT ID`` every ``interval``, which keeps
  idle-connection timeouts of NATs and load balancers from cutting it and
  tells the replica at once when it was reconnected (then it renews now, with
  the new name).
* A living replica whose held connection was reset (a NAT, a proxy) still
  says it lives on the watcher's connection, so it is not reaped while its
  holder connects again and names the new connection.
* If a living replica is reaped anyway (both its connections failed and it
  could not say it lives for ``quiet``), it is the case a lease already
  covers: its next call finds its token gone, it registers its truth again,
  and any backend that is over its cap sheds the excess.

While a replica found gone waits out its ``quiet``, its slots are about to
come back: a refusal for capacity then tells the client to retry once they
are due (``retry_hint``), not after the configured ``Retry-After`` (one
decided just before they came back is told to retry at once), and makes the
watcher look at once rather than at its next interval (at most five times an
interval), so that the clients of a crashed replica, who all arrive in the
first moments, hear it too.

``wsgate`` stays correct without any of this (Redis Cluster, or a server that
refuses ``CLIENT``): the watcher logs why once and the leases do the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, RedisError, ResponseError
from redis.typing import EncodableT

from wsgate.admission.redis import script

__all__ = ["Presence", "client_ids", "departed", "judged", "refused_for_good", "run_id_of"]

logger = logging.getLogger("wsgate.state")

#: The hint for a refusal that raced a reap: the slots are back now.
AT_ONCE = 1.0


def run_id_of(info: object) -> str:
    """The ``run_id`` from an ``INFO server`` reply (parsed or raw)."""
    if isinstance(info, dict):
        return str(info.get("run_id", ""))
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line.partition(":")[2].strip()
    return ""


def client_ids(listing: object) -> set[str]:
    """The client ids in a ``CLIENT LIST`` reply (parsed by redis-py, or raw)."""
    if isinstance(listing, list):
        return {str(entry["id"]) for entry in listing if isinstance(entry, dict) and "id" in entry}
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    ids = set()
    for line in text.splitlines():
        field = line.split(" ", 1)[0]
        if field.startswith("id="):
            ids.add(field[3:])
    return ids


def judged(names: dict[str, str], run_id: str, *, me: str) -> dict[str, str]:
    """The names a watcher on the server ``run_id`` may judge.

    ``names``: replica -> "run_id:client_id" as ``P:presence`` holds them. A
    name of another server is never judged (its client ids are not this
    server's), and neither is the watcher's own replica.
    """
    chosen = {}
    for replica, name in names.items():
        server, _, client = name.partition(":")
        if replica != me and run_id and server == run_id and client:
            chosen[replica] = name
    return chosen


def departed(names: dict[str, str], listed: set[str]) -> dict[str, str]:
    """Of the ``judged`` names, those whose client the server no longer lists."""
    return {
        replica: name for replica, name in names.items() if name.partition(":")[2] not in listed
    }


def refused_for_good(error: ResponseError) -> bool:
    """Whether the server refuses the command itself (renamed, or not for this
    user), rather than answering from a passing state (READONLY after a failover,
    a script error): only then are departures given up."""
    text = str(error).lower()
    return (
        isinstance(error, NoPermissionError)
        or "unknown command" in text
        or "unknown subcommand" in text
    )


class Presence:
    """This replica's holder connection, and its watch over everyone else's.

    Args:
        connect: makes a client to the store's Redis (one per connection kept).
        namespace: the state's namespace.
        replica_id: this replica.
        interval: seconds between two looks at the others (and two keep-alives).
        timeout: seconds one look may take.
        renamed: called when the holder's name changed: renew now, with it.
        token: the replica's session token while it is in sync, else "".
    """

    def __init__(
        self,
        connect: Callable[[], aioredis.Redis],
        namespace: str,
        replica_id: str,
        *,
        interval: float,
        timeout: float,
        renamed: Callable[[], None],
        token: Callable[[], str],
    ):
        self._connect = connect
        self._namespace = namespace
        self._replica_id = replica_id
        self.interval = interval
        self._timeout = timeout
        self._renamed = renamed
        self._token = token
        #: How long after saying it lives this replica may not be reaped for
        #: its connection's closing: two looks missed, and some slack.
        self.quiet = 2 * interval + 0.25
        #: "run_id:client_id" of the holder, "" while it has none.
        self.name = ""
        self.departures_total = 0
        #: When the replicas last found gone will have been reaped (monotonic), or 0.
        self.departing_by = 0.0
        #: When this watcher last gave a gone replica's slots back (monotonic), or 0.
        self.reaped_at = 0.0
        self._wake = asyncio.Event()  # look now: a refusal may be a departure's
        self._tasks: list[asyncio.Task[None]] = []
        self._refused = False  # the server refused a command the watch needs
        self._first_look = asyncio.Event()  # the holder has tried once

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._hold(), name="wsgate-presence-hold"),
            asyncio.create_task(self._watch(), name="wsgate-presence-watch"),
        ]

    async def named(self, within: float) -> str:
        """The holder's name once it has tried to get one (at most ``within`` seconds)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._first_look.wait()
        return self.name

    def retry_hint(self, asked: float, now: float) -> float | None:
        """Seconds until a gone replica's slots are back, for a refusal asked at ``asked``.

        A refusal asked before the last reap may have been decided before the
        slots it gave back were free, and its answer arrives after: in a
        storm many are in flight at that moment, and each is told to come
        back at once (a second: ``Retry-After``'s least), not in the
        configured while.
        """
        if self.reaped_at > asked:
            return AT_ONCE
        left = self.departing_by - now
        return left if left > 0 else None

    def look_soon(self) -> None:
        """Look at the others now, not at the next interval (a refusal asks)."""
        self._wake.set()

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.name = ""

    # -- the holder ------------------------------------------------------------------

    async def _hold(self) -> None:
        client = self._connect()
        try:
            while True:
                try:
                    # No timeout: a slow Redis must not make us drop the one
                    # connection whose closing tells the others we are gone.
                    run_id = run_id_of(await client.info("server"))
                    client_id = await client.client_id()
                    name = f"{run_id}:{int(client_id)}" if run_id else ""
                except ResponseError as error:
                    if refused_for_good(error):
                        self._refuse(error)
                        return
                    name = ""
                except (RedisError, OSError):
                    name = ""  # reconnects on the next round
                if name != self.name:
                    self.name = name
                    self._renamed()
                self._first_look.set()
                await asyncio.sleep(self.interval)
        finally:
            self.name = ""
            self._first_look.set()
            with contextlib.suppress(Exception):
                await client.aclose()

    # -- the watch -------------------------------------------------------------------

    async def _watch(self) -> None:
        client = self._connect()
        try:
            while True:
                # At most five looks an interval, however many refusals ask.
                await asyncio.sleep(self.interval / 5)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval * 4 / 5):
                        await self._wake.wait()
                self._wake.clear()
                try:
                    async with asyncio.timeout(self._timeout):
                        await self._look(client)
                except ResponseError as error:
                    if refused_for_good(error):
                        self._refuse(error)
                        return
                except (RedisError, OSError, TimeoutError):
                    pass  # Redis is away: the leases and the sync deal with that
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _look(self, client: aioredis.Redis) -> None:
        started = time.monotonic()
        key = script.replicas_key(self._namespace)
        token = self._token()
        if token:
            call = script.alive_call(self._replica_id, token, self.quiet)
            await script.evalsha(client, key, call)
        run_id = run_id_of(await client.info("server"))
        raw = await client.hgetall(script.presence_key(self._namespace))
        names = {script.text(k): script.text(v) for k, v in raw.items()}
        watched = judged(names, run_id, me=self._replica_id)
        if not watched:
            self.departing_by = 0.0
            return
        ids: list[EncodableT] = [name.partition(":")[2] for name in watched.values()]
        listed = client_ids(await client.client_list(client_id=ids))
        due = 0.0
        for replica, name in departed(watched, listed).items():
            if await script.evalsha(client, key, script.depart_call(replica, name)):
                self.departures_total += 1
                self.reaped_at = time.monotonic()
                logger.info(
                    "replica %s closed its connection to Redis: its slots are free again",
                    replica,
                )
            else:
                # Still within the while it last said it lives for (at most
                # ``quiet`` from now): reaped by the first look after that.
                due = started + self.quiet + self.interval
        self.departing_by = due

    def _refuse(self, error: ResponseError) -> None:
        if not self._refused:
            self._refused = True
            logger.warning(
                "Redis refused a command departures need (%s): a replica that ends "
                "gives its slots back when its lease expires",
                error,
            )
