"""The rebalance plan: how many connections to move, and each replica's part of it."""

from __future__ import annotations

import random

from hypothesis import example, given
from hypothesis import strategies as st

from wsgate.upstreams.rebalance import ArrivalEstimate, local_share, plan_moves, spread


def settle(counts: dict[str, int], caps: dict[str, int], moves: dict[str, int]) -> dict[str, int]:
    """Close ``moves`` and reconnect each on the least loaded backend with room, as
    least-connections placement does."""
    result = dict(counts)
    for backend, n in moves.items():
        result[backend] -= n
    for _ in range(sum(moves.values())):
        room = [b for b in caps if result.get(b, 0) < caps[b]]
        target = min(room, key=lambda b: (result.get(b, 0) / caps[b], b))
        result[target] = result.get(target, 0) + 1
    return result


class TestPlanMoves:
    def test_scale_up_from_one_backend(self) -> None:
        caps = {"a": 40, "b": 40, "c": 40}
        moves = plan_moves({"a": 30}, caps, 1)
        assert moves == {"a": 20}
        assert settle({"a": 30}, caps, moves) == {"a": 10, "b": 10, "c": 10}

    def test_within_skew_moves_nothing(self) -> None:
        caps = {"a": 40, "b": 40, "c": 40}
        assert plan_moves({"a": 11, "b": 10, "c": 10}, caps, 1) == {}
        assert plan_moves({"a": 12, "b": 10, "c": 10}, caps, 2) == {}

    def test_never_churns_when_the_skew_cannot_be_met(self) -> None:
        # 31 over 3 backends: 11/10/10 is the best there is, even with max_skew 0.
        caps = {"a": 40, "b": 40, "c": 40}
        assert plan_moves({"a": 11, "b": 10, "c": 10}, caps, 0) == {}
        assert plan_moves({"a": 12, "b": 10, "c": 9}, caps, 0) == {"a": 1}

    def test_arrivals_are_placed_first(self) -> None:
        # 5 closed a moment ago are on their way back: they will fill b and c.
        caps = {"a": 40, "b": 40, "c": 40}
        moves = plan_moves({"a": 25}, caps, 1, arriving=5)
        assert moves == {"a": 15}

    def test_single_backend_or_none(self) -> None:
        assert plan_moves({"a": 30}, {"a": 40}, 1) == {}
        assert plan_moves({}, {}, 1) == {}

    def test_unlisted_backends_are_left_alone(self) -> None:
        # "gone" is draining or sick: not a source, not a target.
        caps = {"a": 40, "b": 40}
        assert plan_moves({"a": 20, "gone": 50}, caps, 1) == {"a": 10}

    def test_targets_need_room(self) -> None:
        caps = {"a": 40, "b": 2}
        # Shares of cap: a at 30/40, b full at 2/2: nothing can move to b.
        assert plan_moves({"a": 30, "b": 2}, caps, 0.1) == {}

    def test_different_caps_compare_shares(self) -> None:
        caps = {"big": 30, "small": 10}
        moves = plan_moves({"big": 24}, caps, 0.1)
        after = settle({"big": 24}, caps, moves)
        assert after == {"big": 18, "small": 6}
        assert spread(after, caps) <= 0.1

    @given(
        st.dictionaries(
            st.sampled_from("abcdef"), st.integers(0, 60), min_size=2, max_size=6
        ).flatmap(
            lambda counts: st.tuples(
                st.just(counts),
                st.dictionaries(st.sampled_from(sorted(counts)), st.integers(1, 80), min_size=2),
                st.sampled_from([0, 0.2, 1, 2, 3]),
            )
        )
    )
    # Equal shares reached by different routes (11/18 - 2/18 and 1/2) once compared unequal.
    @example(({"a": 0, "b": 0, "c": 11}, {"a": 2, "b": 5, "c": 18}, 0))
    def test_plan_settles_within_skew_or_at_best(
        self, case: tuple[dict[str, int], dict[str, int], float]
    ) -> None:
        counts, caps, max_skew = case
        counts = {b: min(n, caps.get(b, n)) for b, n in counts.items()}
        moves = plan_moves(counts, caps, max_skew)
        assert all(0 < n <= counts[b] for b, n in moves.items())
        after = settle(counts, caps, moves)
        # Settled: planning again moves nothing, so no connection is closed twice.
        assert plan_moves(after, caps, max_skew) == {}
        if max_skew >= 1 and len(set(caps.values())) == 1:
            assert spread(after, caps) <= max_skew


class TestLocalShare:
    def never(self, p: float) -> bool:
        return False

    def test_one_replica_takes_the_whole_plan(self) -> None:
        share = local_share({"a": 20}, {"a": 30}, {"a": 30}, tail=self.never)
        assert share == {"a": 20}

    def test_replicas_split_in_proportion_never_more_than_the_plan(self) -> None:
        plan = {"a": 7}
        counts = {"a": 30}
        first = local_share(plan, counts, {"a": 10}, tail=self.never)
        second = local_share(plan, counts, {"a": 20}, tail=self.never)
        assert first == {"a": 2} and second == {"a": 4}
        assert first["a"] + second["a"] <= plan["a"]

    def test_the_remainder_goes_by_the_coin(self) -> None:
        asked: list[float] = []

        def coin(p: float) -> bool:
            asked.append(p)
            return True

        assert local_share({"a": 1}, {"a": 30}, {"a": 15}, tail=coin) == {"a": 1}
        assert asked == [0.5]

    def test_never_more_than_held(self) -> None:
        assert local_share({"a": 5}, {"a": 2}, {"a": 2}, tail=self.never) == {"a": 2}
        assert local_share({"a": 5}, {"a": 10}, {}, tail=self.never) == {}

    def test_tail_converges_across_replicas(self) -> None:
        # Two replicas, 15 each on "a", one move left: taken after a few rounds.
        rng = random.Random(7)
        rounds = 0
        taken = 0
        while not taken and rounds < 50:
            rounds += 1
            taken = local_share(
                {"a": 1}, {"a": 30}, {"a": 15}, tail=lambda p: rng.random() < p
            ).get("a", 0)
        assert taken == 1


class TestArrivalEstimate:
    def test_drop_counts_as_arriving_within_the_window(self) -> None:
        estimate = ArrivalEstimate(window=10)
        assert estimate.observe(0, 30) == 0
        assert estimate.observe(1, 25) == 5
        assert estimate.observe(2, 28) == 2
        assert estimate.observe(3, 30) == 0

    def test_window_forgets(self) -> None:
        estimate = ArrivalEstimate(window=10)
        estimate.observe(0, 30)
        assert estimate.observe(5, 20) == 10
        assert estimate.observe(11, 20) == 0

    def test_newer_peak_replaces_older(self) -> None:
        estimate = ArrivalEstimate(window=10)
        estimate.observe(0, 30)
        estimate.observe(5, 35)
        assert estimate.observe(12, 33) == 2
