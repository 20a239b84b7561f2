"""The admin views of a snapshot, without a gateway: metric names, /stats lines, rates."""

from __future__ import annotations

import dataclasses
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from wsgate.admin.metrics import metric_families
from wsgate.admin.snapshot import (
    BackendSnapshot,
    RateHistory,
    RouteSnapshot,
    Snapshot,
    clusters_json,
    overview_json,
    stats_text,
)
from wsgate.admission import Reason
from wsgate.config import load_config


def backend(backend_id: str, **changes: Any) -> BackendSnapshot:
    values: dict[str, Any] = {
        "route": "default", "id": backend_id, "address": f"10.0.0.1:{len(backend_id)}",
        "healthy": True, "ejected": False, "draining": False, "active": 2, "active_here": 1,
        "max_connections": 2, "admitted_total": 7, "rejected_total": 3,
        "connect_failures_total": 1, "ejections_total": 0, "sessions_here": 1,
    }  # fmt: skip
    values.update(changes)
    return BackendSnapshot(**values)


def route(name: str = "default", **changes: Any) -> RouteSnapshot:
    rejected = {str(r): 0 for r in Reason}
    rejected.update(rate_limited=4, no_capacity=3)
    values: dict[str, Any] = {
        "name": name, "host": None, "path_prefix": "/", "mode": "degraded", "queued": 0,
        "admitted_total": 14, "rejected": rejected, "tokens_available": 2.5,
        "rate_per_second": 1.0, "rate_burst": 10,
    }  # fmt: skip
    values.update(changes)
    return RouteSnapshot(**values)


def snapshot(**changes: Any) -> Snapshot:
    rejected = {str(r): 0 for r in Reason}
    rejected.update(rate_limited=4, no_capacity=3)
    values: dict[str, Any] = {
        "replica": "gw-1", "time": 1_000_100.0, "started_at": 1_000_000.0, "ready": True,
        "draining": False, "store": "redis", "mode": "degraded", "live_replicas": 3,
        "store_errors_total": 5, "departures_total": 1, "tokens_available": 2.5,
        "rate_per_second": 1.0,
        "rate_burst": 10, "accepted_total": 20, "admitted_total": 14, "rejected": rejected,
        "bad_requests": {400: 2}, "closed_by_gateway": {"drain": 1}, "affinity_fallbacks": 0,
        "bytes_from_clients": 1234, "bytes_to_clients": 5678, "sessions_here": 2, "queued": 0,
        "backends": [backend("pod-a"), backend("pod-b", healthy=False, active=1, active_here=0)],
        "routes": [route()],
    }  # fmt: skip
    values.update(changes)
    return Snapshot(**values)


class _Fixed:
    def __init__(self, snap: Snapshot):
        self.snap = snap

    def collect(self) -> Any:
        return iter(metric_families(self.snap))


def exposition(snap: Snapshot) -> dict[str, Any]:
    registry = CollectorRegistry()
    registry.register(_Fixed(snap))
    text = generate_latest(registry).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == name and s.labels == labels:
            return float(s.value)
    raise KeyError((name, labels))


def test_metric_names_follow_prometheus_conventions() -> None:
    families = exposition(snapshot())
    for name, family in families.items():
        assert name.startswith("wsgate_")
        if family.type == "counter":
            assert all(s.name == name + "_total" for s in family.samples), name
        else:
            assert not name.endswith("_total"), name
    assert families["wsgate_relayed_bytes"].type == "counter"
    assert families["wsgate_backend_active_connections"].type == "gauge"


def test_metric_values_come_from_the_snapshot() -> None:
    families = exposition(snapshot())
    assert sample(families, "wsgate_rejected", "wsgate_rejected_total", reason="rate_limited") == 4
    assert sample(families, "wsgate_rejected", "wsgate_rejected_total", reason="draining") == 0
    pod_b = {"route": "default", "backend": "pod-b"}
    assert sample(families, "wsgate_backend_healthy", "wsgate_backend_healthy", **pod_b) == 0
    assert (
        sample(
            families,
            "wsgate_backend_global_active_connections",
            "wsgate_backend_global_active_connections",
            route="default",
            backend="pod-a",
        )
        == 2
    )
    assert sample(families, "wsgate_state_mode", "wsgate_state_mode", mode="degraded") == 1
    assert sample(families, "wsgate_state_mode", "wsgate_state_mode", mode="ok") == 0
    assert sample(families, "wsgate_state_errors", "wsgate_state_errors_total") == 5
    assert sample(families, "wsgate_state_departures", "wsgate_state_departures_total") == 1
    assert sample(families, "wsgate_live_replicas", "wsgate_live_replicas") == 3
    assert (
        sample(
            families, "wsgate_relayed_bytes", "wsgate_relayed_bytes_total", direction="to_clients"
        )
        == 5678
    )
    assert sample(families, "wsgate_bad_requests", "wsgate_bad_requests_total", status="400") == 2


def test_no_rate_limit_means_no_token_gauge() -> None:
    families = exposition(snapshot(tokens_available=None, rate_per_second=None, rate_burst=None))
    assert "wsgate_connect_rate_tokens_available" not in families
    assert "wsgate_connect_rate_burst" not in families


def test_clusters_has_exactly_the_documented_keys() -> None:
    data = clusters_json(snapshot())
    assert data["replica"] == "gw-1"
    assert data["state"] == {"store": "redis", "mode": "degraded"}
    assert data["backends"][1] == {
        "route": "default", "id": "pod-b", "address": "10.0.0.1:5", "healthy": False, "active": 1,
        "active_here": 0, "max_connections": 2, "admitted_total": 7, "rejected_total": 3,
    }  # fmt: skip


