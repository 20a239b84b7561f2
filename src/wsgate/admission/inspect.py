"""``wsgate state``: the shared admission state in Redis, as a table or as JSON.

It reads everything in one call of the state script (``inspect``), so the
replicas, the counts and the rate state it shows are from one instant. It
writes nothing. docs/state.md explains each key and number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.typing import EncodableT
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from wsgate.admission.redis import connect, key_prefix, run_script
from wsgate.admission.redis.connection import Target as StoreTarget
from wsgate.admission.redis.connection import describe_target, state_target
from wsgate.admission.redis.presence import client_ids, run_id_of
from wsgate.config import ConfigError, load_config, parse_duration
from wsgate.routing import route_namespace
from wsgate.runtime import run_async

__all__ = ["add_arguments", "describe", "read_state", "render", "run"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
# Counting per-client buckets scans keys; stop after this many so a huge
# keyspace never makes the command slow.
_BUCKET_SCAN_LIMIT = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis",
        metavar="URL",
        default=os.environ.get("WSGATE_REDIS", DEFAULT_URL),
        help=f"the Redis the gateways share (default: $WSGATE_REDIS or {DEFAULT_URL})",
    )
    parser.add_argument("--namespace", default="default", help="the gateways' state namespace")
    parser.add_argument(
        "--route",
        action="append",
        metavar="NAME",
        help="show this route's state (repeatable; default: the route 'default')",
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="take the Redis, the namespace and every route from the gateways' config",
    )
    parser.add_argument("--watch", action="store_true", help="refresh until interrupted")
    parser.add_argument(
        "--interval", default="1s", metavar="DURATION", help="refresh period with --watch (1s)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON (one line per refresh)")
    parser.add_argument(
        "--timeout", default="2s", metavar="DURATION", help="give up on Redis after this long"
    )


# What to read: (the route's name, or None for a plain namespace; the namespace to read).
Target = tuple[str | None, str]


def run(args: argparse.Namespace) -> int:
    url, namespace = str(args.redis), str(args.namespace)
    target: StoreTarget = url
    routes: list[str] | None = args.route
    if args.config:
        config = load_config(args.config)
        if not config.state.shared:
            raise ConfigError(
                f"{args.config}: state is memory, so there is no shared state to show"
            )
        # A Sentinel service or a Cluster is reached as the gateways reach it.
        target, namespace = state_target(config.state), config.state.namespace
        routes = [route.name for route in config.route_list()]
    elif urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"--redis: expected a redis://, rediss:// or unix:// URL, got {url!r}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", namespace):
        raise ConfigError("--namespace: use letters, digits, '.', '_' or '-' only")
    for route in routes or []:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", route):
            raise ConfigError(f"--route: {route!r} is not a route name")
    targets: list[Target] = (
        [(route, route_namespace(namespace, route)) for route in routes]
        if routes
        else [(None, namespace)]
    )
    try:
        interval = parse_duration(args.interval)
        timeout = parse_duration(args.timeout)
    except ValueError as error:
        raise ConfigError(f"--interval/--timeout: {error}") from None
    return run_async(
        _show(
            target,
            targets,
            watch=bool(args.watch),
            as_json=bool(args.json),
            interval=max(0.1, interval),
            patience=max(0.01, timeout),
        )
    )


async def _show(
    store: StoreTarget,
    targets: list[Target],
    *,
    watch: bool,
    as_json: bool,
    interval: float,
    patience: float,
) -> int:
    client = connect(store, patience)
    shown = describe_target(store)  # as every line and error shows it, without passwords
    try:
        states = [await _read_or_explain(client, shown, target, patience) for target in targets]
        if not watch:
            _print(states, as_json)
            return 0
        if as_json:
            for _ in range(sys.maxsize):
                _print(states, as_json=True)
                sys.stdout.flush()
                await asyncio.sleep(interval)
                states = [await _read_softly(client, shown, t, patience) for t in targets]
            return 0
        from rich.live import Live

        with Live(_render_all(states), auto_refresh=False, console=Console()) as live:
            for _ in range(sys.maxsize):
                await asyncio.sleep(interval)
                states = [await _read_softly(client, shown, t, patience) for t in targets]
                live.update(_render_all(states), refresh=True)
        return 0
    finally:
        await client.aclose()


async def _read_or_explain(
    client: aioredis.Redis, shown: str, target: Target, patience: float
) -> dict[str, Any]:
    try:
        return await _read_target(client, shown, target, patience)
    except (RedisError, OSError, TimeoutError) as error:
        reason = str(error) or type(error).__name__
        raise ConfigError(
            f"cannot read the state from {shown}: {reason} "
            "(is redis-server running there? pass its URL with --redis)"
        ) from None


async def _read_softly(
    client: aioredis.Redis, shown: str, target: Target, patience: float
) -> dict[str, Any]:
    """While watching, an unreachable Redis is shown, not fatal."""
    try:
        return await _read_target(client, shown, target, patience)
    except (RedisError, OSError, TimeoutError) as error:
        route, namespace = target
        state = {"store": shown, "namespace": namespace, "error": str(error) or "timeout"}
        return state if route is None else {"route": route, **state}


async def _read_target(
    client: aioredis.Redis, shown: str, target: Target, patience: float
) -> dict[str, Any]:
    route, namespace = target
    state = await read_state(client, shown, namespace, patience)
    return state if route is None else {"route": route, **state}


def _render_all(states: list[dict[str, Any]]) -> RenderableType:
    return Group(*(render(state) for state in states))


def _print(states: list[dict[str, Any]], as_json: bool) -> None:
    """One namespace as it always was; routes as ``{"routes": [...]}``, each naming its route."""
    if as_json:
        document = states[0] if "route" not in states[0] else {"routes": states}
        print(json.dumps(document, sort_keys=True))
    else:
        Console().print(_render_all(states))


async def read_state(
    client: aioredis.Redis, shown: str, namespace: str, patience: float = 2.0
) -> dict[str, Any]:
    """One consistent reading of a namespace's state (see :func:`describe`)."""
    async with asyncio.timeout(patience):
        raw = await run_script(client, namespace, "inspect", 0)
        buckets = await _count_client_buckets(client, namespace)
        names = _flat(raw[9]) if len(raw) > 9 else {}
        open_names = await _open_connections(client, names)
    return describe(
        raw, store=shown, namespace=namespace, client_buckets=buckets, open_names=open_names
    )


