"""``--stages``: the target of concurrent sessions over time (k6's ramping stages)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.config import ConfigError
from wsgate.testbed.stages import Schedule, Stage, parse_stages


def test_the_k6_example() -> None:
    schedule = parse_stages("30s:1000,1m:1000,10s:0")
    assert schedule.stages == (Stage(30.0, 1000), Stage(60.0, 1000), Stage(10.0, 0))
    assert schedule.duration == 100.0
    assert schedule.peak == 1000
    assert str(schedule) == "30s:1000,1m:1000,10s:0"


def test_ramps_linearly_up_holds_and_ramps_down() -> None:
    schedule = parse_stages("10s:100,5s:100,10s:0")
    assert [schedule.target_at(t) for t in (0, 2.5, 5, 10, 12, 15, 17.5, 20, 25, 30)] == [
        0,
        25,
        50,
        100,
        100,
        100,
        75,
        50,
        0,
        0,
    ]


def test_a_stage_starts_from_the_previous_target() -> None:
    schedule = parse_stages("1s:10,2s:30")
    assert schedule.target_at(1.0) == 10
    assert schedule.target_at(2.0) == 20
    assert schedule.target_at(3.0) == 30


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "no stage"),
        ("30s", "no target"),
        ("30x:10", "duration"),
        ("30s:ten", "whole number"),
        ("30s:-1", "whole number"),
        ("0s:10", "more than 0s"),
        ("10s:0", "every target is 0"),
        ("25h:10", "more than a day"),
    ],
)
def test_bad_stages_are_one_line_naming_the_flag(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as caught:
        parse_stages(text)
    assert str(caught.value).startswith("--stages")
    assert "\n" not in str(caught.value)


stages = st.lists(
    st.builds(Stage, st.integers(1, 600).map(float), st.integers(0, 10_000)), min_size=1, max_size=6
)


@given(stages=stages, share=st.floats(0, 1))
def test_every_target_lies_between_the_ends_of_its_stage(stages: list[Stage], share: float) -> None:
    schedule = Schedule(tuple(stages))
    begun = 0.0
    start = 0
    for stage in stages:
        target = schedule.target_at(begun + share * stage.duration)
        assert min(start, stage.target) <= target <= max(start, stage.target)
        begun += stage.duration
        start = stage.target
    assert schedule.target_at(begun) == stages[-1].target
    assert schedule.target_at(begun + 1000) == stages[-1].target


@given(stages=stages)
def test_the_written_form_reads_back(stages: list[Stage]) -> None:
    schedule = Schedule(tuple(stages))
    if schedule.peak:
        assert parse_stages(str(schedule)) == schedule
