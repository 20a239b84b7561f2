"""Which replicas a look at the server's clients finds gone: pure parts of the departure watch."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import NoPermissionError, ReadOnlyError, ResponseError

from wsgate.admission.redis.presence import (
    AT_ONCE,
    Presence,
    client_ids,
    departed,
    judged,
    refused_for_good,
    run_id_of,
)


def test_run_id_from_a_parsed_or_a_raw_info_reply() -> None:
    assert run_id_of({"run_id": "abc", "redis_version": "7.0"}) == "abc"
    assert run_id_of(b"# Server\r\nredis_version:7.0\r\nrun_id:abc\r\ntcp_port:6379\r\n") == "abc"
    assert run_id_of("") == ""


def test_client_ids_from_a_parsed_or_a_raw_listing() -> None:
    assert client_ids([{"id": "7", "name": ""}, {"id": "12"}]) == {"7", "12"}
    raw = b"id=7 addr=127.0.0.1:5 name= age=1\nid=12 addr=127.0.0.1:6 name= age=0\n"
    assert client_ids(raw) == {"7", "12"}
    assert client_ids(b"") == set()


def test_only_a_named_connection_of_this_server_that_is_gone_departs() -> None:
    names = {
        "me": "run1:1",  # never judges itself
        "alive": "run1:2",
        "gone": "run1:3",
        "elsewhere": "run0:4",  # another server's client id: not judged
        "unnamed": "run1:",
    }
    mine = judged(names, "run1", me="me")
    assert mine == {"alive": "run1:2", "gone": "run1:3"}
    assert departed(mine, {"2"}) == {"gone": "run1:3"}
    assert departed(mine, {"2", "3"}) == {}
    assert judged(names, "", me="me") == {}  # no run_id read: nobody


@given(
    st.dictionaries(
        st.text("abcdef", min_size=1, max_size=4),
        st.tuples(st.sampled_from(["run0", "run1"]), st.integers(1, 30)),
        max_size=12,
    ),
    st.sets(st.integers(1, 30).map(str)),
)
def test_departed_never_names_a_listed_client_or_another_servers(
    names: dict[str, tuple[str, int]], listed: set[str]
) -> None:
    flat = {replica: f"{server}:{client}" for replica, (server, client) in names.items()}
    gone = departed(judged(flat, "run1", me=""), listed)
    for replica, name in gone.items():
        server, _, client = name.partition(":")
        assert server == "run1" and client not in listed and flat[replica] == name
    for replica, (server, client) in names.items():
        if server == "run1" and str(client) not in listed:
            assert replica in gone


def test_departures_are_given_up_only_for_a_command_the_server_refuses() -> None:
    assert refused_for_good(NoPermissionError("NOPERM this user has no permissions"))
    assert refused_for_good(ResponseError("ERR unknown command 'CLIENT', with args"))
    assert refused_for_good(ResponseError("ERR unknown subcommand 'ID'. Try CLIENT HELP."))
    # A passing state: the watch goes on.
    assert not refused_for_good(ReadOnlyError("You can't write against a read only replica."))
    assert not refused_for_good(ResponseError("ERR Error running script: attempt to call nil"))


def test_a_refusal_hears_when_slots_are_back_and_one_that_raced_their_return_to_come_now() -> None:
    def unused() -> None:
        raise AssertionError("a hint needs no connection")

    presence = Presence(unused, "ns", "me", interval=0.5, timeout=1, renamed=unused, token=str)  # type: ignore[arg-type]
    assert presence.retry_hint(asked=10.0, now=10.1) is None  # nobody leaving
    presence.departing_by = 12.0  # a look found one gone, due by then
    assert presence.retry_hint(asked=10.0, now=10.5) == 1.5
    assert presence.retry_hint(asked=12.0, now=12.1) is None  # past due: what is configured
    presence.reaped_at, presence.departing_by = 11.0, 0.0  # reaped, nobody else leaving
    assert presence.retry_hint(asked=10.9, now=11.1) == AT_ONCE  # decided before that
    assert presence.retry_hint(asked=11.2, now=11.3) is None  # full again since
