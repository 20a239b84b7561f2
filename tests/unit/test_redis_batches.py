"""How script calls are cut into batches and laid out as one call of the script. No I/O."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from wsgate.admission.redis.script import (
    BATCH_ARGS,
    BATCH_MOST,
    ScriptCall,
    batch_call,
    batches_of,
)

calls = st.lists(
    st.integers(min_value=2, max_value=BATCH_ARGS + 10).map(
        lambda size: ("admit", 0, *range(size - 2))
    ),
    max_size=3 * BATCH_MOST,
)


@given(calls)
def test_batches_keep_every_call_in_order_within_both_bounds(made: list[ScriptCall]) -> None:
    batches = batches_of(made)
    assert [call for batch in batches for call in batch] == made
    for batch in batches:
        assert 1 <= len(batch) <= BATCH_MOST
        size = sum(len(call) + 1 for call in batch)
        assert size <= BATCH_ARGS or len(batch) == 1  # only a call too big alone passes


@given(calls)
def test_a_batch_is_cut_only_where_the_next_call_would_not_fit(made: list[ScriptCall]) -> None:
    batches = batches_of(made)
    for batch, after in itertools.pairwise(batches):
        size = sum(len(call) + 1 for call in batch)
        assert len(batch) == BATCH_MOST or size + len(after[0]) + 1 > BATCH_ARGS


def test_a_batch_call_lays_out_each_call_with_its_length() -> None:
    first: ScriptCall = ("release", 0, "r1", "t", "b0", "")
    second: ScriptCall = ("inspect", 0)
    assert batch_call([first, second]) == ("batch", 2, 6, *first, 2, *second)
