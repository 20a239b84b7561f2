"""The access log's buffering: JSON lines, written together, none lost on flush."""

from __future__ import annotations

import asyncio
import io
import json

from wsgate.gateway.access_log import FLUSH_BYTES, FLUSH_INTERVAL, AccessLog


async def test_lines_are_written_together_after_the_interval() -> None:
    out = io.BytesIO()
    log = AccessLog(out)
    log.write({"kind": "websocket", "status": 101})
    log.write({"kind": "http", "status": 200, "detail": "é"})
    assert out.getvalue() == b""  # buffered
    await asyncio.sleep(FLUSH_INTERVAL * 2)
    lines = out.getvalue().decode().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"kind": "websocket", "status": 101},
        {"kind": "http", "status": 200, "detail": "é"},
    ]


async def test_a_full_buffer_is_written_at_once() -> None:
    out = io.BytesIO()
    log = AccessLog(out)
    record = {"pad": "x" * 1000}
    for _ in range(FLUSH_BYTES // 1000 + 1):
        log.write(record)
    # Written before any timer could fire: at least FLUSH_BYTES of whole lines.
    written = out.getvalue()
    assert len(written) >= FLUSH_BYTES and written.endswith(b"\n")
    assert all(json.loads(line) == record for line in written.splitlines())


async def test_flush_writes_what_is_left_and_a_closed_stream_is_survived() -> None:
    out = io.BytesIO()
    log = AccessLog(out)
    log.write({"a": 1})
    log.flush()
    assert out.getvalue() == b'{"a":1}\n'
    out.close()
    log.write({"b": 2})
    log.flush()  # no exception: the gateway goes on without its log
