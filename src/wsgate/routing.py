"""Routes: which pool a request goes to, from its host and path. No I/O here.

A route matches a request by an optional host and a path prefix. The rules:

- a route whose host matches beats every route without a host;
- among those, the longest matching path prefix wins;
- a prefix matches by whole path segments: ``/ws`` matches ``/ws``, ``/ws/`` and
  ``/ws/x``, never ``/wsx``; ``/`` matches every path;
- hosts compare case-insensitively, and the request's port is ignored
  (``Chat.Example.com:8443`` matches the route host ``chat.example.com``);
- no route matches: the request has no route (the gateway answers 404).

No two routes may share a (host, prefix) pair, so at most one route wins. The
path is matched as the client sent it, without decoding percent-escapes, and
without its query.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The route the top-level pool keys form.
DEFAULT_ROUTE = "default"
# The pool keys a route may set. Those it leaves out take the top-level values; in
# the mappings, key by key (a route's `limits: {queue: ...}` keeps the top-level cap).
ROUTE_POOL_KEYS = ("backends", "balance")
ROUTE_MAPPING_KEYS = ("affinity", "limits", "health")

__all__ = [
    "DEFAULT_ROUTE",
    "ROUTE_MAPPING_KEYS",
    "ROUTE_POOL_KEYS",
    "RouteKey",
    "RouteTable",
    "check_host",
    "check_path_prefix",
    "check_routes",
    "host_name",
    "inherit_route_keys",
    "request_host_and_path",
    "route_namespace",
]

_HOST = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")
_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%]+")


def check_host(value: str) -> str:
    """A route's host, lower-cased; ``ValueError`` naming what is wrong with it."""
    host = value.strip().lower().removesuffix(".")
    if not host.startswith("[") and ":" in host:
        raise ValueError(f"give the host without a port (any port matches), got {value!r}")
    if not _HOST.fullmatch(host):
        raise ValueError(f"expected a host name such as chat.example.com, got {value!r}")
    return host


def check_path_prefix(value: str) -> str:
    """A route's path prefix as written; ``ValueError`` naming what is wrong with it."""
    if not value.startswith("/"):
        raise ValueError(f"a path prefix starts with '/', got {value!r}")
    if value == "/":
        return value
    if value.endswith("/"):
        trimmed = value.rstrip("/") or "/"
        raise ValueError(
            f"write {trimmed!r}, not {value!r}: a prefix matches whole segments, "
            f"so {trimmed!r} already matches {trimmed.rstrip('/')}/..."
        )
    for segment in value[1:].split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"a path prefix has no empty, '.' or '..' segments, got {value!r}")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"a path prefix holds no query, fragment, spaces or control characters, "
                f"got {value!r}"
            )
    return value


def host_name(host: str | None) -> str | None:
    """The host of a ``Host`` header without its port, lower-cased; None when absent."""
    if not host:
        return None
    text = host.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        text = text[: end + 1] if end > 0 else text
    else:
        text = text.partition(":")[0]
    return text.removesuffix(".") or None


def request_host_and_path(target: bytes, host_header: bytes | None) -> tuple[str | None, str]:
    """(host, path) of a request: an absolute-form target's authority wins over ``Host``
    (RFC 9112 3.2.2); the path loses its query and fragment."""
    text = target.decode("latin-1")
    host = host_header.decode("latin-1") if host_header is not None else None
    if not text.startswith("/") and "://" in text:
        authority_and_path = text.partition("://")[2]
        slash = authority_and_path.find("/")
        if slash < 0:
            host, text = authority_and_path, "/"
        else:
            host, text = authority_and_path[:slash], authority_and_path[slash:]
        host = host.rpartition("@")[2]
    path = text.partition("?")[0].partition("#")[0]
    return host_name(host), path


