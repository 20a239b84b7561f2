"""The backend pool without sockets: discovery updates, passive ejection and its doubling."""

from __future__ import annotations

import pytest

from wsgate.config import BackendSpec, PassiveHealthConfig
from wsgate.upstreams.pool import MAX_EJECTION, BackendPool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def specs(*ids: str) -> list[BackendSpec]:
    return [BackendSpec(address=f"127.0.0.1:{9000 + n}", id=i) for n, i in enumerate(ids)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pool(clock: Clock) -> BackendPool:
    passive = PassiveHealthConfig(consecutive_failures=3, ejection=10)
    return BackendPool(2, passive, clock=clock)


class TestUpdate:
    def test_first_snapshot_is_healthy_later_ones_wait_for_checks(self, pool: BackendPool) -> None:
        added, removed = pool.update(specs("a"), initial=True)
        assert [b.id for b in added] == ["a"] and removed == []
        assert pool.get("a") is not None and pool.get("a").healthy  # type: ignore[union-attr]
        added, _ = pool.update(specs("a", "b"))
        assert [b.id for b in added] == ["b"] and not added[0].healthy
        assert [c.backend_id for c in pool.candidates()] == ["a"]

    def test_removed_backend_drains_while_it_holds_sessions(self, pool: BackendPool) -> None:
        pool.update(specs("a", "b"), initial=True)
        b = pool.get("b")
        assert b is not None
        b.connections.add(object())
        _, removed = pool.update(specs("a"))
        assert removed == [b] and b.draining and pool.get("b") is b
        assert [c.backend_id for c in pool.candidates()] == ["a"]
        b.connections.clear()
        pool.forget_drained()
        assert pool.get("b") is None

    def test_ids_are_stable_and_a_returning_backend_stops_draining(self, pool: BackendPool) -> None:
        pool.update(specs("a", "b"), initial=True)
        a = pool.get("a")
        assert a is not None
        a.connections.add(object())
        pool.update(specs("b"))
        assert a.draining
        pool.update(specs("a", "b"))
        assert pool.get("a") is a and not a.draining


class TestPassiveEjection:
    def test_consecutive_failures_eject_then_time_brings_it_back(
        self, pool: BackendPool, clock: Clock
    ) -> None:
        pool.update(specs("a", "b"), initial=True)
        a = pool.get("a")
        assert a is not None
        pool.record_failure(a, "connect failed")
        pool.record_success(a)  # a success in between resets the count
        for _ in range(2):
            pool.record_failure(a, "503 on upgrade")
        assert a.ejections == 0
        pool.record_failure(a, "503 on upgrade")
        assert a.ejections == 1 and a.ejected_until == clock.now + 10
        assert [c.backend_id for c in pool.candidates()] == ["b"]
        assert pool.end_ejections() == []
        clock.now += 10
        assert [c.backend_id for c in pool.candidates()] == ["a", "b"]
        assert pool.end_ejections() == [a]
        assert pool.end_ejections() == []

    def test_repeats_double_until_a_success(self, pool: BackendPool, clock: Clock) -> None:
        pool.update(specs("a"), initial=True)
        a = pool.get("a")
        assert a is not None
        durations = []
        for _ in range(7):
            for _ in range(3):
                pool.record_failure(a, "connect failed")
            durations.append(a.ejected_until - clock.now)
            clock.now = a.ejected_until
        assert durations == [10, 20, 40, 80, 160, MAX_EJECTION, MAX_EJECTION]
        pool.record_success(a)
        for _ in range(3):
            pool.record_failure(a, "connect failed")
        assert a.ejected_until - clock.now == 10
        assert a.ejections == 8

    def test_without_passive_config_nothing_is_ejected(self, clock: Clock) -> None:
        pool = BackendPool(2, None, clock=clock)
        pool.update(specs("a"), initial=True)
        a = pool.get("a")
        assert a is not None
        for _ in range(100):
            pool.record_failure(a, "connect failed")
        assert a.ejections == 0 and pool.candidates()
