"""A call's deadline and clock count from when it leaves, not from when it queued. No I/O."""

from __future__ import annotations

from wsgate.admission.redis.script import ScriptCall, delayed


def test_a_queued_call_keeps_its_whole_deadline_share_from_when_it_leaves() -> None:
    call: ScriptCall = ("admit", 5_000_000, "replica", "token", "0")
    assert delayed(call, 0.040) == ("admit", 5_040_000, "replica", "token", "0")


def test_a_call_without_a_deadline_stays_harmless_when_late() -> None:
    call: ScriptCall = ("release", 0, "replica", "token", "b1")
    assert delayed(call, 0.040) == call


def test_a_call_sent_at_once_is_unchanged() -> None:
    call: ScriptCall = ("admit", 5_000_000, "replica", "token", "0")
    assert delayed(call, 0.0) == call
