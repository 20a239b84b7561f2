"""A reservation gives its slot back exactly once: by itself unless committed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wsgate.admission import Candidate, Limits, Ticket
from wsgate.admission.memory import MemoryStore
from wsgate.gateway.reservation import Reservation


async def admitted(
    store: MemoryStore, give_back: Callable[[Ticket], None] | None = None
) -> Reservation:
    decision = await store.admit([Candidate("b", 1)])
    ticket = getattr(decision, "ticket", None)
    assert isinstance(ticket, Ticket)
    return Reservation(ticket, give_back or store.release_now)


async def test_a_block_that_ends_gives_the_slot_back() -> None:
    store = MemoryStore(Limits())
    with await admitted(store):
        assert store.local_counts()["b"] == 1
    assert store.local_counts().get("b", 0) == 0


async def test_a_block_that_fails_gives_the_slot_back() -> None:
    store = MemoryStore(Limits())
    with pytest.raises(RuntimeError), await admitted(store):
        raise RuntimeError("connect failed")
    assert store.local_counts().get("b", 0) == 0


async def test_a_committed_slot_stays_until_its_owner_releases_it_once() -> None:
    store = MemoryStore(Limits())
    given_back: list[Ticket] = []

    def give_back(ticket: Ticket) -> None:
        given_back.append(ticket)
        store.release_now(ticket)

    reservation = await admitted(store, give_back)
    with reservation:
        reservation.commit()
    assert store.local_counts()["b"] == 1  # the session holds it now
    reservation.release()
    reservation.release()
    assert store.local_counts().get("b", 0) == 0
    assert given_back == [reservation.ticket]