async def _open_connections(client: aioredis.Redis, names: dict[str, str]) -> dict[str, bool]:
    """Whether this server still has each of the replicas' named connections.

    A name is ``run_id:client_id``: only those of this server can be asked about,
    and a Cluster's commands may go to any node, so it is not asked. A name left
    out is not known.
    """
    if not names or isinstance(client, aioredis.RedisCluster):
        return {}
    try:
        run_id = run_id_of(await client.info("server"))
        ours = [name for name in names.values() if name.partition(":")[0] == run_id]
        if not ours:
            return {}
        ids: list[EncodableT] = [name.partition(":")[2] for name in ours]
        listed = client_ids(await client.client_list(client_id=ids))
    except RedisError:
        return {}  # CLIENT or INFO refused: not known
    return {name: name.partition(":")[2] in listed for name in ours}


async def _count_client_buckets(client: aioredis.Redis, namespace: str) -> int:
    pattern = key_prefix(namespace) + ":rate:ip:*"
    count = 0
    # scan_iter walks every primary of a Cluster, the one server otherwise.
    async for _ in client.scan_iter(match=pattern, count=1000):
        count += 1
        if count >= _BUCKET_SCAN_LIMIT:
            break
    return count


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flat(values: Sequence[Any]) -> dict[str, str]:
    return {_text(values[i]): _text(values[i + 1]) for i in range(0, len(values), 2)}


def _rate(per_second: str | None, burst: str | None) -> dict[str, float] | None:
    if not per_second or float(per_second) <= 0:
        return None
    return {"per_second": float(per_second), "burst": float(burst or 1)}


def describe(
    raw: Sequence[Any],
    *,
    store: str,
    namespace: str,
    client_buckets: int = 0,
    open_names: Mapping[str, bool] | None = None,
) -> dict[str, Any]:
    """Turn the script's ``inspect`` reply into JSON-ready data. Pure.

    ``open_names``: whether the server still has each of the replicas' named
    connections (a name left out is not known), for each replica's ``connection``.
    """
    now_ms = float(_text(raw[0])) / 1000
    expiries = _flat(raw[1])
    renewed = _flat(raw[2])
    totals = {k: int(v) for k, v in _flat(raw[3]).items()}
    caps = {k: int(v) for k, v in _flat(raw[4]).items()}
    limits = _flat(raw[5])
    rate_offset = float(_text(raw[6])) / 1e6
    held_nested = raw[7]
    held: dict[str, dict[str, int]] = {}
    for i in range(0, len(held_nested), 2):
        held[_text(held_nested[i])] = {
            k: int(v) for k, v in _flat(cast(Sequence[Any], held_nested[i + 1])).items()
        }

    watched = _flat(raw[9]) if len(raw) > 9 else {}
    seen = _flat(raw[10]) if len(raw) > 10 else {}

    replicas = []
    for replica, expiry in expiries.items():
        last = renewed.get(replica)
        replicas.append(
            {
                "id": replica,
                "lease_age": round((now_ms - float(last)) / 1000, 3) if last else None,
                "expires_in": round((float(expiry) - now_ms) / 1000, 3),
                "held": held.get(replica, {}),
                "slots": sum(held.get(replica, {}).values()),
                "connection": _connection(
                    watched.get(replica), seen.get(replica), now_ms, open_names
                ),
            }
        )

    backends = []
    names = sorted(set(totals) | set(caps) | {b for h in held.values() for b in h})
    for backend in names:
        held_by = {r: h[backend] for r, h in held.items() if h.get(backend)}
        cap = caps.get(backend)
        live = totals.get(backend, 0)
        backends.append(
            {
                "id": backend,
                "live": live,
                "cap": cap,
                "over_cap": cap is not None and live > cap,
                "held_by": held_by,
            }
        )

    rate = _rate(limits.get("rate_per_second"), limits.get("rate_burst"))
    if rate is not None:
        pending = max(0.0, rate_offset)
        rate["tokens"] = round(max(0.0, rate["burst"] - pending * rate["per_second"]), 3)
    client_rate = _rate(limits.get("client_per_second"), limits.get("client_burst"))
    if client_rate is not None:
        client_rate["buckets"] = client_buckets

    known_caps = [b["cap"] for b in backends if b["cap"] is not None]
    return {
        "store": store,
        "namespace": namespace,
        "server_time": round(now_ms / 1000, 3),
        "replicas": replicas,
        "backends": backends,
        "rate": rate,
        "client_rate": client_rate,
        "totals": {
            "replicas": len(replicas),
            "backends": len(backends),
            "live": sum(totals.values()),
            "capacity": sum(known_caps) if len(known_caps) == len(backends) else None,
            "held": sum(r["slots"] for r in replicas),
            # Client addresses holding connections under max_connections_per_client.
            "clients": int(_text(raw[8])) if len(raw) > 8 else 0,
        },
    }


