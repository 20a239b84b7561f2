"""A property-based test of shared admission: random interleavings of admit, release,
replica crash, lease expiry, renewal, Redis data loss and script-cache loss, across
replicas, against a real redis-server running the real Lua script.

The model is the truth a backend would see: the tickets each live replica holds.
After every step:
  - Redis is self-consistent: ``total`` is the sum of the registered replicas'
    ``held``, and nothing is left of replicas that are gone;
  - every live replica in good standing is registered with exactly its truth;
  - a crashed replica that was not reaped yet still counts what it held;
  - no backend has more live connections than its cap, whenever every live
    replica is in good standing (a replica whose lease was taken from it, or
    whose state Redis lost, is "suspect" until it renews and sheds its excess; after
    Redis lost its data, every replica that renews is suspect, and refuses new
    connections, until the wait of one lease is over).
Time is not waited for: a lease "expires" by setting its expiry in the past, which
is what the passing of ``lease_ttl`` without a renewal looks like to the script.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis import Redis

from wsgate.admission import Admitted, Candidate, Reason, Rejected, Ticket, choose_backend
from wsgate.admission.redis import RedisStore, key_prefix
from wsgate.testbed.processes import RedisServer

CAPS = {"a": 2, "b": 3, "c": 1}

pytestmark = pytest.mark.redis


class Replica:
    def __init__(self, store: RedisStore):
        self.store = store
        self.tickets: list[Ticket] = []  # oldest first, like connections
        self.excess: list[tuple[str, int]] = []
        store.on_excess = lambda backend, count: self.excess.append((backend, count))

    def truth(self) -> Counter[str]:
        return Counter(t.backend_id for t in self.tickets)


class SharedAdmission(RuleBasedStateMachine):
    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.namespace = f"h{uuid.uuid4().hex[:10]}"
        self.prefix = key_prefix(self.namespace)
        self.redis = Redis.from_url(self.url, decode_responses=True)
        self.alive: dict[str, Replica] = {}
        self.crashed: dict[str, Counter[str]] = {}  # what each held when it died
        self.suspect: set[str] = set()
        self.drifted: set[str] = set()  # Redis lost some of its acknowledged writes
        self.started = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        for replica in self.alive.values():
            self.run(replica.store.close())
        self.redis.delete(*self.redis.keys(self.prefix + "*") or ["-"])
        self.redis.close()
        self.loop.close()

    # -- rules -------------------------------------------------------------------------

    @initialize()
    def two_replicas(self) -> None:
        self.start_replica()
        self.start_replica()

    @precondition(lambda self: len(self.alive) < 3)
    @rule()
    def start_replica(self) -> None:
        store = RedisStore(
            self.url,
            namespace=self.namespace,
            replica_id=f"r{self.started}",
            lease_ttl=600.0,
            timeout=5.0,
            on_failure="closed",
        )
        self.started += 1
        self.run(store.start(renew_in_background=False))
        self.alive[store.replica_id] = Replica(store)
        if self.settling():  # Redis lost its data: it waits like the others
            assert store.mode == "degraded"
            self.suspect.add(store.replica_id)
        else:
            assert store.mode == "ok"

    @precondition(lambda self: self.alive)
    @rule(
        data=st.data(),
        order=st.permutations(sorted(CAPS)),
        size=st.integers(1, len(CAPS)),
        least_loaded=st.booleans(),
        preferred=st.sampled_from([None, "a", "b", "c"]),
        repeat=st.integers(1, 3),
    )
    def admit(
        self,
        data: st.DataObject,
        order: list[str],
        size: int,
        least_loaded: bool,
        preferred: str | None,
        repeat: int,
    ) -> None:
        name = data.draw(st.sampled_from(sorted(self.alive)))
        replica = self.alive[name]
        candidates = [Candidate(b, CAPS[b]) for b in order[:size]]
        for _ in range(repeat):
            total = self.total()
            decision = self.run(
                replica.store.admit(candidates, least_loaded=least_loaded, preferred=preferred)
            )
            if name in self.suspect:
                assert isinstance(decision, Rejected)
                assert decision.reason is Reason.STATE_UNAVAILABLE
                continue
            expected = choose_backend(
                candidates,
                lambda b, total=total: total.get(b, 0),
                least_loaded=least_loaded,
                preferred=preferred,
            )
            if expected is None:
                assert isinstance(decision, Rejected) and decision.reason is Reason.NO_CAPACITY
            else:
                assert isinstance(decision, Admitted) and decision.backend_id == expected
                replica.tickets.append(decision.ticket)

    @precondition(lambda self: self.alive)
    @rule(data=st.data(), least_loaded=st.booleans())
    def admit_to_the_smallest(self, data: st.DataObject, least_loaded: bool) -> None:
        """The cap-1 backend first: where replicas collide most."""
        self.admit(data, ["c", "a", "b"], 3, least_loaded, None, 1)

    @precondition(lambda self: any(r.tickets for r in self.alive.values()))
    @rule(data=st.data(), twice=st.booleans())
    def release(self, data: st.DataObject, twice: bool) -> None:
        name = data.draw(st.sampled_from(sorted(n for n, r in self.alive.items() if r.tickets)))
        replica = self.alive[name]
        ticket = replica.tickets.pop(data.draw(st.integers(0, len(replica.tickets) - 1)))
        self.run(replica.store.release(ticket))
        if twice:
            self.run(replica.store.release(ticket))

    @rule(
        data=st.data(),
        kind=st.sampled_from(["crash", "data lost", "scripts lost", "failover loses a write"]),
    )
    def trouble(self, data: st.DataObject, kind: str) -> None:
        if kind == "crash" and len(self.alive) > 1:
            self.crash(data.draw(st.sampled_from(sorted(self.alive))))
        elif kind == "data lost":
            self.redis.delete(*self.redis.keys(self.prefix + "*") or ["-"])
            self.crashed.clear()
            self.suspect |= set(self.alive)
        elif kind == "failover loses a write":
            # The new primary never saw this replica's last admission: all of
            # that script's writes are gone (a script replicates as one unit).
            held = {name: self.redis.hgetall(f"{self.prefix}:held:{name}") for name in self.alive}
            holders = sorted(name for name, counts in held.items() if counts)
            if holders:
                name = data.draw(st.sampled_from(holders))
                backend = data.draw(st.sampled_from(sorted(held[name])))
                for key in (f"{self.prefix}:held:{name}", f"{self.prefix}:total"):
                    left = self.redis.hincrby(key, backend, -1)
                    if left <= 0:
                        self.redis.hdel(key, backend)
                cap = self.redis.hget(f"{self.prefix}:caps", backend)
                if cap is not None:
                    load = max(left, 0) / int(cap)
                    self.redis.zadd(f"{self.prefix}:load", {backend: load}, xx=True)
                self.drifted.add(name)
        else:
            self.redis.script_flush()

    def crash(self, name: str) -> None:
        """The process dies: its connections with it, its registration stays behind."""
        replica = self.alive.pop(name)
        self.run(replica.store.abandon())
        self.suspect.discard(name)
        self.drifted.discard(name)
        if self.redis.zscore(f"{self.prefix}:replicas", name) is not None:
            held = self.redis.hgetall(f"{self.prefix}:held:{name}")
            self.crashed[name] = Counter({b: int(n) for b, n in held.items()})

    @precondition(lambda self: self.alive or self.crashed)
    @rule(data=st.data())
    def lease_runs_out(self, data: st.DataObject) -> None:
        """A whole lease_ttl passes without a renewal by this replica."""
        registered = self.redis.zrange(f"{self.prefix}:replicas", 0, -1)
        if not registered:
            return
        name = data.draw(st.sampled_from(sorted(registered)))
        self.redis.zadd(f"{self.prefix}:replicas", {name: 0})
        if name in self.alive:
            self.suspect.add(name)
        # The others notice at their next renewal, usually before it does.
        others = sorted(set(self.alive) - {name})
        if others and data.draw(st.booleans()):
            self.renew(data.draw(st.sampled_from(others)))

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def renew_one(self, data: st.DataObject) -> None:
        self.renew(data.draw(st.sampled_from(sorted(self.alive))))

    def settling(self) -> bool:
        return bool(self.redis.exists(f"{self.prefix}:settling"))

    @precondition(lambda self: self.settling())
    @rule()
    def the_wait_after_the_loss_ends(self) -> None:
        """A whole lease_ttl passes after a replica saw that Redis lost its data."""
        self.redis.delete(f"{self.prefix}:settling")

    def renew(self, name: str) -> None:
        replica = self.alive[name]
        self.run(replica.store.refresh())
        # Expired leases are reaped by any renewal: nothing of them is left.
        assert not self.redis.zrangebyscore(f"{self.prefix}:replicas", 0, 0)
        for dead in list(self.crashed):
            if self.redis.zscore(f"{self.prefix}:replicas", dead) is None:
                del self.crashed[dead]
        if self.settling():  # registered, but not admitting until the wait is over
            assert replica.store.mode == "degraded" and not replica.excess
            self.suspect.add(name)
            return
        assert replica.store.mode == "ok"
        # Re-registered: it sheds what is over the cap, newest connections first.
        for backend, count in replica.excess:
            newest = [t for t in reversed(replica.tickets) if t.backend_id == backend][:count]
            assert len(newest) == count
            for ticket in newest:
                replica.tickets.remove(ticket)
                self.run(replica.store.release(ticket))
        replica.excess.clear()
        self.suspect.discard(name)
        self.drifted.discard(name)

    # -- invariants ----------------------------------------------------------------------

    def total(self) -> dict[str, int]:
        return {b: int(n) for b, n in self.redis.hgetall(f"{self.prefix}:total").items()}

    @invariant()
    def redis_is_consistent(self) -> None:
        members = set(self.redis.zrange(f"{self.prefix}:replicas", 0, -1))
        assert set(self.redis.hkeys(f"{self.prefix}:lease")) == members
        held_keys = {key.rsplit(":held:", 1)[1] for key in self.redis.keys(f"{self.prefix}:held:*")}
        assert held_keys <= members
        summed: Counter[str] = Counter()
        for member in members:
            held = self.redis.hgetall(f"{self.prefix}:held:{member}")
            counts = Counter({b: int(n) for b, n in held.items()})
            assert all(n > 0 for n in counts.values())
            summed.update(counts)
            in_good_standing = member not in self.suspect | self.drifted
            if member in self.alive and in_good_standing:
                assert counts == self.alive[member].truth()
            if member in self.crashed:
                assert counts == self.crashed[member]
        assert self.total() == dict(summed)
        # Every backend some pool names is ranked by its share of cap, exactly.
        total, caps = self.total(), self.redis.hgetall(f"{self.prefix}:caps")
        for backend, load in self.redis.zrange(f"{self.prefix}:load", 0, -1, withscores=True):
            assert load == total.get(backend, 0) / int(caps[backend])

    @invariant()
    def every_replica_knows_what_it_holds(self) -> None:
        for name, replica in self.alive.items():
            assert Counter(replica.store.local_counts()) == replica.truth()
            if name not in self.suspect:
                assert self.redis.zscore(f"{self.prefix}:replicas", name) is not None

    @invariant()
    def no_backend_over_its_cap(self) -> None:
        if self.suspect or self.drifted:
            return
        at_backends: Counter[str] = Counter()
        for replica in self.alive.values():
            at_backends.update(replica.truth())
        for backend, count in at_backends.items():
            assert count <= CAPS[backend], (backend, count)


@pytest.mark.fuzz
@pytest.mark.slow
def test_random_interleavings_keep_the_invariant(redis_server: RedisServer) -> None:
    SharedAdmission.url = redis_server.url
    run_state_machine_as_test(
        SharedAdmission,
        settings=settings(
            max_examples=150,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
