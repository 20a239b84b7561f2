"""The load generator's shape, addresses and timing rules, without sockets or waiting."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.config import ConfigError
from wsgate.testbed.load_plan import (
    ConnectPacer,
    Interval,
    answer_pod,
    message_text,
    parse_interval,
    parse_retry_after,
    parse_source_ips,
    parse_target,
    reconnect_delay,
    refusal_reason,
    retry_delay,
)
from wsgate.testbed.load_shell import Command, parse_command


class TestIntervals:
    def test_a_range_a_fixed_wait_back_to_back_and_off(self) -> None:
        assert parse_interval("10s-20s") == Interval(10.0, 20.0)
        assert parse_interval("500ms") == Interval(0.5, 0.5)
        interval = parse_interval("0")
        assert interval is not None and interval.back_to_back
        assert parse_interval("off") is None

    @pytest.mark.parametrize("text", ["20s-10s", "fast", "1s-", "-3s"])
    def test_bad_ranges_name_the_flag(self, text: str) -> None:
        with pytest.raises(ConfigError, match="--message-interval"):
            parse_interval(text)

    @given(low=st.floats(0, 100), span=st.floats(0, 100), seed=st.integers())
    def test_draws_stay_inside_the_range(self, low: float, span: float, seed: int) -> None:
        interval = Interval(low, low + span)
        assert low <= interval.draw(random.Random(seed)) <= low + span


class TestSourceAddresses:
    def test_an_inclusive_range(self) -> None:
        assert parse_source_ips("127.0.0.2-127.0.0.5") == [
            "127.0.0.2",
            "127.0.0.3",
            "127.0.0.4",
            "127.0.0.5",
        ]

    def test_a_list_with_a_range(self) -> None:
        assert parse_source_ips("10.0.0.1, 10.0.0.9-10.0.0.10") == [
            "10.0.0.1",
            "10.0.0.9",
            "10.0.0.10",
        ]

    @pytest.mark.parametrize("text", ["127.0.0.5-127.0.0.2", "localhost", "", "127.0.0.1-::1"])
    def test_bad_ranges(self, text: str) -> None:
        with pytest.raises(ConfigError, match="--source-ips"):
            parse_source_ips(text)


class TestTargets:
    def test_a_websocket_url(self) -> None:
        target = parse_target("ws://127.0.0.1:8080/ws?room=1", http=False)
        assert (target.host, target.port, target.path) == ("127.0.0.1", 8080, "/ws?room=1")
        assert target.host_header == "127.0.0.1:8080"
        assert not target.tls

    def test_default_ports_and_paths(self) -> None:
        target = parse_target("wss://gw.example", http=False)
        assert (target.port, target.path, target.host_header) == (443, "/", "gw.example")

    def test_the_scheme_must_match_the_mode(self) -> None:
        with pytest.raises(ConfigError, match="--http"):
            parse_target("http://127.0.0.1:8080/", http=False)
        with pytest.raises(ConfigError, match="http://"):
            parse_target("ws://127.0.0.1:8080/", http=True)


class TestRetryRules:
    @given(
        attempt=st.integers(0, 100),
        retry_after=st.one_of(st.none(), st.floats(0, 3600)),
        seed=st.integers(),
    )
    def test_never_before_retry_after_and_never_beyond_the_cap(
        self, attempt: int, retry_after: float | None, seed: int
    ) -> None:
        delay = retry_delay(attempt, retry_after, random.Random(seed), base=0.5, cap=10.0)
        assert (retry_after or 0) <= delay <= (retry_after or 0) + 10.0

    def test_backoff_grows_with_attempts(self) -> None:
        rng = random.Random(7)
        early = [retry_delay(0, None, rng, base=0.5, cap=60) for _ in range(500)]
        late = [retry_delay(5, None, rng, base=0.5, cap=60) for _ in range(500)]
        assert max(early) <= 0.5
        assert sum(late) / len(late) > 4 * sum(early) / len(early)

    def test_jitter_spreads_clients_refused_together(self) -> None:
        rng = random.Random(1)
        delays = {round(retry_delay(2, 1.0, rng), 3) for _ in range(50)}
        assert len(delays) > 40

    def test_reconnect_delay_is_jittered_around_its_base(self) -> None:
        rng = random.Random(3)
        delays = [reconnect_delay(rng, 2.0) for _ in range(200)]
        assert all(1.0 <= d <= 3.0 for d in delays)
        assert len(set(delays)) == 200

    def test_retry_after_in_seconds_or_as_a_date(self) -> None:
        assert parse_retry_after("3") == 3.0
        assert parse_retry_after(None) is None
        assert parse_retry_after("soon") is None
        date = "Wed, 21 Oct 2015 07:28:00 GMT"
        assert parse_retry_after(date, now=1445412470.0) == pytest.approx(10.0)

    def test_the_pacer_spaces_attempts_across_callers(self) -> None:
        pacer = ConnectPacer(rate=4.0)
        waits = [pacer.wait(100.0) for _ in range(4)]
        assert waits == [0.0, 0.25, 0.5, 0.75]
        assert pacer.wait(200.0) == 0.0


class TestAnswers:
    def test_the_pod_of_a_backend_answer(self) -> None:
        assert answer_pod(b'{"pod":"pod-a","echo":"x"}') == "pod-a"
        assert answer_pod(b"msg-1 xxxx") is None
        assert answer_pod(b"{broken") is None
        assert answer_pod(b'{"echo":"x"}') is None

    def test_the_reason_of_a_refusal(self) -> None:
        assert refusal_reason(b'{"error":"rate_limited","retry_after":1}') == "rate_limited"
        assert refusal_reason(b"<html>busy</html>") is None
        assert refusal_reason(b"[1]") is None

    @pytest.mark.parametrize("size", [1, 8, 64, 1000])
    def test_messages_have_the_size_asked_for(self, size: int) -> None:
        text = message_text(12, size)
        assert text.startswith("msg-12")
        assert len(text) == max(size, len("msg-12"))


class TestInteractiveCommands:
    @pytest.mark.parametrize(
        ("line", "command"),
        [
            ("connect 5", Command("connect", count=5)),
            ("connect", Command("connect", count=1)),
            ("send hello there", Command("send", text="hello there")),
            ("STATUS", Command("status")),
            ("close 2", Command("close", count=2)),
            ("quit", Command("quit")),
            ("", Command("nothing")),
        ],
    )
    def test_commands(self, line: str, command: Command) -> None:
        assert parse_command(line) == command

    @pytest.mark.parametrize("line", ["connect many", "close 0", "send", "dance"])
    def test_mistakes_get_a_one_line_answer(self, line: str) -> None:
        answer = parse_command(line)
        assert isinstance(answer, str) and "\n" not in answer
