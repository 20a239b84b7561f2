"""The stores' pool structures against the plain rule: the memory store's index and the
Redis replica's versioned pool. No I/O."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from wsgate.admission import Candidate, choose_backend
from wsgate.admission.pool_index import PoolIndex
from wsgate.admission.redis.pool import PoolSync

IDS = ["a", "b", "c", "d", "e"]

some_ids = st.lists(st.sampled_from(IDS), max_size=2)
admit = st.tuples(
    st.just("admit"),
    st.booleans(),
    st.sampled_from([None, *IDS]),
    some_ids,
    st.sets(st.sampled_from(IDS), max_size=2),
)
caps = st.lists(st.integers(0, 3), min_size=5, max_size=5)
operation = st.one_of(
    admit,
    st.tuples(st.just("release"), st.sampled_from(IDS)),
    st.tuples(st.just("pool"), st.permutations(IDS), st.integers(1, 5), caps),
)


@given(st.lists(operation, max_size=60))
def test_the_index_chooses_what_the_rule_chooses(operations: list[tuple[object, ...]]) -> None:
    used: Counter[str] = Counter()
    index = PoolIndex(used)
    pool: tuple[Candidate, ...] = tuple(Candidate(b, 2) for b in IDS)
    index.offer(pool)
    for op in operations:
        if op[0] == "pool":
            order, size, caps = op[1], op[2], op[3]
            assert isinstance(order, list) and isinstance(size, int) and isinstance(caps, list)
            pool = tuple(Candidate(b, caps[i]) for i, b in enumerate(order[:size]))
            index.offer(pool)
        elif op[0] == "release":
            backend = op[1]
            assert isinstance(backend, str)
            if used[backend]:
                used[backend] -= 1
                index.changed(backend)
        else:
            _, least_loaded, preferred, first, exclude = op
            assert isinstance(least_loaded, bool) and isinstance(first, list)
            assert isinstance(exclude, set) and (preferred is None or isinstance(preferred, str))
            rule = {"least_loaded": least_loaded, "preferred": preferred}
            expected = choose_backend(
                pool, used.__getitem__, **rule, first=tuple(first), exclude=exclude
            )
            chosen = index.choose(**rule, first=tuple(first), exclude=exclude)
            assert chosen == expected
            if chosen is not None:
                used[chosen] += 1
                index.changed(chosen)


def test_a_full_least_loaded_top_means_all_are_full_without_a_scan() -> None:
    used: Counter[str] = Counter({"a": 1, "b": 1})
    index = PoolIndex(used)
    index.offer((Candidate("a", 1), Candidate("b", 1)))
    assert index.choose(least_loaded=True, preferred=None, first=(), exclude=()) is None


def test_equal_shares_go_to_the_smallest_id() -> None:
    pool = (Candidate("z", 4), Candidate("m", 2), Candidate("q", 4))
    assert choose_backend(pool, lambda _: 0, least_loaded=True) == "m"
    index = PoolIndex(Counter())
    index.offer(pool)
    assert index.choose(least_loaded=True, preferred=None, first=(), exclude=()) == "m"


# -- the Redis replica's versioned pool ---------------------------------------------------


def test_only_changes_travel_and_nothing_once_acknowledged() -> None:
    sync = PoolSync()
    pool = (Candidate("a", 2), Candidate("b", 3))
    sync.offer(pool)
    update = sync.update()
    assert update.base == "" and not update.reset
    assert sorted(update.entries) == [("a", 2, 0), ("b", 3, 1)]
    sync.acknowledged(update.version)
    assert sync.update().entries == [] and sync.update().version == update.version
    sync.offer(pool)  # the same sequence: nothing to do
    assert sync.update().version == update.version
    # b leaves, c arrives at b's place: one removal, one addition.
    sync.offer((Candidate("a", 2), Candidate("c", 3)))
    second = sync.update()
    assert second.base == update.version and second.version != update.version
    assert sorted(second.entries) == [("b", 0, 0), ("c", 3, 1)]
    sync.acknowledged(second.version)
    assert sync.update().entries == []


def test_an_equal_pool_in_a_new_sequence_is_no_new_version() -> None:
    sync = PoolSync()
    sync.offer([Candidate("a", 2)])
    version = sync.update().version
    sync.offer([Candidate("a", 2)])
    assert sync.update().version == version


def test_a_pool_reply_sends_everything_until_acknowledged() -> None:
    sync = PoolSync()
    sync.offer((Candidate("a", 2), Candidate("b", 3)))
    sync.acknowledged(sync.update().version)
    sync.resend()  # Redis lost it
    update = sync.update()
    assert update.reset and sorted(update.entries) == [("a", 2, 0), ("b", 3, 1)]
    sync.acknowledged(update.version)
    assert not sync.update().reset and sync.update().entries == []


def test_the_caps_of_held_backends_outlive_their_pool() -> None:
    sync = PoolSync()
    sync.offer((Candidate("a", 2), Candidate("b", 3)))
    sync.offer((Candidate("a", 2),))
    sync.forget_caps({"b"})
    assert sync.caps == {"a": 2, "b": 3}
    sync.forget_caps(set())
    assert sync.caps == {"a": 2}
