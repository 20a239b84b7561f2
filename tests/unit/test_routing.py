"""Routes: the table's choice against a brute-force reference, and the route config."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from wsgate.config import ConfigError, build_config
from wsgate.routing import (
    RouteKey,
    RouteTable,
    check_path_prefix,
    host_name,
    request_host_and_path,
)

HOSTS = ["chat.example.com", "api.example.com", "[::1]"]
SEGMENTS = ["ws", "wsx", "w", "chat", "a.b", "v1"]


def reference_pick(routes: list[tuple[str, RouteKey]], host: str | None, path: str) -> str | None:
    """The rules as written, tried on every route: a matching host beats none, then the
    longest prefix matching by whole segments."""
    wanted = None if host is None else host.lower().rpartition(":")[0] or host.lower()
    if host is not None and host.startswith("["):
        wanted = host.lower().partition("]")[0] + "]"
    matching = []
    for name, key in routes:
        host_ok = key.host is None or key.host == wanted
        segments_ok = key.path_prefix == "/" or path.split("/")[
            : key.path_prefix.count("/") + 1
        ] == (key.path_prefix.split("/"))
        if host_ok and segments_ok:
            matching.append((key.host is not None, len(key.path_prefix), name))
    return max(matching)[2] if matching else None


prefixes = st.lists(st.sampled_from(SEGMENTS), max_size=3).map(lambda s: "/" + "/".join(s))
route_keys = st.builds(RouteKey, st.sampled_from([None, *HOSTS]), prefixes)
paths = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + slash,
    st.lists(st.sampled_from(SEGMENTS), max_size=4),
    st.sampled_from(["", "/"]),
)
request_hosts = st.one_of(
    st.none(),
    st.builds(
        lambda host, upper, port: (host.upper() if upper else host) + port,
        st.sampled_from([*HOSTS, "other.example.com"]),
        st.booleans(),
        st.sampled_from(["", ":8080", ":443"]),
    ),
)


@given(st.lists(route_keys, unique=True, max_size=8), request_hosts, paths)
@example([RouteKey(None, "/ws")], None, "/wsx")
@example([RouteKey(None, "/ws"), RouteKey("chat.example.com", "/")], "Chat.Example.com:80", "/ws/x")
def test_table_picks_what_the_rules_say(keys: list[RouteKey], host: str | None, path: str) -> None:
    routes = [(f"r{i}", key) for i, key in enumerate(keys)]
    table = RouteTable(routes)
    assert table.pick(host_name(host), path) == reference_pick(routes, host, path)
    # The sole route, when the table names one, is what every request picks.
    if table.sole is not None:
        assert table.sole == reference_pick(routes, host, path)


@pytest.mark.parametrize(
    "keys,sole",
    [([RouteKey(None, "/")], "r0"), ([RouteKey(None, "/ws")], None),
     ([RouteKey("chat.example.com", "/")], None),
     ([RouteKey(None, "/"), RouteKey(None, "/ws")], None),
     ([RouteKey(None, "/"), RouteKey("chat.example.com", "/")], None)],
)  # fmt: skip
def test_only_one_route_for_every_request_is_the_sole_one(
    keys: list[RouteKey], sole: str | None
) -> None:
    assert RouteTable([(f"r{i}", key) for i, key in enumerate(keys)]).sole == sole


@pytest.mark.parametrize(
    "path,expected",
    [("/ws", "ws"), ("/ws/", "ws"), ("/ws/x", "ws"), ("/wsx", "root"), ("/", "root"),
     ("/ws/chat/1", "ws-chat"), ("/ws/chatty", "ws"), ("", "root"), ("*", "root")],
)  # fmt: skip
def test_whole_segments(path: str, expected: str) -> None:
    table = RouteTable(
        [
            ("root", RouteKey(None, "/")),
            ("ws", RouteKey(None, "/ws")),
            ("ws-chat", RouteKey(None, "/ws/chat")),
        ]
    )
    assert table.pick(None, path) == expected


def test_a_matching_host_beats_a_longer_prefix_without_one() -> None:
    table = RouteTable(
        [("deep", RouteKey(None, "/ws/chat")), ("host", RouteKey("chat.example.com", "/"))]
    )
    assert table.pick(host_name("CHAT.example.com:8443"), "/ws/chat") == "host"
    assert table.pick(host_name("other.example.com"), "/ws/chat") == "deep"
    assert table.pick(None, "/elsewhere") is None


def test_same_match_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="'a' and 'b' have the same match"):
        RouteTable([("a", RouteKey("h", "/x")), ("b", RouteKey("h", "/x"))])


@pytest.mark.parametrize(
    "target,host,expected",
    [
        (b"/ws?x=/y", b"Chat.example.com:80", ("chat.example.com", "/ws")),
        (b"http://API.example.com:81/v1/a?q", b"chat.example.com", ("api.example.com", "/v1/a")),
        (b"http://api.example.com", None, ("api.example.com", "/")),
        (b"/ws#frag", b"[::1]:8080", ("[::1]", "/ws")),
        (b"/", None, (None, "/")),
        (b"/", b"", (None, "/")),
        (b"/", b"example.com.", ("example.com", "/")),
    ],
)
def test_request_host_and_path(
    target: bytes, host: bytes | None, expected: tuple[str | None, str]
) -> None:
    assert request_host_and_path(target, host) == expected


@pytest.mark.parametrize("bad", ["ws", "/ws/", "//ws", "/a//b", "/a/../b", "/a b", "/a?b", "/a#b"])
def test_bad_prefixes(bad: str) -> None:
    with pytest.raises(ValueError):
        check_path_prefix(bad)


# -- the route config -----------------------------------------------------------------------------
POOL = ["127.0.0.1:9001", "127.0.0.1:9002"]


def test_todays_config_is_the_default_route() -> None:
    config = build_config({"backends": POOL, "limits": {"max_connections_per_backend": 3}})
    [route] = config.route_list()
    assert (route.name, route.match.key) == ("default", RouteKey(None, "/"))
    assert route.backends == config.backends and route.limits == config.limits


def test_routes_take_the_top_level_keys_they_do_not_set() -> None:
    config = build_config(
        {
            "backends": POOL,
            "balance": "round_robin",
            "limits": {"max_connections_per_backend": 3, "queue": {"max": 5}},
            "health": {"interval": "2s"},
            "routes": [
                {
                    "name": "chat",
                    "match": {"host": "Chat.Example.com", "path_prefix": "/ws"},
                    "limits": {"max_connections_per_backend": 1},
                    "backends": ["127.0.0.1:9003"],
                },
                {"name": "api", "match": {"path_prefix": "/api"}, "balance": "p2c"},
            ],
        }
    )
    default, chat, api = config.route_list()
    assert default.name == "default" and default.limits.max_connections_per_backend == 3
    assert chat.match.key == RouteKey("chat.example.com", "/ws")
    assert chat.limits.max_connections_per_backend == 1 and chat.limits.queue.max == 5
    assert [b.address for b in chat.backends] == ["127.0.0.1:9003"]
    assert chat.balance == "round_robin" and chat.health.interval == 2.0
    assert api.backends == config.backends and api.balance == "p2c"
    assert api.limits == config.limits


def test_routes_without_top_level_backends_have_no_default_route() -> None:
    config = build_config(
        {"routes": [{"name": "chat", "match": {"path_prefix": "/ws"}, "backends": POOL}]}
    )
    assert [r.name for r in config.route_list()] == ["chat"]
    assert not config.has_default_route


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"routes": [{"name": "a", "backends": POOL}, {"name": "a", "backends": POOL}]},
            "route name 'a' appears twice",
        ),
        (
            {"backends": POOL, "routes": [{"name": "default", "match": {"path_prefix": "/x"}}]},
            "route name 'default' appears twice",
        ),
        (
            {"routes": [{"name": "a", "match": {"host": "H.example"}, "backends": POOL},
                        {"name": "b", "match": {"host": "h.example."}, "backends": POOL}]},
            "routes 'a' and 'b' have the same match",
        ),
        (
            {"backends": POOL, "routes": [{"name": "all"}]},
            "routes 'default' and 'all' have the same match",
        ),
        ({"routes": [{"name": "a", "match": {"path_prefix": "/a"}}]}, "route 'a' has no backends"),
        ({"backends": POOL, "routes": [{"name": "a", "match": {"path_prefix": "/a"},
                                         "backends": []}]},
         "route 'a' has no backends"),
        ({"backends": POOL, "routes": [{"name": "a", "match": {"path_prefix": "a"}}]},
         "routes.0.match.path_prefix: a path prefix starts with '/'"),
        ({"backends": POOL, "routes": [{"name": "a", "match": {"path_prefix": "/a/"}}]},
         "routes.0.match.path_prefix: write '/a'"),
        ({"backends": POOL, "routes": [{"name": "a", "match": {"host": "h:80"}}]},
         "routes.0.match.host: give the host without a port"),
        ({"backends": POOL, "routes": [{"name": "a/b"}]}, "routes.0.name"),
        ({"backends": POOL, "routes": [{"match": {"path_prefix": "/a"}}]},
         "routes.0.name: Field required"),
        ({"backends": POOL, "routes": [{"name": "a", "weight": 1}]},
         "routes.0.weight: unknown key"),
    ],
)  # fmt: skip
def test_bad_routes_are_one_line_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(data)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_the_effective_config_shows_each_route_whole() -> None:
    config = build_config(
        {"backends": POOL, "routes": [{"name": "chat", "match": {"path_prefix": "/ws"}}]}
    )
    [chat] = config.public_dump()["routes"]
    assert chat["match"] == {"host": None, "path_prefix": "/ws"}
    assert chat["limits"]["max_connections_per_backend"] == 2
    assert build_config(config.public_dump()) == config
