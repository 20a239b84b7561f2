"""The replica's sync with Redis as a state machine, driven by decoded replies. No I/O."""

from __future__ import annotations

import pytest

from wsgate.admission import Reason, Rejected
from wsgate.admission.redis.script import (
    AdmitReply,
    AdmitStatus,
    ReleaseReply,
    RenewReply,
    RenewStatus,
    decode_admit,
    decode_renew,
)
from wsgate.admission.redis.sync import Change, Registration, ReplicaSync, SyncState


def machine() -> tuple[ReplicaSync, list[Change]]:
    changes: list[Change] = []
    return ReplicaSync(
        lease_ttl=15.0, lease_margin=0.1, timeout=0.1, on_change=changes.append
    ), changes


def renewal(
    status: RenewStatus = RenewStatus.OK,
    *,
    held: dict[str, int] | None = None,
    excess: dict[str, int] | None = None,
    totals: dict[str, int] | None = None,
    live: int = 2,
    epoch: str = "e1",
    settling: float = 0.0,
) -> RenewReply:
    return RenewReply(
        status, live, 0.0, totals or {}, excess or {}, [], held or {}, 1000.0, epoch, settling
    )


def ok_admit(backend: str, total: int) -> AdmitReply:
    return AdmitReply(AdmitStatus.OK, backend, 0.0, 0.0, 2, total, "p:1")


def registered(sync: ReplicaSync, **reply: object) -> Registration:
    truth = sync.truth()
    return sync.registered(renewal(**reply), "t1", truth, sent=10.0, received=10.01)  # type: ignore[arg-type]


def test_registration_brings_it_in_sync_with_a_new_token_and_lease() -> None:
    sync, changes = machine()
    assert sync.state is SyncState.STARTING and not sync.in_sync
    assert registered(sync, live=3) is Registration.DONE
    assert sync.state is SyncState.IN_SYNC and sync.token == "t1"
    assert sync.lease_deadline == 10.0 + 15.0 - 0.1
    assert sync.live == 3
    assert changes == [
        Change(SyncState.STARTING, SyncState.IN_SYNC, "0 live slots, 3 live replicas")
    ]
    # A quick reply taught Redis's clock: later calls carry a deadline.
    assert sync.deadline(20.0) > 0


def test_admission_counts_the_slot_and_learns_the_counts() -> None:
    sync, _ = machine()
    registered(sync)
    decision = sync.admit_replied(ok_admit("b", 1), now=11.0, retry_after=5.0)
    assert decision == "b"
    assert sync.held == {"b": 1}
    assert sync.global_counts == {"b": 1}
    refused = sync.admit_replied(
        AdmitReply(AdmitStatus.NO_CAPACITY, "", 0.0, 0.0, 2, 0, "p:1"), 11.0, 5.0
    )
    assert refused == Rejected(Reason.NO_CAPACITY, 5.0)
    assert sync.held == {"b": 1}


def test_a_late_reply_voids_the_admission_and_ends_the_sync() -> None:
    sync, changes = machine()
    registered(sync)
    assert sync.admit_replied(decode_admit([b"late"]), 11.0, 5.0) is None
    assert sync.state is SyncState.DEGRADED and sync.held == {}
    assert changes[-1] == Change(
        SyncState.IN_SYNC, SyncState.DEGRADED, "Redis answered after the deadline"
    )


def test_a_stale_token_ends_the_sync_and_releases_stay_local() -> None:
    sync, changes = machine()
    registered(sync)
    sync.admit_replied(ok_admit("a", 1), 11.0, 5.0)
    assert sync.admit_replied(decode_admit([b"stale"]), 11.0, 5.0) is None
    assert changes[-1].new is SyncState.DEGRADED and changes[-1].reason == "lease lost"
    # Degraded: the release changes the truth only; nothing is to be sent.
    assert sync.released("a") is False
    assert sync.held == {} and sync.truth() == {}


def test_a_stale_release_reply_ends_the_sync() -> None:
    sync, _ = machine()
    registered(sync)
    sync.admit_replied(ok_admit("a", 1), 11.0, 5.0)
    assert sync.released("a") is True
    sync.release_replied("a", ReleaseReply(stale=True, total=0))
    assert sync.state is SyncState.DEGRADED


