"""Which first bytes make a connection an arrival: a whole upgrade head, and nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from wsgate.gateway.arrival import whole_upgrade

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_whole_upgrade_head_is_one_with_what_came_behind_it() -> None:
    request = whole_upgrade(UPGRADE + b"\x81\x80abcd", 16 * 1024)
    assert request is not None
    assert request.head.upgrade and request.head.target == b"/chat"
    assert request.rest == b"\x81\x80abcd"


@given(st.integers(min_value=1, max_value=len(UPGRADE) - 1))
def test_part_of_a_head_is_left_to_the_downstream(cut: int) -> None:
    assert whole_upgrade(UPGRADE[:cut], 16 * 1024) is None


def test_what_the_downstream_answers_or_forwards_on_a_transport_is_not_one() -> None:
    plain = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    no_key = UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
    other = UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: h2c")
    old_version = UPGRADE.replace(b"Version: 13", b"Version: 8")
    malformed = b"GET /chat HTTP/1.1\r\nHost x\r\n\r\n"
    two = plain + UPGRADE  # pipelined: the downstream serves them in order
    for data in (plain, no_key, other, old_version, malformed, two):
        assert whole_upgrade(data, 16 * 1024) is None, data
    assert whole_upgrade(UPGRADE, 64) is None  # over the head limit: a 431 to answer
