"""A load session's pauses: what wakes one, and what ends the session (asyncio, no sockets)."""

from __future__ import annotations

import asyncio

from wsgate.testbed.load_plan import LoadPlan, parse_target
from wsgate.testbed.load_ws import Session, WebSocketLoad
from wsgate.testbed.report import LoadStats


def one_session() -> Session:
    plan = LoadPlan(targets=[parse_target("ws://127.0.0.1:9/", http=False)])
    load = WebSocketLoad(plan, LoadStats())
    return Session(load, load.clients[0], 1)


async def test_a_late_wake_up_cuts_a_pause_short_and_the_session_goes_on() -> None:
    # A closed protocol's callback may be queued when the reconnect's pause begins.
    session = one_session()
    asyncio.get_running_loop().call_soon(session.wake)
    async with asyncio.timeout(5.0):
        ends = await session.pause(30.0)  # in this task: the pause begins before the wake runs
    assert ends is False


async def test_a_pause_ends_the_session_when_it_is_closed_or_the_run_stops() -> None:
    session = one_session()
    loop = asyncio.get_running_loop()
    loop.call_soon(session.close)
    async with asyncio.timeout(5.0):
        assert await session.pause(30.0) is True
    session = one_session()
    session.load.stopping = True
    assert await session.pause(30.0) is True


async def test_an_unwoken_pause_lasts_its_delay() -> None:
    session = one_session()
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await session.pause(0.05) is False
    assert loop.time() - started >= 0.05