def test_stats_lines_carry_the_same_figures() -> None:
    text = stats_text(snapshot())
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["state.mode"] == "degraded"
    assert lines["connections.rejected_total"] == "7"
    assert lines["connections.active"] == "3"
    assert lines["connections.active_here"] == "1"
    assert lines["connections.capacity"] == "4"
    assert lines["backend.pod-b.healthy"] == "0"
    assert lines["backend.pod-a.active_here"] == "1"
    assert lines["connect_rate.tokens_available"] == "2.5"
    assert lines["bad_requests.400"] == "2"
    without_rate = stats_text(snapshot(tokens_available=None, rate_per_second=None))
    assert "connect_rate" not in without_rate


def test_overview_totals() -> None:
    data = overview_json(snapshot(), [])
    assert data["uptime"] == 100.0
    assert data["totals"]["active"] == 3
    assert data["totals"]["rejected_total"] == 7
    assert data["connect_rate"] == {"per_second": 1.0, "burst": 10, "tokens_available": 2.5}
    assert overview_json(snapshot(rate_per_second=None), [])["connect_rate"] is None


def test_draining_backends_do_not_add_capacity() -> None:
    snap = snapshot()
    snap = dataclasses.replace(snap, backends=[*snap.backends, backend("old", draining=True)])
    assert snap.capacity == 4
    assert snap.active == 5


def test_rate_history_turns_counters_into_rates() -> None:
    history = RateHistory(span=3)
    history.sample(100.0, 10, {"rate_limited": 1})
    assert history.points() == []  # one sample is no rate yet
    history.sample(101.0, 14, {"rate_limited": 1})
    history.sample(103.0, 18, {"rate_limited": 5, "no_capacity": 2})
    assert history.points() == [
        {"t": 101.0, "admitted": 4.0, "rejected": {}},
        {"t": 103.0, "admitted": 2.0, "rejected": {"rate_limited": 2.0, "no_capacity": 1.0}},
    ]
    history.sample(103.0, 30, {})  # no time passed: ignored
    history.sample(104.0, 19, {"rate_limited": 5, "no_capacity": 2})
    history.sample(105.0, 19, {"rate_limited": 5, "no_capacity": 2})
    assert [p["t"] for p in history.points()] == [103.0, 104.0, 105.0]  # span kept
    assert [p["t"] for p in history.points(since=103.0)] == [104.0, 105.0]


def test_config_dump_redacts_redis_passwords_and_the_token() -> None:
    for store in (
        "redis://:pw-one@127.0.0.1:6379/0",
        "rediss://user:pw-one@redis.example:6380/1",
        "redis://127.0.0.1:6379/0?password=pw-one&db=2",
    ):
        config = load_config(None, {"state.store": store, "admin_token": "tok-two"})
        dump = repr(config.public_dump())
        assert "pw-one" not in dump and "tok-two" not in dump
        assert "<redacted>" in config.public_dump()["state"]["store"]
        assert config.public_dump()["admin_token"] == "<redacted>"


def two_routes() -> Snapshot:
    return snapshot(
        backends=[
            backend("pod-a"),
            backend("pod-a", route="chat", active=1, active_here=1, max_connections=1),
            backend("pod-c", route="chat", active=0, active_here=0, max_connections=1),
        ],
        routes=[
            route(),
            route("chat", host="chat.example.com", path_prefix="/ws", queued=2,
                  admitted_total=5, rejected={"no_capacity": 6}, tokens_available=None,
                  rate_per_second=None, rate_burst=None),
        ],
    )  # fmt: skip


def test_every_view_shows_each_route() -> None:
    snap = two_routes()
    clusters = clusters_json(snap)
    assert [r["name"] for r in clusters["routes"]] == ["default", "chat"]
    chat = clusters["routes"][1]
    assert chat["match"] == {"host": "chat.example.com", "path_prefix": "/ws"}
    assert (chat["active"], chat["capacity"], chat["queued"]) == (1, 2, 2)
    assert (chat["admitted_total"], chat["rejected_total"]) == (5, 6)
    assert [(b["route"], b["id"]) for b in clusters["backends"]] == [
        ("default", "pod-a"), ("chat", "pod-a"), ("chat", "pod-c"),
    ]  # fmt: skip
    overview = overview_json(snap, [])
    assert overview["routes"][1]["rejected"] == {"no_capacity": 6}
    assert overview["routes"][1]["connect_rate"] is None
    assert overview["routes"][0]["connect_rate"]["burst"] == 10

    lines = dict(line.split(": ", 1) for line in stats_text(snap).splitlines())
    assert lines["route.chat.host"] == "chat.example.com"
    assert lines["route.chat.capacity"] == "2"
    assert lines["route.chat.rejected.no_capacity"] == "6"
    assert lines["route.chat.backend.pod-a.max_connections"] == "1"
    assert lines["backend.pod-a.max_connections"] == "2"  # the default route's, as before

    families = exposition(snap)
    for labels, value in (({"route": "default", "backend": "pod-a"}, 2),
                          ({"route": "chat", "backend": "pod-a"}, 1)):  # fmt: skip
        assert sample(families, "wsgate_backend_max_connections",
                      "wsgate_backend_max_connections", **labels) == value  # fmt: skip
    assert sample(families, "wsgate_route_info", "wsgate_route_info",
                  route="chat", host="chat.example.com", path_prefix="/ws") == 1  # fmt: skip
    assert sample(families, "wsgate_route_max_connections", "wsgate_route_max_connections",
                  route="chat") == 2  # fmt: skip
    assert sample(families, "wsgate_route_rejected", "wsgate_route_rejected_total",
                  route="chat", reason="no_capacity") == 6  # fmt: skip
    assert sample(families, "wsgate_route_queued_connections",
                  "wsgate_route_queued_connections", route="chat") == 2  # fmt: skip
