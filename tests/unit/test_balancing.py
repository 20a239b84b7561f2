"""Balancing policies and the backend-choice rule, without sockets."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from wsgate.admission import Candidate, choose_backend
from wsgate.balancing import PowerOfTwo, Rendezvous, cookie_token, make_policy

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


BACKEND_IDS = [c.backend_id for c in FOUR]


def pool(count: int, prefix: str = "pod") -> tuple[Candidate, ...]:
    return tuple(Candidate(f"{prefix}-{i}", 4) for i in range(count))


def owners(candidates: tuple[Candidate, ...], keys: list[str]) -> dict[str, str | None]:
    rendezvous = Rendezvous()
    return {key: rendezvous.top(candidates, key) for key in keys}


KEYS = [f"10.{i // 250}.{i % 250}.7" for i in range(20_000)]


@given(st.text(min_size=1), st.permutations(FOUR))
def test_rendezvous_is_the_same_on_every_replica_whatever_the_order(
    key: str, shuffled: list[Candidate]
) -> None:
    assert Rendezvous().top(FOUR, key) == Rendezvous().top(tuple(shuffled), key) is not None


@given(st.text(min_size=1), st.sets(st.sampled_from(BACKEND_IDS)))
def test_rendezvous_skips_the_excluded_and_only_them(key: str, exclude: set[str]) -> None:
    rendezvous = Rendezvous()
    top = rendezvous.top(FOUR, key)
    found = rendezvous.top(FOUR, key, exclude)
    if exclude >= set(BACKEND_IDS):
        assert found is None
    else:
        assert found is not None and found not in exclude
        if top not in exclude:
            assert found == top  # excluding others changes nothing


def test_rendezvous_gives_every_backend_its_share_of_a_large_pool() -> None:
    # 500 backends in 64 groups of unequal sizes: the groups' weights keep the
    # share per backend, not per group, even.
    counts = Counter(owners(pool(500), KEYS).values())
    mean = len(KEYS) / 500
    assert len(counts) == 500
    assert 0.5 * mean <= min(counts.values()) and max(counts.values()) <= 1.6 * mean, (
        min(counts.values()),
        max(counts.values()),
    )


def test_rendezvous_moves_few_keys_when_a_backend_leaves_or_arrives() -> None:
    before = owners(pool(200), KEYS)
    fair_share = len(KEYS) / 200
    leaving = "pod-17"
    after = owners(tuple(c for c in pool(200) if c.backend_id != leaving), KEYS)
    moved = [key for key in KEYS if before[key] != after[key]]
    assert {key for key, owner in before.items() if owner == leaving} <= set(moved)
    assert leaving not in after.values()
    assert len(moved) <= 3 * fair_share, len(moved)  # about 2/n: its keys, and its group's
    arrived = owners((*pool(200), Candidate("pod-new", 4)), KEYS)
    moved = [key for key in KEYS if before[key] != arrived[key]]
    assert sum(owner == "pod-new" for owner in arrived.values()) >= 0.5 * fair_share
    assert len(moved) <= 3 * fair_share, len(moved)


def test_rendezvous_follows_a_new_pool() -> None:
    rendezvous = Rendezvous()
    top = rendezvous.top(FOUR, "10.0.0.1")
    smaller = tuple(c for c in FOUR if c.backend_id != top)
    assert rendezvous.top(smaller, "10.0.0.1") not in (None, top)
    assert rendezvous.top((), "10.0.0.1") is None


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


@given(st.text(min_size=1), st.integers(min_value=1, max_value=300))
def test_the_written_out_group_choice_is_the_ranking_s_first(key: str, size: int) -> None:
    from wsgate.balancing import rendezvous

    candidates = pool(size)
    index = Rendezvous()
    index.top(candidates, "index")
    hashed = rendezvous._hash(key)
    ranked = sorted(index._groups, key=lambda g: rendezvous._weighted(hashed, g), reverse=True)
    assert rendezvous._top_group(index._groups, hashed) == ranked[0][2]


@given(st.text(min_size=1), st.sets(st.sampled_from([f"pod-{i}" for i in range(12)])))
def test_the_written_out_member_choice_is_the_highest_score(key: str, exclude: set[str]) -> None:
    from wsgate.balancing import rendezvous

    members = [(f"pod-{i}", rendezvous._hash(f"pod-{i}")) for i in range(12)]
    hashed = rendezvous._hash(key)
    allowed = [(rendezvous.score(hashed, h), name) for name, h in members if name not in exclude]
    expected = max(allowed)[1] if allowed else None
    assert rendezvous._best(members, hashed, exclude) == expected
