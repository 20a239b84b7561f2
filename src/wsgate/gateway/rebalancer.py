"""Moving and ending long-lived sessions: the rebalance plan, max duration, excess.

Sessions last long, so a backend added or healed late would stay idle while
the old ones stay full. Each round the :class:`Rebalancer` closes the sessions
past ``max_connection_duration`` and this replica's share of the moves the
plan (:mod:`wsgate.upstreams.rebalance`) asks for, within a close budget that
all replicas share through the store. Clients reconnect and are admitted
anew, to the emptier backends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Iterable

from wsgate.admission import AdmissionStore
from wsgate.config import Config
from wsgate.gateway.outcomes import CloseReason
from wsgate.gateway.session import Session
from wsgate.upstreams.pool import BackendPool
from wsgate.upstreams.rebalance import ArrivalEstimate, local_share, plan_moves, spread
from wsgate.wire import CloseCode

__all__ = ["RECONNECT_WINDOW", "Rebalancer"]

log = logging.getLogger("wsgate.rebalance")

# A client closed by the rebalancer counts as on its way back this long (see ArrivalEstimate).
RECONNECT_WINDOW = 10.0


class Rebalancer:
    def __init__(
        self, config: Config, store: AdmissionStore, pool: BackendPool, sessions: Iterable[Session]
    ):
        self.config = config  # a reload replaces it
        self.store = store
        self.pool = pool
        self.sessions = sessions  # the live sessions on this pool's backends
        self.draining = False
        self._arrivals = ArrivalEstimate(RECONNECT_WINDOW)

    async def run(self) -> None:
        """Rounds until cancelled, every ``rebalance.interval`` (jittered)."""
        while True:
            interval = max(self.config.rebalance.interval, 0.05)
            # Jittered, so replicas seldom plan from the same counts at the same moment.
            await asyncio.sleep(interval * random.uniform(0.75, 1.25))
            if self.draining:
                continue
            try:
                await self.close_due_sessions()
            except Exception:
                log.exception("rebalancing failed; trying again next round")

    async def close_due_sessions(self) -> int:
        """One round: close sessions past max_connection_duration, and the sessions the
        rebalance plan gives this replica, within the shared close budget.

        Returns how many sessions were asked to close.
        """
        config = self.config
        rebalance = config.rebalance
        expired: list[Session] = []
        limit = config.max_connection_duration
        if limit:
            now = time.monotonic()
            expired = [
                s
                for s in self.sessions
                if not s.closing_code and now - s.started >= limit * s.duration_factor
            ]
            expired.sort(key=lambda s: s.started)
        moving = await self._plan() if rebalance.enabled else []
        due = set(expired)
        wanted = expired + [s for s in moving if s not in due]
        if not wanted:
            return 0
        granted = await self.store.acquire_close_tokens(rebalance.rate, len(wanted))
        closed: Counter[str] = Counter()
        for session in wanted[:granted]:
            reason = CloseReason.MAX_DURATION if session in due else CloseReason.REBALANCE
            if session.close_gracefully(rebalance.close_code, reason):
                closed[f"{reason} on {session.backend.id}"] += 1
        if closed:
            log.info(
                "closing %s with %d (%d wanted, budget %g/s for all replicas)",
                ", ".join(f"{n} for {what}" for what, n in sorted(closed.items())),
                rebalance.close_code, len(wanted), rebalance.rate,
            )  # fmt: skip
        return sum(closed.values())

    async def _plan(self) -> list[Session]:
        """This replica's sessions to move now, most loaded backend and oldest first."""
        now = asyncio.get_running_loop().time
        max_skew = self.config.rebalance.max_skew
        caps = {c.backend_id: c.cap for c in self.pool.candidates()}
        counts = self.store.global_counts()
        if len(caps) < 2 or spread(counts, caps) <= max_skew:
            self._arrivals.observe(now(), sum(counts.values()))
            return []
        # The plan must come from counts as fresh as the store can give.
        await self.store.refresh()
        counts = self.store.global_counts()
        mine: dict[str, list[Session]] = {}
        closing: Counter[str] = Counter()
        for session in self.sessions:
            if session.closing_code:
                closing[session.backend.id] += 1
            else:
                mine.setdefault(session.backend.id, []).append(session)
        # Sessions already closing are gone for the plan, and on their way back.
        arriving = self._arrivals.observe(now(), sum(counts.values()))
        arriving += sum(closing.values())
        visible = {b: max(0, n - closing[b]) for b, n in counts.items()}
        moves = plan_moves(visible, caps, max_skew, arriving=arriving)
        share = local_share(
            moves,
            visible,
            {b: len(sessions) for b, sessions in mine.items()},
            tail=lambda p: random.random() < p,
        )
        chosen: list[Session] = []
        loads = {b: visible.get(b, 0) / caps[b] for b in share if b in caps}
        for backend_id in sorted(share, key=lambda b: -loads.get(b, 0.0)):
            oldest = sorted(mine[backend_id], key=lambda s: s.started)
            chosen.extend(oldest[: share[backend_id]])
        return chosen

    def close_excess(self, backend_id: str, count: int) -> None:
        """The shared state found this replica over a cap: close its newest sessions there."""
        backend = self.pool.get(backend_id)
        if backend is None:
            return
        newest = sorted(backend.connections, key=lambda s: s.started, reverse=True)
        for session in newest[:count]:
            session.close_gracefully(CloseCode.TRY_AGAIN_LATER, CloseReason.EXCESS)
