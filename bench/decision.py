"""The Python work one upgrade costs, without any I/O: what a set-up path keeps in Python.

A set-up path pays for its sockets (the kernel, the event loop) and for its
decisions. This times the decisions alone, with wsgate's own parts and the
memory store, one step at a time and all together, in one process and no
socket: read and check the client's head, admit (policy, store, reservation)
and release, write the head the backend is sent, read the backend's ``101``
and write the client's. Set against a proxy's whole cost per upgrade (the
``setup`` figure), it says how much of that budget the decisions take, and so
which parts of a set-up path must leave Python for the whole to reach a given
cost.

    .venv/bin/python -m bench.decision [--rounds 5] [--upgrades 20000] [--backends 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from bench.results import write_results
from wsgate.admission import Limits, Rejected
from wsgate.admission.memory import MemoryStore
from wsgate.balancing import make_policy
from wsgate.config import build_config
from wsgate.gateway.admit import Admission
from wsgate.gateway.head import RequestHead, ResponseHead, render_request, render_response
from wsgate.gateway.http1 import switching_response, upgrade_request
from wsgate.gateway.reservation import Reservation
from wsgate.gateway.stats import Stats
from wsgate.upstreams.pool import BackendPool

__all__ = ["main"]

PROG = "python -m bench.decision"
UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: gateway.example:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://gateway.example\r\n\r\n"
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
T = TypeVar("T")


def at_once(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never waits (the memory store's admission)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the coroutine waited: this store does not answer at once")


class Steps:
    """One gateway's decision parts over ``backends`` backends on the memory store."""

    def __init__(self, backends: int) -> None:
        config = build_config(
            {
                "backends": [
                    {"address": f"127.0.0.1:{9001 + i}", "id": f"b{i}"} for i in range(backends)
                ],
                "balance": "round_robin",
                "limits": {"max_connections_per_backend": 1_000_000},
            }
        )
        route = config.route_list()[0]
        self.max_head_size = config.max_head_size
        self.pool = BackendPool(route.limits.max_connections_per_backend)
        assert isinstance(route.backends, list)
        self.pool.update(route.backends, initial=True)
        self.store = MemoryStore(Limits())
        self.admission = Admission(
            route, self.store, self.pool, make_policy(route.balance), Stats()
        )
        self.admission.pool_changed()
        self.head = self.read_request()
        self.response = self.read_response()

    def read_request(self) -> RequestHead:
        # As an arrival's head is read: in C when it is of the plain shape, as this
        # one is, else by the reader; refused if the handshake's checks fail.
        found = upgrade_request(UPGRADE, self.max_head_size)
        if found is None:
            raise RuntimeError("the bench's own upgrade head was refused")
        return found[0]

    def admit_and_release(self, head: RequestHead | None = None) -> str:
        decision, _ = at_once(self.admission.admit(head or self.head, "10.0.0.1", exclude=set()))
        if isinstance(decision, Rejected):
            raise RuntimeError(f"admission refused: {decision.reason}")
        assert isinstance(decision, Reservation)
        decision.commit()
        decision.release()
        return decision.backend_id

    def write_request(self, head: RequestHead | None = None) -> bytes:
        return render_request(
            head or self.head, client_ip="10.0.0.1", request_id="0" * 16, host="127.0.0.1:9001"
        )

    def read_response(self) -> ResponseHead:
        switched = switching_response(SWITCHING)  # as a dial's answer is read
        if switched is None:
            raise RuntimeError("the bench's own 101 was not taken for one")
        return switched[0]

    def write_response(self, head: ResponseHead | None = None) -> bytes:
        return render_response(head or self.response, keep_alive=False, chunked=False)

    def whole(self) -> None:
        head = self.read_request()
        self.admit_and_release(head)
        self.write_request(head)
        self.write_response(self.read_response())


def per_call_us(step: Callable[[], object], upgrades: int, rounds: int) -> float:
    for _ in range(min(upgrades, 2000)):
        step()  # warm caches (the pool's index, the rendezvous table, the allocator)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(upgrades):
            step()
        times.append((time.perf_counter() - started) / upgrades * 1e6)
    return statistics.median(times)


def measure(backends: int, upgrades: int, rounds: int) -> list[dict[str, Any]]:
    steps = Steps(backends)
    plan: list[tuple[str, Callable[[], object]]] = [
        ("read and check the client's head", steps.read_request),
        ("admit and release (policy, store, reservation)", steps.admit_and_release),
        ("write the backend's head", steps.write_request),
        ("read the backend's 101", steps.read_response),
        ("write the client's 101", steps.write_response),
        ("all of it, one upgrade", steps.whole),
    ]
    return [{"step": name, "us": per_call_us(step, upgrades, rounds)} for name, step in plan]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--upgrades", type=int, default=20_000, help="per round")
    parser.add_argument("--backends", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write decision.md/.json here")
    args = parser.parse_args(argv)
    if min(args.rounds, args.upgrades, args.backends) < 1:
        parser.exit(2, f"{PROG}: --rounds, --upgrades and --backends must be at least 1\n")
    rows = measure(args.backends, args.upgrades, args.rounds)
    lines = [
        "# The Python work of one upgrade, without I/O",
        "",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; command: "
        f"`{PROG} {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"- Memory store, {args.backends} backends, round robin; medians of {args.rounds} "
        f"rounds of {args.upgrades:,} upgrades, one process, no socket.",
        "",
        "- The admission and the two writes are timed alone on one head, read once; the",
        "  last row reads new heads each time, as the gateway does, and pays for what that",
        "  allocates (the collector's share too): it is the figure to set against a whole",
        "  upgrade's cost.",
        "",
        "| step | µs per upgrade |",
        "|---|---:|",
    ]
    lines += [f"| {row['step']} | {row['us']:,.1f} |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        write_results(args.out, "decision", text, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
