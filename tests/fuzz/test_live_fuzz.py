"""Random and mutated requests sent to a running gateway; then a good client, and no slot held.

Each request goes on a connection of its own. What the gateway answers must be
what the RFCs' model allows (a refusal is the gateway's own 4xx, a head that
never ends gets a 408), the backend's own count must never pass the cap, and
once it is over a good client is served and nothing is held anywhere. The run
is seeded: a failure prints the seed (``WSGATE_FUZZ_SEED=N`` replays it).
"""

from __future__ import annotations

import asyncio
import json
import os
import random

import pytest
from corpus import CASES
from faultkit import all_free
from fleet import CLIENT_IPS, never_over
from gwtools import open_one
from heads import MAX_HEAD
from rfc_head import VERSION_REFUSED, Outcome, judge

from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway

pytestmark = [pytest.mark.fuzz, pytest.mark.slow]

REQUESTS = 300
AT_ONCE = 25
_NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x7f", b"\x80", b"\xff", b","]
_GOOD = [raw for _, raw, outcome in CASES if outcome is not Outcome.REFUSE] + [
    b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
]
_SEEDS = _GOOD * 3 + [raw for _, raw, _ in CASES]  # mostly good requests, mutated


def mutate(rng: random.Random, raw: bytes) -> bytes:
    """A few random edits of ``raw``: bytes inserted, dropped, changed case, lines doubled."""
    for _ in range(rng.randint(0, 4)):
        at = rng.randrange(len(raw) + 1)
        edit = rng.randrange(5)
        if edit == 0:
            raw = raw[:at] + rng.choice(_NASTY) + raw[at:]
        elif edit == 1:
            raw = raw[:at] + raw[at + 1 :]
        elif edit == 2:
            raw = raw[:at] + raw[at:].swapcase()
        elif edit == 3:
            start = raw.rfind(b"\r\n", 0, at) + 2
            stop = raw.find(b"\r\n", at)
            if stop > start:
                raw = raw[:stop] + b"\r\n" + raw[start:stop] + raw[stop:]
        else:
            raw = raw[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + raw[at:]
    return raw or b"\r\n"


def unfinished_body(raw: bytes) -> bool:
    """Whether ``raw`` is a whole head whose own body the client left unfinished.

    Such a request is forwarded and then waits, like its backend, for bytes the
    client never sends: no answer need be complete (the backend may already be
    streaming one back) until the client gives up.
    """
    head, end, body = raw.partition(b"\r\n\r\n")
    if not end:
        return False
    fields = [line.partition(b":") for line in head.split(b"\r\n")[1:]]
    values = {name.strip().lower(): value.strip() for name, _, value in fields}
    if b"chunked" in values.get(b"transfer-encoding", b"").lower():
        return not body.endswith(b"0\r\n\r\n")
    length = values.get(b"content-length", b"")
    return length.isdigit() and len(body) < int(length)


async def exchange(host: str, port: int, raw: bytes, source: str) -> tuple[int, bytes]:
    """Send ``raw``; return the first response's status (0 when none) and its body."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    status = 0
    try:
        writer.write(raw)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length) if length and status != 101 else b""
        return status, body
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return 0, b""
    except TimeoutError:
        if not unfinished_body(raw):
            raise  # the request was whole: an answer that never ends is a hang
        return status, b""
    finally:
        writer.close()


def check_answer(raw: bytes, status: int, body: bytes) -> None:
    judgement = judge(raw, MAX_HEAD)
    allowed = judgement.allowed
    if allowed == {Outcome.REFUSE}:
        # The gateway's own answer: a 4xx of its own, not the backend's; a handshake
        # asking for another protocol version may be told the one spoken (426). A
        # head read leniently (a request-line's extra space, say) is judged by its
        # lenient reading, whose reason comes last: refusing the version is right then.
        version_refused = judgement.why.rsplit("; ", 1)[-1] == VERSION_REFUSED
        own = (400, 408, 431, 426) if version_refused else (400, 408, 431)
        assert status in own and json.loads(body)["error"] == "bad_request", (
            raw,
            status,
            body,
        )
    elif allowed == {Outcome.INCOMPLETE}:
        assert status == 408, (raw, status)
    elif allowed == {Outcome.WEBSOCKET}:
        assert status in (101, 503), (raw, status, body)
    elif Outcome.REFUSE not in allowed:
        assert status == 0 or status < 500 or status == 503, (raw, status, body)


async def test_random_requests_leave_nothing_held(procs: ProcessGroup) -> None:
    seed = int(os.environ.get("WSGATE_FUZZ_SEED", random.randrange(2**32)))
    print(f"\nWSGATE_FUZZ_SEED={seed}")
    rng = random.Random(seed)
    backends = start_backends(procs, 1, tripwire=1)
    gateway = start_gateway(
        procs, backends, max_head_size=MAX_HEAD, timeouts={"header": "1s"},
        limits={"max_connections_per_backend": 1},
    )  # fmt: skip
    requests = [mutate(rng, rng.choice(_SEEDS)) for _ in range(REQUESTS)]
    requests += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) for _ in range(20)]
    statuses: dict[int, int] = {}
    for start in range(0, len(requests), AT_ONCE):
        batch = requests[start : start + AT_ONCE]
        answers = await asyncio.gather(
            *(
                exchange("127.0.0.1", gateway.port, raw, CLIENT_IPS[i % len(CLIENT_IPS)])
                for i, raw in enumerate(batch)
            )
        )
        for raw, (status, body) in zip(batch, answers, strict=True):
            statuses[status] = statuses.get(status, 0) + 1
            check_answer(raw, status, body)
        never_over(backends, 1)
    print(f"answers by status: {dict(sorted(statuses.items()))}")
    await all_free([gateway], backends)
    assert backends[0].stats()["http_in_flight"] == 0
    ws = await open_one(gateway.ws_url)  # a good client gets the one slot
    await ws.send("after the fuzz")
    assert json.loads(await ws.recv())["echo"] == "after the fuzz"
    await ws.close()
    await all_free([gateway], backends)
