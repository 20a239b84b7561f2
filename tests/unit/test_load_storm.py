"""``--storm``: the phases of a reconnect storm and the figures it reports, without sockets."""

from __future__ import annotations

from wsgate.testbed.report import LoadStats
from wsgate.testbed.storm import Action, Phase, Storm, StormPlan


def stats_with(open_now: int) -> LoadStats:
    stats = LoadStats(target=4)
    stats.open = open_now
    return stats


def test_the_load_drops_after_the_hold_and_times_the_recovery() -> None:
    storm = Storm(StormPlan(sessions=4, hold=2.0, timeout=30.0))
    stats = stats_with(2)
    assert storm.observe(0.5, stats) is Action.NONE
    stats.open = 4
    assert storm.observe(1.0, stats) is Action.NONE
    assert storm.phase is Phase.HOLDING
    assert storm.observe(2.9, stats) is Action.NONE
    assert storm.observe(3.0, stats) is Action.DROP
    assert storm.phase is Phase.RECOVERING and storm.dropped_at == 3.0
    # The drop is seen only on the next look; full until then is not a recovery.
    assert storm.observe(3.02, stats) is Action.NONE
    stats.open = 0
    stats.attempted += 4
    stats.refused(503, "no_capacity", retry_after=1.0)
    assert storm.observe(3.1, stats) is Action.NONE
    stats.open = 3
    assert storm.observe(4.0, stats) is Action.NONE
    stats.open = 4
    assert storm.observe(4.5, stats) is Action.STOP
    assert storm.phase is Phase.RECOVERED
    report = storm.report(stats)
    assert report["recovery_s"] == 1.5
    assert report["dropped"] == 4
    assert report["attempts"] == 4
    assert report["rejected_by_status"] == {"503": 1}
    assert report["rejected_by_reason"] == {"no_capacity": 1}
    assert report["retry_after_s"] == {"1": 1}
    assert report["outcome"] == "recovered"
    assert storm.observe(5.0, stats) is Action.STOP


def test_a_dying_process_starts_the_clock_at_the_first_loss() -> None:
    storm = Storm(StormPlan(sessions=4, hold=0.0, timeout=30.0, wait_for="gateway-2"))
    stats = stats_with(4)
    storm.observe(1.0, stats)
    assert storm.observe(15.0, stats) is Action.NONE  # waiting, within the timeout
    stats.open = 2
    assert storm.observe(20.0, stats, process_gone=False) is Action.NONE
    assert storm.observe(20.1, stats, process_gone=True) is Action.NONE
    assert storm.phase is Phase.RECOVERING and storm.dropped_at == 20.0
    stats.open = 4
    assert storm.observe(21.0, stats) is Action.STOP
    report = storm.report(stats)
    assert report["recovery_s"] == 1.0 and report["dropped"] == 2
    assert report["trigger"] == "process gateway-2 died"


def test_a_process_dying_before_all_sessions_opened_starts_the_recovery() -> None:
    # The backends held all four and the process was killed; the clients had seen
    # only three 101s. Waiting for "all held" first would never end the storm.
    storm = Storm(StormPlan(sessions=4, hold=0.0, timeout=30.0, wait_for="gateway-2"))
    stats = stats_with(3)
    assert storm.observe(1.0, stats) is Action.NONE
    assert storm.observe(1.1, stats, process_gone=True) is Action.NONE
    assert storm.phase is Phase.RECOVERING and storm.dropped_at == 1.1
    stats.open = 1
    assert storm.observe(1.2, stats, process_gone=True) is Action.NONE
    stats.open = 4
    assert storm.observe(3.2, stats, process_gone=True) is Action.STOP
    report = storm.report(stats)
    assert report["outcome"] == "recovered" and report["recovery_s"] == 2.1
    assert report["dropped"] == 3


def test_every_phase_is_bounded() -> None:
    for opened, gone_after in ((0, None), (4, None), (4, 1.0)):
        storm = Storm(StormPlan(sessions=4, hold=0.0, timeout=5.0, wait_for="gw"))
        stats = stats_with(opened)
        storm.observe(0.0, stats)
        if gone_after is not None:
            stats.open = 1
            storm.observe(gone_after, stats, process_gone=True)
        expected = {0: Phase.OPENING, 4: Phase.HOLDING}[opened]
        if gone_after is not None:
            expected = Phase.RECOVERING
        assert storm.observe(100.0, stats) is Action.STOP
        assert storm.phase is Phase.TIMED_OUT and storm.timed_out_in is expected
        report = storm.report(stats)
        assert report["recovery_s"] is None
        assert report["outcome"] == f"timed out while {expected.value}"
