"""Deadlines behind one timer, on a clock the test moves: when each callback runs,
which never do, and that one timer at most is ever armed."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.gateway.deadlines import Deadlines


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The two things Deadlines asks of its loop, on a clock that moves when told."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, Callable[[], None], Handle]] = []
        self._made = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        handle = Handle()
        self._made += 1
        heapq.heappush(self._timers, (self.now + delay, self._made, callback, handle))
        return handle

    @property
    def armed(self) -> int:
        return sum(1 for *_, handle in self._timers if not handle.cancelled)

    def advance(self, until: float, armed_at_most: int = 1) -> None:
        """Run every timer due by ``until``, in order, with the clock at its time."""
        while self._timers and self._timers[0][0] <= until:
            assert self.armed <= armed_at_most
            when, _, callback, handle = heapq.heappop(self._timers)
            if not handle.cancelled:
                self.now = when
                callback()
        self.now = until


def deadlines(delay: float) -> tuple[Clock, Deadlines, list[tuple[str, float]]]:
    clock = Clock()
    ran: list[tuple[str, float]] = []
    return clock, Deadlines(clock, delay), ran  # type: ignore[arg-type]


def recorder(ran: list[tuple[str, float]], clock: Clock, name: str) -> Callable[[], None]:
    return lambda: ran.append((name, clock.now))


def test_each_runs_its_delay_after_it_was_set_in_order_and_not_before() -> None:
    clock, due, ran = deadlines(1.0)
    due.set("a", recorder(ran, clock, "a"))
    clock.advance(0.4)
    due.set("b", recorder(ran, clock, "b"))
    clock.advance(0.99)
    assert ran == []
    clock.advance(1.0)
    assert ran == [("a", 1.0)]
    clock.advance(5.0)
    assert ran == [("a", 1.0), ("b", 1.4)]
    assert len(due) == 0 and clock.armed == 0  # nothing left: no timer either


def test_a_cancelled_deadline_never_runs_and_the_others_still_do() -> None:
    clock, due, ran = deadlines(1.0)
    for name in "abc":
        due.set(name, recorder(ran, clock, name))
        clock.advance(clock.now + 0.1)
    due.cancel("a")
    due.cancel("b")
    due.cancel("nobody")
    clock.advance(10)
    assert ran == [("c", pytest.approx(1.2))]


def test_a_deadline_set_by_a_callback_runs_after_its_own_delay_on_the_one_timer() -> None:
    clock, due, ran = deadlines(1.0)

    def first() -> None:
        ran.append(("first", clock.now))
        due.set("second", recorder(ran, clock, "second"))

    due.set("first", first)
    clock.advance(10)
    assert ran == [("first", 1.0), ("second", 2.0)]


def test_a_callback_that_raises_leaves_the_rest_to_run() -> None:
    clock, due, ran = deadlines(1.0)

    def broken() -> None:
        raise RuntimeError("a callback's own failure")

    due.set("broken", broken)
    due.set("next", recorder(ran, clock, "next"))
    clock.advance(0.5)
    due.set("later", recorder(ran, clock, "later"))
    with pytest.raises(RuntimeError):
        clock.advance(1.0)  # the event loop would log it and go on
    assert clock.armed == 1  # for "next", due with "broken" and not lost with it
    clock.advance(10)
    assert ran == [("next", 1.0), ("later", 1.5)]


def test_a_new_delay_applies_to_what_is_set_after_it() -> None:
    clock, due, ran = deadlines(2.0)
    due.set("long", recorder(ran, clock, "long"))
    due.delay = 0.5
    due.set("short", recorder(ran, clock, "short"))
    clock.advance(10)
    # The shorter one waits behind the older: late, by no more than the older's delay.
    assert ran == [("long", 2.0), ("short", 2.0)]


def test_closed_deadlines_run_nothing() -> None:
    clock, due, ran = deadlines(1.0)
    due.set("a", recorder(ran, clock, "a"))
    due.close()
    clock.advance(10)
    assert ran == [] and clock.armed == 0


operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 9)),
        st.tuples(st.just("cancel"), st.integers(0, 9)),
        st.tuples(st.just("wait"), st.floats(0.0, 0.7)),
    ),
    max_size=60,
)


@given(operations)
def test_every_deadline_left_runs_once_exactly_its_delay_after_its_last_setting(
    script: list[tuple[str, Any]],
) -> None:
    clock, due, ran = deadlines(0.5)
    expected: dict[str, float] = {}  # key -> when it must run
    done: list[tuple[str, float]] = []
    for action, value in script:
        if action == "wait":
            clock.advance(clock.now + value)
            for key, when in list(expected.items()):
                if when <= clock.now:
                    done.append((key, when))
                    del expected[key]
        elif action == "set":
            key = f"k{value}"
            expected.pop(key, None)  # set again: its old deadline goes
            expected[key] = clock.now + 0.5
            due.set(key, recorder(ran, clock, key))
        else:
            key = f"k{value}"
            expected.pop(key, None)
            due.cancel(key)
    clock.advance(clock.now + 1.0)
    done += list(expected.items())
    ran.sort()
    done.sort()
    assert [name for name, _ in ran] == [name for name, _ in done]
    assert [when for _, when in ran] == pytest.approx([when for _, when in done])
    assert clock.armed == 0
