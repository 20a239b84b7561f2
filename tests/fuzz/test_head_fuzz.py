"""The gateway's request-head parser and handshake check against the RFCs' model (no sockets).

RFC 9112 (message syntax), RFC 9110 (fields, Host, Upgrade) and RFC 6455 section
4.2.1 (the opening handshake), as ``rfc_head.judge`` reads them. Every case a
run of these properties turned up is kept in ``corpus.py`` and replayed below.
An arrival's head is read in C when it is of the plainest shape: that reading
is the reader's, for every head here, so the model's verdict holds for it too.
"""

from __future__ import annotations

import pytest
from corpus import CASES
from heads import MAX_HEAD, gateway_verdict, mutated_heads, request_heads
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rfc_head import Outcome, judge

from wsgate.gateway.head import render_request
from wsgate.gateway.http1 import read_upgrade_request, upgrade_request

pytestmark = pytest.mark.fuzz

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_against_the_model(raw: bytes, chunks: list[bytes] | None = None) -> Outcome:
    judgement = judge(raw, MAX_HEAD)
    outcome, head, detail = gateway_verdict(chunks or [raw])
    assert outcome in judgement.allowed, (
        f"gateway: {outcome.value} ({detail}); the RFCs allow "
        f"{sorted(o.value for o in judgement.allowed)} ({judgement.why}) for {raw!r}"
    )
    if head is not None and outcome is not Outcome.REFUSE and judgement.fields is not None:
        # A strict reading: the parser read exactly the fields sent, in order, names as sent.
        assert (head.method, head.target) == (judgement.method, judgement.target)
        assert tuple(head.headers) == judgement.fields
    return outcome


@FUZZ
@given(request_heads())
def test_built_heads_get_what_the_rfcs_say(raw: bytes) -> None:
    check_against_the_model(raw)


@FUZZ
@given(mutated_heads())
@example(b"GET / HTTP/1.1\r\nHost: a\r\nX: v  \t\r\n\r\n")
# A good request, then bad bytes in the same read: the good one is served.
@example(b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost:h:80\r\n\r\nUpgrade:websocket\r\n\r\n")
def test_mutated_heads_get_what_the_rfcs_say(raw: bytes) -> None:
    check_against_the_model(raw)


@FUZZ
@given(st.one_of(request_heads(), mutated_heads()), st.data())
def test_a_head_read_in_pieces_gets_the_same_verdict(raw: bytes, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=6)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    whole, _, _ = gateway_verdict([raw])
    assert check_against_the_model(raw, [c for c in chunks if c]) == whole


@FUZZ
@given(st.one_of(request_heads(), mutated_heads()))
@example(b"GET / HTTP/1.0\r\n\r\n")  # no Host: the backend's is sent
def test_what_is_forwarded_is_a_strictly_valid_head(raw: bytes) -> None:
    outcome, head, _ = gateway_verdict([raw])
    if head is None or outcome is Outcome.REFUSE:
        return
    forwarded = render_request(head, client_ip="127.0.0.2", request_id="r-1", host="127.0.0.9:8080")
    judgement = judge(forwarded, 2 * MAX_HEAD)
    # The backend gets no choice to make: one strict reading, and the gateway's verdict.
    assert judgement.fields is not None, (judgement.why, forwarded)
    assert outcome in judgement.allowed, (judgement.why, forwarded)


@FUZZ
@given(st.one_of(request_heads(), mutated_heads()))
def test_an_arrivals_head_read_in_c_is_what_the_reader_reads(raw: bytes) -> None:
    assert upgrade_request(raw, MAX_HEAD) == read_upgrade_request(raw, MAX_HEAD)


@pytest.mark.parametrize(("name", "raw", "expected"), CASES, ids=[c[0] for c in CASES])
def test_corpus(name: str, raw: bytes, expected: Outcome) -> None:
    """Heads the fuzzing found interesting: the model allows the verdict, the gateway gives it."""
    assert check_against_the_model(raw) is expected
    assert upgrade_request(raw, MAX_HEAD) == read_upgrade_request(raw, MAX_HEAD)