def _connection(
    name: str | None, seen_until: str | None, now_ms: float, open_names: Mapping[str, bool] | None
) -> dict[str, Any] | None:
    """The connection a replica is watched by (docs/state.md, "Departures"), or None."""
    if not name:
        return None
    return {
        "name": name,
        # True: the server has it; False: closed (a departure is due); None: not known.
        "open": (open_names or {}).get(name),
        # How long the replica has said it lives for (it is not departed before).
        "quiet_for": round(max(0.0, float(seen_until) - now_ms) / 1000, 3) if seen_until else 0.0,
    }


def _connection_cell(connection: dict[str, Any] | None) -> Text:
    if connection is None:
        return Text("-")
    if connection["open"] is None:
        return Text("?")
    if connection["open"]:
        return Text("open")
    quiet = connection["quiet_for"]
    return Text(f"closed, departs in {quiet:.1f}s" if quiet else "closed", style="red")


def render(state: dict[str, Any]) -> RenderableType:
    """The rich view of :func:`describe`'s data."""
    route = f"  route {state['route']}" if "route" in state else ""
    title = Text.assemble(
        ("wsgate state", "bold"), route, f"  namespace {state['namespace']}  ·  {state['store']}"
    )
    if "error" in state:
        return Group(title, Text(f"Redis unavailable: {state['error']}", style="bold red"))
    totals = state["totals"]
    capacity = "?" if totals["capacity"] is None else str(totals["capacity"])
    summary = Text(
        f"{totals['replicas']} replicas  ·  {totals['live']}/{capacity} slots in use  ·  "
        f"{totals['backends']} backends  ·  {totals['clients']} clients counted"
    )

    replicas = Table(title="replicas", title_justify="left", expand=False)
    replicas.add_column("replica")
    replicas.add_column("lease age", justify="right")
    replicas.add_column("expires in", justify="right")
    replicas.add_column("slots", justify="right")
    replicas.add_column("watched connection")
    for replica in state["replicas"]:
        age = replica["lease_age"]
        left = replica["expires_in"]
        replicas.add_row(
            replica["id"],
            "-" if age is None else f"{age:.1f}s",
            Text(f"{left:.1f}s") if left >= 0 else Text("expired", style="red"),
            str(replica["slots"]),
            _connection_cell(replica.get("connection")),
        )

    backends = Table(title="backends", title_justify="left", expand=False)
    backends.add_column("backend")
    backends.add_column("live / cap", justify="right")
    backends.add_column("use")
    backends.add_column("held by")
    for backend in state["backends"]:
        cap = backend["cap"]
        live = backend["live"]
        style = "red" if backend["over_cap"] else ("yellow" if cap and live >= cap else "green")
        bar = ""
        if cap:
            filled = min(10, round(10 * live / cap))
            bar = "█" * filled + "·" * (10 - filled)
        backends.add_row(
            backend["id"],
            Text(f"{live} / {'?' if cap is None else cap}", style=style),
            Text(bar, style=style),
            "  ".join(f"{r}:{n}" for r, n in sorted(backend["held_by"].items())),
        )

    if not state["replicas"] and not state["backends"]:
        hint = Text(
            f"nothing registered in namespace {state['namespace']!r}: no gateway uses it now "
            "(check --namespace against the gateways' state.namespace)",
            style="yellow",
        )
        return Group(title, hint)
    lines: list[RenderableType] = [title, summary, replicas, backends]
    rate = state["rate"]
    if rate is not None:
        lines.append(
            Text(
                f"connect rate: {rate['tokens']:.1f} of {rate['burst']:g} tokens "
                f"({rate['per_second']:g}/s)"
            )
        )
    else:
        lines.append(Text("connect rate: unlimited"))
    client = state["client_rate"]
    if client is not None:
        lines.append(
            Text(
                f"client rate: {client['per_second']:g}/s, burst {client['burst']:g}; "
                f"{client['buckets']} client buckets not yet full"
            )
        )
    return Group(*lines)
