"""At the open-files limit, the spare descriptors a hand-over uses come back, even
when the event loop is slow.

A session handed to the relay holds two descriptors more until uvloop closes its
own; at the limit the hand-over takes them from the gateway's spares, which must
be taken back once uvloop's descriptors are closed. When they were not (a loaded
machine: the loop iteration that follows was slower than the refill's timer), the
spares ran out after a few sessions and the next session answered 101 was dropped.
"""

from __future__ import annotations

import asyncio
import os
import time

import uvloop
from descriptors import open_files_limit

from wsgate.gateway.descriptors import SPARE_DESCRIPTORS, SpareDescriptors
from wsgate.gateway.handoff import hand_over


class HandedOver:
    """What hand_over needs of a session: where it ends up."""

    def __init__(self) -> None:
        self.relayed = False
        self.dropped: str | None = None

    def relay(self, client_fd: int, backend_fd: int, rest: bytes) -> None:
        os.close(client_fd)
        os.close(backend_fd)
        self.relayed = True

    def finish(self, outcome: str) -> None:
        self.dropped = outcome


def take_every_free_descriptor(into: list[int]) -> None:
    """What the next session's accept and backend connect do at the limit."""
    while True:
        try:
            into.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return


def test_hand_overs_at_the_limit_on_a_slow_loop_never_drop_a_session() -> None:
    rounds = SPARE_DESCRIPTORS // 2 + 2  # more than the spares would last untaken back

    async def scenario() -> list[HandedOver]:
        loop = asyncio.get_running_loop()
        spares = SpareDescriptors()
        accepted: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

        class Accept(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                accepted.put_nowait(transport)  # type: ignore[arg-type]

        server = await loop.create_server(Accept, "127.0.0.1", 0)
        address = server.sockets[0].getsockname()[:2]
        pairs = []  # both ends of one connection stand for a session's two sockets
        for _ in range(rounds):
            connecting, _ = await loop.create_connection(asyncio.Protocol, *address)
            pairs.append((connecting, await accepted.get()))
        spares.refill()
        taken: list[int] = []
        sessions = []
        try:
            with open_files_limit():
                for index in range(rounds):
                    session = HandedOver()
                    sessions.append(session)
                    client, backend = pairs[index]
                    hand_over(session, client, backend, b"", spares)  # type: ignore[arg-type]
                    time.sleep(0.005)  # noqa: ASYNC251 - this iteration is slow, as on a loaded machine
                    await asyncio.sleep(0.02)
                    take_every_free_descriptor(taken)
        finally:
            for fd in taken:
                os.close(fd)
            server.close()
            spares.close()
        return sessions

    sessions = uvloop.run(scenario())
    assert [s.dropped for s in sessions] == [None] * rounds
    assert all(s.relayed for s in sessions)


def test_a_callback_scheduled_after_abort_runs_once_the_socket_is_closed() -> None:
    """What the refill of the spares relies on; a timer is no substitute: on a slow
    iteration a 1 ms timer runs first, while the socket is still open."""

    def is_open(fd: int) -> bool:
        try:
            os.fstat(fd)
        except OSError:
            return False
        return True

    async def scenario() -> dict[str, bool]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        transport, _ = await loop.create_connection(
            asyncio.Protocol, *server.sockets[0].getsockname()[:2]
        )
        fd = transport.get_extra_info("socket").fileno()
        seen: dict[str, bool] = {}
        transport.abort()
        loop.call_later(0.001, lambda: seen.setdefault("timer", is_open(fd)))
        loop.call_soon(lambda: seen.setdefault("after_abort", is_open(fd)))
        time.sleep(0.005)  # noqa: ASYNC251 - a slow iteration
        await asyncio.sleep(0.05)
        server.close()
        return seen

    seen = uvloop.run(scenario())
    assert seen["after_abort"] is False, seen
