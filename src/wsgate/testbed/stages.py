"""``wsgate load --stages``: how many sessions a run holds at each moment, without I/O.

A schedule is a list of stages, each a duration and a target number of
concurrent sessions, written as k6 writes its ramping stages:
``30s:1000,1m:1000,10s:0`` ramps from 0 to 1,000 sessions over 30 s, holds
1,000 for a minute and ramps down to none in 10 s. Within a stage the target
moves linearly from the previous stage's target (0 before the first) to its
own; a stage of the same target holds it. The load generator asks
:meth:`Schedule.target_at` as the run goes and opens or closes sessions to
match; sessions still trying to connect count towards the target, as k6
counts a virtual user that waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wsgate.config import ConfigError, format_duration, parse_duration

__all__ = ["Schedule", "Stage", "parse_stages"]

# Bounds a typo cannot get past: a day of stages, a million sessions.
_MAX_TOTAL_SECONDS = 86_400.0
_MAX_TARGET = 1_000_000


@dataclass(frozen=True)
class Stage:
    """Move to ``target`` concurrent sessions over ``duration`` seconds."""

    duration: float
    target: int

    def __str__(self) -> str:
        return f"{format_duration(self.duration)}:{self.target}"


@dataclass(frozen=True)
class Schedule:
    """The stages of a run, and the target they set at any moment."""

    stages: tuple[Stage, ...]

    @property
    def duration(self) -> float:
        return math.fsum(stage.duration for stage in self.stages)

    @property
    def peak(self) -> int:
        return max(stage.target for stage in self.stages)

    def target_at(self, elapsed: float) -> int:
        """The number of sessions wanted ``elapsed`` seconds into the run."""
        start = 0
        begun = 0.0
        for stage in self.stages:
            if elapsed < begun + stage.duration:
                share = (elapsed - begun) / stage.duration if elapsed > begun else 0.0
                return round(start + (stage.target - start) * share)
            begun += stage.duration
            start = stage.target
        return start

    def __str__(self) -> str:
        return ",".join(map(str, self.stages))


def parse_stages(text: str) -> Schedule:
    """``30s:1000,1m:1000,10s:0`` as a :class:`Schedule`.

    Raises:
        ConfigError: one line naming the stage that is wrong and how to write it.
    """
    stages: list[Stage] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        duration_text, sep, target_text = part.partition(":")
        hint = "write DURATION:TARGET stages like 30s:1000,1m:1000,10s:0"
        if not sep:
            raise ConfigError(f"--stages: {part!r} has no target; {hint}")
        try:
            duration = parse_duration(duration_text.strip())
        except ValueError as error:
            raise ConfigError(f"--stages: {part!r}: {error}; {hint}") from None
        target_text = target_text.strip()
        if not target_text.isdigit():
            raise ConfigError(f"--stages: {part!r}: the target must be a whole number; {hint}")
        target = int(target_text)
        if duration <= 0:
            raise ConfigError(f"--stages: {part!r}: a stage lasts more than 0s")
        if target > _MAX_TARGET:
            raise ConfigError(f"--stages: {part!r}: at most {_MAX_TARGET} sessions")
        stages.append(Stage(duration, target))
    if not stages:
        raise ConfigError("--stages: no stage given; write stages like 30s:1000,1m:1000,10s:0")
    schedule = Schedule(tuple(stages))
    if schedule.duration > _MAX_TOTAL_SECONDS:
        raise ConfigError("--stages: the stages last more than a day")
    if schedule.peak == 0:
        raise ConfigError("--stages: every target is 0, so no session would open")
    return schedule
