"""``wsgate load --storm``: a reconnect storm and how long it takes to heal, without I/O.

A storm run holds N sessions, then loses them all at once and measures the time
until all N are open again. The loss is either the load generator's own doing
(it drops every connection without a closing handshake, as a network blip or a
client-side restart would) or a gateway process dying (``--storm-wait``: a pid,
or a name found in the processes' command lines; something else kills it).
While the clients come back, refusals are retried no sooner than their
``Retry-After`` plus jittered, capped backoff, and closed sessions are reopened
after a jittered pause (:mod:`wsgate.testbed.load_plan`), so a storm is the
reconnect behaviour of well-behaved clients.

:class:`Storm` is the run's state machine; the I/O layer calls
:meth:`Storm.observe` every few milliseconds with the counts and whether the
awaited process is gone, and does what it answers (drop every session, stop).
Every phase is bounded by the storm's timeout::

    OPENING --N open--> HOLDING --hold over / process gone--> RECOVERING --N open--> RECOVERED
       |                   |                                      |
       +-------------------+------------- timeout ----------------+--> TIMED_OUT

A process that dies while the sessions are still opening starts the recovery
from there (OPENING --process gone--> RECOVERING).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from wsgate.testbed.report import LoadStats

__all__ = ["Action", "Phase", "Storm", "StormPlan"]


class Phase(Enum):
    OPENING = "opening"  # until all N sessions are open
    HOLDING = "holding"  # all N held: for the hold time, or until the process dies
    RECOVERING = "recovering"  # since the loss, until all N are open again
    RECOVERED = "recovered"
    TIMED_OUT = "timed out"


class Action(Enum):
    NONE = "none"
    DROP = "drop"  # drop every open session now
    STOP = "stop"  # the storm is over: end the run


@dataclass(frozen=True)
class StormPlan:
    """What a storm run does: N sessions, held ``hold`` seconds, each phase bounded."""

    sessions: int
    hold: float = 5.0
    timeout: float = 120.0
    wait_for: str | None = None  # a pid or a process name; None: the load drops itself


@dataclass
class _Counts:
    attempted: int
    rejected: Counter[str]
    reasons: Counter[str]
    failed: Counter[str]
    retry_after: Counter[str]

    @classmethod
    def of(cls, stats: LoadStats) -> _Counts:
        return cls(
            stats.attempted,
            Counter(stats.rejected),
            Counter(stats.rejected_reasons),
            Counter(stats.failed),
            Counter(stats.retry_after),
        )


@dataclass
class Storm:
    """The phases of one storm, with the times (seconds since the run began) they changed."""

    plan: StormPlan
    phase: Phase = Phase.OPENING
    started_at: float = 0.0
    held_at: float | None = None
    dropped_at: float | None = None
    recovered_at: float | None = None
    lowest_open: int | None = None
    timed_out_in: Phase | None = None
    _first_loss_at: float | None = None
    _at_drop: _Counts | None = field(default=None, repr=False)
    _at_end: _Counts | None = field(default=None, repr=False)

    def observe(self, now: float, stats: LoadStats, process_gone: bool = False) -> Action:
        """Advance on what the run sees now; the answer is what the I/O layer must do."""
        phase = self.phase
        if phase in (Phase.RECOVERED, Phase.TIMED_OUT):
            return Action.STOP
        full = stats.open >= self.plan.sessions
        if phase is Phase.OPENING:
            if process_gone and self.plan.wait_for is not None:
                # It died before the clients held all N (a client counts a session
                # once its 101 arrives, after the backend did): the storm is on.
                self._lost(now, now, stats)
                return Action.NONE
            if full:
                self.phase = Phase.HOLDING
                self.held_at = now
                return Action.NONE
            return self._bounded(now, self.started_at, stats)
        if phase is Phase.HOLDING:
            assert self.held_at is not None
            if self.plan.wait_for is None:
                if now - self.held_at >= self.plan.hold:
                    self._lost(now, now, stats)
                    return Action.DROP
                return Action.NONE
            # A killed gateway's clients may notice before its pid is seen gone.
            if not full and self._first_loss_at is None:
                self._first_loss_at = now
            elif full:
                self._first_loss_at = None
            if process_gone:
                self._lost(now, self._first_loss_at or now, stats)
                return Action.NONE
            return self._bounded(now, self.held_at, stats)
        assert self.dropped_at is not None and self.lowest_open is not None
        self.lowest_open = min(self.lowest_open, stats.open)
        # Full again after at least one session was seen lost: the storm is over.
        if full and self.lowest_open < self.plan.sessions:
            self.phase = Phase.RECOVERED
            self.recovered_at = now
            self._at_end = _Counts.of(stats)
            return Action.STOP
        return self._bounded(now, self.dropped_at, stats)

    def _lost(self, now: float, since: float, stats: LoadStats) -> None:
        self.phase = Phase.RECOVERING
        self.dropped_at = since
        self.lowest_open = stats.open
        self._at_drop = _Counts.of(stats)

    def _bounded(self, now: float, since: float, stats: LoadStats) -> Action:
        if now - since <= self.plan.timeout:
            return Action.NONE
        self.timed_out_in = self.phase
        self.phase = Phase.TIMED_OUT
        self._at_end = _Counts.of(stats)
        return Action.STOP

    @property
    def recovery_s(self) -> float | None:
        if self.recovered_at is None or self.dropped_at is None:
            return None
        return self.recovered_at - self.dropped_at

    def report(self, stats: LoadStats) -> dict[str, Any]:
        """The report's ``storm`` section: the phases' times and what the recovery met."""
        before = self._at_drop
        after = self._at_end or _Counts.of(stats)

        def since_drop(field_name: str) -> dict[str, int]:
            if before is None:
                return {}
            grown = getattr(after, field_name) - getattr(before, field_name)
            return dict(sorted(grown.items()))

        rejected = since_drop("rejected")
        recovery = self.recovery_s
        return {
            "sessions": self.plan.sessions,
            "trigger": f"process {self.plan.wait_for} died"
            if self.plan.wait_for
            else "the load dropped its sessions",
            "outcome": self.phase.value
            + (f" while {self.timed_out_in.value}" if self.timed_out_in else ""),
            "held_at_s": _round(self.held_at),
            "dropped_at_s": _round(self.dropped_at),
            "recovered_at_s": _round(self.recovered_at),
            "recovery_s": _round(recovery),
            "dropped": self.plan.sessions - self.lowest_open if self.lowest_open is not None else 0,
            "attempts": after.attempted - before.attempted if before else 0,
            "rejected": sum(rejected.values()),
            "rejected_by_status": rejected,
            "rejected_by_reason": since_drop("reasons"),
            "failed": since_drop("failed"),
            "retry_after_s": since_drop("retry_after"),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
