"""What steers a WebSocket run over time: ``--stages`` and ``--storm``.

Each is a small loop over a pure rule: :class:`~wsgate.testbed.stages.Schedule`
says how many sessions to hold now, :class:`~wsgate.testbed.storm.Storm` says
when to drop them and when the storm is over. The loops only read the clock,
look at the awaited process, act on the sessions and end the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from wsgate.testbed.load_ws import WebSocketLoad
from wsgate.testbed.processes import process_alive
from wsgate.testbed.stages import Schedule
from wsgate.testbed.storm import Action, Phase, Storm

__all__ = ["follow_stages", "run_storm"]

log = logging.getLogger("wsgate.load")

# Often enough that a ramp of thousands of sessions a second moves smoothly.
_STAGE_TICK = 0.1
# The storm's clock: its recovery time is known to about this much.
_STORM_TICK = 0.02
# Samples kept after the storm, so the plot shows the sessions settled.
_AFTER_STORM = 1.0


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def follow_stages(
    load: WebSocketLoad, schedule: Schedule, stop: asyncio.Event, started: float
) -> None:
    """Hold the schedule's target of sessions until its last stage ends, then end the run."""
    while not stop.is_set():
        elapsed = time.monotonic() - started
        target = schedule.target_at(elapsed)
        load.stats.target = target
        load.resize(target)
        if elapsed >= schedule.duration:
            break
        await _sleep(stop, _STAGE_TICK)
    stop.set()


async def run_storm(
    load: WebSocketLoad, storm: Storm, stop: asyncio.Event, started: float, watched: list[int]
) -> None:
    """Drive ``storm`` to its end: drop the sessions when it says so, then end the run.

    ``watched`` are the pids of the process a ``--storm-wait`` run waits for.
    """
    while not stop.is_set():
        gone = bool(watched) and not all(process_alive(pid) for pid in watched)
        before = storm.phase
        action = storm.observe(time.monotonic() - started, load.stats, gone)
        if storm.phase is Phase.HOLDING and before is not Phase.HOLDING:
            log.warning("Storm: all %d sessions open", storm.plan.sessions)
        if action is Action.DROP:
            log.warning("Storm: dropping %d sessions at once", load.drop_all())
        elif action is Action.STOP:
            break
        await _sleep(stop, _STORM_TICK)
    await _sleep(stop, _AFTER_STORM)
    stop.set()