def test_a_lost_lease_on_renewal_ends_the_sync() -> None:
    sync, _ = machine()
    registered(sync)
    sync.renewed(renewal(RenewStatus.LOST), sent=12.0, received=12.01, quiet=True)
    assert sync.state is SyncState.DEGRADED


def test_the_lease_expires_by_the_replicas_own_clock() -> None:
    sync, changes = machine()
    registered(sync)
    sync.check_lease(10.0 + 14.8)
    assert sync.in_sync
    sync.check_lease(10.0 + 14.9)
    assert changes[-1] == Change(SyncState.IN_SYNC, SyncState.DEGRADED, "lease not renewed in time")
    sync.renewed(renewal(), sent=26.0, received=26.01, quiet=False)
    assert sync.state is SyncState.DEGRADED  # only a re-registration brings it back


def test_a_quiet_renewal_that_finds_writes_lost_ends_the_sync() -> None:
    sync, _ = machine()
    registered(sync)
    sync.admit_replied(ok_admit("a", 1), 11.0, 5.0)
    sync.renewed(renewal(held={"a": 1}), 12.0, 12.01, quiet=True)
    assert sync.in_sync and sync.lease_deadline == 12.0 + 14.9
    sync.renewed(renewal(held={}), 13.0, 13.01, quiet=False)  # others ran: no judgement
    assert sync.in_sync
    sync.renewed(renewal(held={}), 14.0, 14.01, quiet=True)
    assert sync.state is SyncState.DEGRADED


def test_redis_back_after_failures_registers_the_truth_and_reports_excess() -> None:
    sync, changes = machine()
    registered(sync)
    sync.admit_replied(ok_admit("a", 1), 11.0, 5.0)
    sync.failed("no answer within 100ms")
    sync.failed("Connection refused")
    assert sync.errors_total == 2
    # Degraded, it admits locally (on_failure: local): the truth grows.
    sync.admitted_locally("a")
    assert sync.truth() == {"a": 2}
    raw = [b"ok", b"2", b"0", [b"a", b"3"], [b"a", b"1"], [b"gw-old"], [b"a", b"2"], b"2000000"]
    raw += [b"e1", b"0"]  # the epoch, no wait
    reply = decode_renew(raw)
    assert reply.excess == {"a": 1} and reply.reaped == ["gw-old"]
    outcome = sync.registered(reply, "t2", {"a": 2}, sent=30.0, received=30.01)
    assert outcome is Registration.DONE and sync.in_sync and sync.token == "t2"
    assert sync.global_counts == {"a": 3}
    assert [c.new for c in changes] == [
        SyncState.IN_SYNC,
        SyncState.DEGRADED,
        SyncState.DEGRADED,
        SyncState.IN_SYNC,
    ]
    assert changes[1].old is SyncState.IN_SYNC and changes[2].old is SyncState.DEGRADED


def test_a_truth_that_changed_while_registering_is_sent_again() -> None:
    sync, _ = machine()
    sync.admitted_locally("a")
    sent_truth = sync.truth()
    sync.released("a")  # the connection ended while the call was out
    outcome = sync.registered(renewal(held={"a": 1}), "t1", sent_truth, 10.0, 10.01)
    assert outcome is Registration.AGAIN and not sync.in_sync
    assert sync.token == "t1"  # the next attempt proves itself with the token just set
    assert registered(sync) is Registration.DONE


def test_a_late_registration_forgets_the_clock_and_stays_degraded() -> None:
    sync, _ = machine()
    registered(sync)
    sync.lose("Connection reset")
    outcome = sync.registered(decode_renew([b"late"]), "t9", {}, 20.0, 20.01)
    assert outcome is Registration.FAILED and sync.state is SyncState.DEGRADED
    assert sync.token == "t1" and sync.deadline(21.0) == 0


def test_an_abandoned_admission_gives_its_slot_back_only_when_granted() -> None:
    sync, _ = machine()
    registered(sync)
    assert sync.abandoned(ok_admit("b", 1)) == "b"
    assert sync.held == {}  # its caller never counted it
    assert sync.abandoned(AdmitReply(AdmitStatus.NO_CAPACITY, "", 0, 0, 2, 0, "p:1")) is None
    assert sync.abandoned(None) is None
    assert sync.state is SyncState.DEGRADED


