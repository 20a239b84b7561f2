"""Balancing policies and the backend-choice rule, without sockets."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from wsgate.admission import Candidate, choose_backend
from wsgate.balancing import (
    PowerOfTwo,
    cookie_token,
    make_policy,
    rendezvous_order,
    rendezvous_top,
)

FOUR = tuple(Candidate(f"pod-{c}", 2) for c in "abcd")


def test_round_robin_rotates_the_first_choice() -> None:
    policy = make_policy("round_robin")
    plans = [policy.plan(FOUR) for _ in range(8)]
    assert [plan.first[0] for plan in plans] == ["pod-a", "pod-b", "pod-c", "pod-d"] * 2
    # The next ones follow, then the store's least loaded.
    assert plans[3].first == ("pod-d", "pod-a", "pod-b")
    assert all(plan.least_loaded and plan.candidates is FOUR for plan in plans)


def test_least_conn_leaves_the_choice_to_the_store() -> None:
    plan = make_policy("least_conn").plan(FOUR)
    assert plan.least_loaded and plan.candidates is FOUR and plan.first == ()


def test_p2c_puts_the_less_loaded_of_two_first() -> None:
    load = {"pod-a": 2, "pod-b": 0, "pod-c": 1, "pod-d": 1}
    policy = PowerOfTwo(random.Random(7))
    seen: set[str] = set()
    for _ in range(50):
        a, b = policy.plan(FOUR, load=load.__getitem__).first
        assert a != b and load[a] <= load[b]
        seen |= {a, b}
    assert seen == {c.backend_id for c in FOUR}


def test_hash_is_stable_per_key_and_spreads_keys() -> None:
    policy = make_policy("hash")
    assert policy.plan(FOUR, key="10.0.0.1").first == policy.plan(FOUR, key="10.0.0.1").first
    firsts = Counter(policy.plan(FOUR, key=f"10.0.0.{i}").first[0] for i in range(400))
    assert set(firsts) == {c.backend_id for c in FOUR}
    assert min(firsts.values()) > 50


@given(st.text(min_size=1), st.sets(st.sampled_from([c.backend_id for c in FOUR])))
def test_rendezvous_top_is_the_first_of_the_order_not_excluded(key: str, exclude: set[str]) -> None:
    rest = [c.backend_id for c in rendezvous_order(FOUR, key) if c.backend_id not in exclude]
    assert rendezvous_top(FOUR, key, exclude) == (rest[0] if rest else None)


@given(st.text(min_size=1), st.integers(min_value=0, max_value=3))
def test_rendezvous_moves_only_the_removed_backends_keys(key: str, removed: int) -> None:
    before = rendezvous_order(FOUR, key)[0]
    rest = [c for i, c in enumerate(FOUR) if i != removed]
    after = rendezvous_order(rest, key)[0]
    if before in rest:
        assert after == before


def test_cookie_tokens_are_opaque_and_distinct() -> None:
    tokens = {cookie_token(c.backend_id) for c in FOUR}
    assert len(tokens) == 4
    assert all("pod" not in token for token in tokens)


def active_of(counts: dict[str, int]) -> Callable[[str], int]:
    return lambda backend_id: counts.get(backend_id, 0)


def test_choose_first_fit_skips_full_backends() -> None:
    counts = {"pod-a": 2, "pod-b": 1}
    assert choose_backend(FOUR, active_of(counts), least_loaded=False) == "pod-b"


def test_choose_least_loaded_uses_share_of_cap() -> None:
    candidates = [Candidate("small", 2), Candidate("big", 10)]
    counts = {"small": 1, "big": 4}  # 50% vs 40%
    assert choose_backend(candidates, active_of(counts), least_loaded=True) == "big"


def test_choose_prefers_the_affine_backend_while_it_has_room() -> None:
    counts = {"pod-c": 1}
    assert choose_backend(FOUR, active_of(counts), least_loaded=True, preferred="pod-c") == "pod-c"
    counts = {"pod-c": 2}
    assert choose_backend(FOUR, active_of(counts), least_loaded=False, preferred="pod-c") == "pod-a"


def test_choose_returns_none_when_all_are_full() -> None:
    counts = {c.backend_id: 2 for c in FOUR}
    assert choose_backend(FOUR, active_of(counts), least_loaded=True) is None
    assert choose_backend([], active_of({}), least_loaded=False) is None


@given(
    st.lists(st.tuples(st.integers(1, 5), st.integers(0, 6)), min_size=1, max_size=8),
    st.booleans(),
)
def test_choice_never_exceeds_a_cap(spec: list[tuple[int, int]], least: bool) -> None:
    candidates = [Candidate(f"b{i}", cap) for i, (cap, _) in enumerate(spec)]
    counts = {f"b{i}": used for i, (_, used) in enumerate(spec)}
    chosen = choose_backend(candidates, active_of(counts), least_loaded=least)
    room = [c.backend_id for c in candidates if counts[c.backend_id] < c.cap]
    if not room:
        assert chosen is None
    else:
        assert chosen in room
        if not least:
            assert chosen == room[0]
