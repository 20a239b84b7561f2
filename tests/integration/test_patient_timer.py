"""PatientTimer: a Redis timeout that does not count the gateway's own busy loop.

Run on uvloop, the gateway's loop, where due timers run before the callbacks
that I/O of the previous iteration queued: a plain ``call_later`` timer then
declares a reply missing that has already been read.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import uvloop

from wsgate.admission.redis.pipeline import PatientTimer

TIMEOUT = 0.05


async def reply_read_during_a_busy_poll(
    start: Callable[[asyncio.AbstractEventLoop, Callable[[], None]], Callable[[], None]],
) -> list[str]:
    """Outcomes when a reply arrives in time but its iteration takes 150 ms."""
    loop = asyncio.get_running_loop()
    outcome: list[str] = []
    cancel = start(loop, lambda: outcome.append("timed out"))
    ours, theirs = socket.socketpair()

    def answered() -> None:
        outcome.append("answered")
        cancel()

    def readable() -> None:  # a poll phase busy with many connections, the reply among them
        ours.recv(1)
        loop.remove_reader(ours)
        time.sleep(0.15)
        loop.call_soon(answered)

    try:
        loop.add_reader(ours, readable)
        loop.call_later(0.01, theirs.send, b"x")
        await asyncio.sleep(0.5)
    finally:
        ours.close()
        theirs.close()
    return outcome


def patient(loop: asyncio.AbstractEventLoop, expire: Callable[[], None]) -> Callable[[], None]:
    return PatientTimer(loop, TIMEOUT, expire).cancel


def plain(loop: asyncio.AbstractEventLoop, expire: Callable[[], None]) -> Callable[[], None]:
    return loop.call_later(TIMEOUT, expire).cancel


def test_a_reply_held_up_by_a_busy_loop_is_not_a_timeout() -> None:
    assert uvloop.run(reply_read_during_a_busy_poll(patient)) == ["answered"]
    # What a plain timer does there (the reason for PatientTimer).
    assert uvloop.run(reply_read_during_a_busy_poll(plain)) == ["timed out", "answered"]


def test_on_an_idle_loop_it_expires_after_its_timeout() -> None:
    async def waited() -> float:
        loop = asyncio.get_running_loop()
        expired = loop.create_future()
        started = loop.time()
        PatientTimer(loop, TIMEOUT, lambda: expired.set_result(loop.time()))
        return float(await asyncio.wait_for(expired, 2)) - started

    assert TIMEOUT - 0.002 <= uvloop.run(waited()) < 1.0  # uvloop's clock counts milliseconds


def test_a_loop_that_stays_busy_still_times_out_within_ten_timeouts() -> None:
    async def waited() -> float:
        loop = asyncio.get_running_loop()
        expired = loop.create_future()
        started = loop.time()
        PatientTimer(loop, 0.02, lambda: expired.set_result(loop.time()))

        def stay_busy() -> None:
            if not expired.done():
                time.sleep(0.03)  # every firing comes late
                loop.call_soon(stay_busy)

        loop.call_soon(stay_busy)
        return float(await asyncio.wait_for(expired, 5)) - started

    # It waits as long as each firing was kept waiting, so a loop whose iterations
    # take 30 ms gets an iteration or two more; never more than ten timeouts.
    assert 0.02 <= uvloop.run(waited()) <= 0.2 + 0.05