def test_closed_is_final() -> None:
    sync, changes = machine()
    registered(sync)
    sync.close()
    sync.lose("whatever")
    assert sync.state is SyncState.CLOSED and len(changes) == 1
    assert registered(sync) is Registration.FAILED and sync.state is SyncState.CLOSED


def test_registered_after_redis_lost_its_data_it_settles_for_what_is_left_of_a_lease() -> None:
    sync, changes = machine()
    registered(sync)
    sync.admitted_locally("a")
    sync.lose("lease lost")  # Redis came back empty: the token is gone
    raw = [b"ok", b"2", b"0", [b"a", b"1"], [], [], [b"a", b"1"], b"2000000", b"e2", b"1500"]
    reply = decode_renew(raw)
    assert (reply.epoch, reply.settling) == ("e2", 1.5)
    outcome = sync.registered(reply, "t2", {"a": 1}, sent=30.0, received=30.01)
    # Registered (its truth is in Redis, the token is current) but not admitting through it.
    assert outcome is Registration.SETTLING and not sync.in_sync
    assert sync.state is SyncState.SETTLING and sync.token == "t2" and sync.epoch == "e2"
    assert sync.settle_until == pytest.approx(31.51)
    assert changes[-1] == Change(SyncState.DEGRADED, SyncState.SETTLING, changes[-1].reason)
    assert "lost its data" in changes[-1].reason
    # Registering again while Redis still settles changes nothing and tells nobody.
    again = sync.registered(renewal(held={"a": 1}, epoch="e2", settling=0.5), "t3", {"a": 1},
                            sent=31.0, received=31.01)  # fmt: skip
    assert again is Registration.SETTLING and len(changes) == 3
    # Once the wait is over (no settling left), it is in sync.
    done = sync.registered(renewal(held={"a": 1}, epoch="e2"), "t4", {"a": 1}, 31.6, 31.61)
    assert done is Registration.DONE and sync.in_sync
    assert changes[-1].old is SyncState.SETTLING and changes[-1].new is SyncState.IN_SYNC


def test_a_first_start_on_an_empty_redis_is_not_delayed() -> None:
    sync, changes = machine()
    assert sync.epoch == ""  # nothing seen yet: Redis cannot ask it to wait
    assert registered(sync, epoch="e1") is Registration.DONE and sync.in_sync
    assert sync.epoch == "e1" and [c.new for c in changes] == [SyncState.IN_SYNC]


def test_a_renewal_that_reports_a_loss_of_data_ends_the_sync() -> None:
    sync, changes = machine()
    registered(sync)
    # Another replica saw the loss first and re-registered; this one's renewal is told.
    sync.renewed(renewal(epoch="e2", settling=1.2), 20.0, 20.01, quiet=False)
    assert sync.state is SyncState.DEGRADED and sync.epoch == "e2"
    assert changes[-1].reason == "Redis lost its data"
    assert registered(sync, epoch="e2", settling=1.1) is Registration.SETTLING


def test_a_lost_lease_still_teaches_the_new_epoch() -> None:
    sync, _ = machine()
    registered(sync)
    sync.renewed(renewal(RenewStatus.LOST, epoch="e2", settling=1.5), 20.0, 20.01, quiet=True)
    assert sync.state is SyncState.DEGRADED and sync.epoch == "e2"


def test_a_reply_of_an_earlier_call_never_shows_an_older_count() -> None:
    # Replies are handled out of the order their calls ran in: a renewal's caller
    # wakes after a later release's callback has run.
    sync, _ = machine()
    registered(sync)
    sync.admit_replied(ok_admit("a", 2), 11.0, 5.0, seq=1)
    assert sync.global_counts == {"a": 2}
    sync.released("a", seq=3)
    sync.release_replied("a", ReleaseReply(stale=False, total=1), seq=3)
    sync.renewed(renewal(totals={"a": 2, "b": 4}), 12.0, 12.01, quiet=False, seq=2)
    assert sync.global_counts == {"a": 1, "b": 4}  # "a" as call 3 left it; "b" new
    sync.renewed(renewal(totals={"b": 5}), 13.0, 13.01, quiet=False, seq=4)
    assert sync.global_counts == {"b": 5}  # a later call's view replaces both
    sync.admit_replied(ok_admit("b", 4), 11.0, 5.0, seq=3)
    assert sync.global_counts == {"b": 5}
