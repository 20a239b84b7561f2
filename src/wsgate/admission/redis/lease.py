"""The replica's lease: renewed every ``lease_ttl / 3``, re-registered after any doubt."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping

from wsgate.admission.redis import script
from wsgate.admission.redis.connection import StateUnavailable
from wsgate.admission.redis.pipeline import ScriptCaller
from wsgate.admission.redis.sync import Registration, ReplicaSync, SyncState

__all__ = ["LeaseKeeper"]

logger = logging.getLogger("wsgate.state")


class LeaseKeeper:
    """Renews the lease and re-registers the truth. A re-registration carries
    the caps of the backends it holds slots of (``caps_for``), by which Redis
    judges the excess; ``excess`` hears of backends found over their cap."""

    def __init__(
        self,
        caller: ScriptCaller,
        sync: ReplicaSync,
        replica_id: str,
        rates: script.RateArgs,
        caps_for: Callable[[Mapping[str, int]], Mapping[str, int]],
        excess: Callable[[Mapping[str, int]], None],
        *,
        clients: Callable[[], Mapping[str, int]] = dict,
        presence: Callable[[], tuple[str, float]] = lambda: ("", 0.0),
    ):
        self.rates = rates
        self._clients = clients  # the truth per client, sent along with the held truth
        # The connection the others may watch us by ("" for none), and how long
        # we promise to say we live again within.
        self._presence = presence
        self._caller = caller
        self._sync = sync
        self._replica_id = replica_id
        self._caps_for = caps_for
        self._excess = excess
        self._renew_every = sync.lease_ttl / 3
        self.retry_every = min(self._renew_every, 1.0)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """Try again now (the sync was just lost)."""
        self._wake.set()

    def start(self) -> None:
        self._wake.clear()  # a wake before the start is answered by the caller's refresh
        self._task = asyncio.create_task(self._run(), name="wsgate-lease")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> None:
        """One renewal, or a re-registration when the replica is out of sync."""
        async with self._lock:
            sync = self._sync
            if sync.state is SyncState.CLOSED or self._caller.client is None:
                return
            sync.check_lease(time.monotonic())
            if sync.in_sync:
                await self._renew()
            if not sync.in_sync:
                await self._register()

    async def _run(self) -> None:
        while self._sync.state is not SyncState.CLOSED:
            delay = self._renew_every if self._sync.in_sync else self.retry_every
            if self._sync.state is SyncState.SETTLING:  # register again as the wait ends
                delay = max(0.01, min(delay, self._sync.settle_until - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            try:
                await self.refresh()
            except Exception:  # the lease must outlive any surprise
                logger.exception("lease renewal failed unexpectedly")
            self._wake.clear()

    async def _renew(self) -> None:
        sync, caller = self._sync, self._caller
        sent = time.monotonic()
        presence, alive_for = self._presence()
        quiet = caller.in_flight == 0
        seq = caller.next_call  # the renewal's place; no other call started if it stays last
        call = script.renew_call(
            0,
            self._replica_id,
            sync.token,
            self._ttl_ms(),
            self.rates,
            {},
            epoch=sync.epoch,
            presence=presence,
            alive_for=alive_for,
        )
        try:
            raw = await caller.call(call)
        except StateUnavailable as error:
            sync.failed(str(error))
            return
        quiet = quiet and caller.in_flight == 0 and caller.started == seq
        reply = script.decode_renew(raw)
        self._log_reaped(reply)
        sync.renewed(reply, sent, time.monotonic(), quiet=quiet, seq=seq)

    async def _register(self) -> None:
        """Send this replica's truth with a new token, until Redis has exactly it."""
        sync = self._sync
        for _attempt in range(3):
            if not await self._caller.wait_idle():
                return
            truth = sync.truth()
            token = secrets.token_hex(8)
            presence, alive_for = self._presence()
            sent = time.monotonic()
            call = script.renew_call(
                sync.deadline(sent),
                self._replica_id,
                sync.token,
                self._ttl_ms(),
                self.rates,
                self._caps_for(truth),
                register=(token, truth),
                epoch=sync.epoch,
                clients=self._clients(),
                presence=presence,
                alive_for=alive_for,
            )
            seq = self._caller.next_call
            try:
                raw = await self._caller.call(call)
            except StateUnavailable as error:
                sync.failed(str(error))
                return
            reply = script.decode_renew(raw)
            self._log_reaped(reply)
            outcome = sync.registered(reply, token, truth, sent, time.monotonic(), seq=seq)
            if outcome is Registration.DONE:
                self._excess(reply.excess)
            if outcome is not Registration.AGAIN:
                return

    def _ttl_ms(self) -> int:
        return max(1, round(self._sync.lease_ttl * 1000))

    @staticmethod
    def _log_reaped(reply: script.RenewReply) -> None:
        if reply.reaped:
            logger.info("lease expired for %s: their slots are free again", ", ".join(reply.reaped))