@dataclass(frozen=True, slots=True)
class RouteKey:
    """What a route matches on: a host (or any) and a path prefix."""

    host: str | None
    path_prefix: str

    def __str__(self) -> str:
        return f"host {self.host or '(any)'}, path_prefix {self.path_prefix}"


class RouteTable:
    """Picks the route of a request: a dictionary lookup per candidate prefix of the
    path (at most one per segment), for the request's host and then for any host."""

    def __init__(self, routes: Iterable[tuple[str, RouteKey]]):
        self._names: dict[str | None, dict[str, str]] = {}
        self._longest = 0
        for name, key in routes:
            prefixes = self._names.setdefault(key.host, {})
            if key.path_prefix in prefixes:
                raise ValueError(
                    f"routes {prefixes[key.path_prefix]!r} and {name!r} have the same match ({key})"
                )
            prefixes[key.path_prefix] = name
            self._longest = max(self._longest, len(key.path_prefix))
        # One route for any host and every path (most gateways have only it) is
        # the pick of every request: no request needs reading for it.
        only = self._names.get(None)
        self.sole = only.get("/") if len(self._names) == 1 and only and len(only) == 1 else None

    def pick(self, host: str | None, path: str) -> str | None:
        """The name of the route for a request to ``host`` (already :func:`host_name`)
        and ``path``, or None when no route matches."""
        if host is not None:
            by_prefix = self._names.get(host)
            if by_prefix is not None and (name := self._longest_match(by_prefix, path)):
                return name
        by_prefix = self._names.get(None)
        return self._longest_match(by_prefix, path) if by_prefix is not None else None

    def _longest_match(self, by_prefix: dict[str, str], path: str) -> str | None:
        # Candidates, longest first: the path itself, then the path cut before each '/'.
        end = len(path)
        while end > 1:
            if end <= self._longest and (name := by_prefix.get(path[:end])) is not None:
                return name
            end = path.rfind("/", 0, end)
        return by_prefix.get("/")


def route_namespace(namespace: str, route: str) -> str:
    """The state namespace of a route: its own, so its caps, rates and queue are its own.

    The default route keeps the namespace itself (today's keys stay where they
    are); another route gets ``NS:ROUTE``, and so the hash tag ``{wsgate:NS:ROUTE}``
    of its own (neither a namespace nor a route name may hold a ``:``).
    """
    return namespace if route == DEFAULT_ROUTE else f"{namespace}:{route}"


def inherit_route_keys(data: Any) -> Any:
    """A raw config whose routes hold the top-level values of the pool keys they do
    not set (``data`` itself is not changed)."""
    if not isinstance(data, dict) or not isinstance(data.get("routes"), list):
        return data
    routes = []
    for route in data["routes"]:
        if isinstance(route, dict):
            route = dict(route)
            for key in ROUTE_POOL_KEYS:
                if key not in route and key in data:
                    route[key] = data[key]
            for key in ROUTE_MAPPING_KEYS:
                top, own = data.get(key), route.get(key, {})
                if isinstance(top, dict) and isinstance(own, dict):
                    route[key] = {**top, **own}
        routes.append(route)
    return {**data, "routes": routes}


def check_routes(routes: Iterable[tuple[str, RouteKey, bool]]) -> None:
    """Check ``(name, key, pool is empty)`` of every route: names unique, matches
    unique, no empty pool. ``ValueError`` names the first problem."""
    listed = list(routes)
    names: set[str] = set()
    for name, _, empty in listed:
        if name in names:
            why = " (the top-level keys are the route 'default')" if name == DEFAULT_ROUTE else ""
            raise ValueError(f"route name {name!r} appears twice{why}")
        names.add(name)
        if empty:
            raise ValueError(f"route {name!r} has no backends")
    try:
        RouteTable((name, key) for name, key, _ in listed)
    except ValueError as error:
        if f"{DEFAULT_ROUTE!r}" in str(error):
            raise ValueError(f"{error}; the top-level backends form the route 'default'") from None
        raise
