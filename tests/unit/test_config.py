"""The configuration: durations, shapes, defaults and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsgate.config import (
    ConfigError,
    DnsDiscovery,
    FileDiscovery,
    build_config,
    format_duration,
    load_config,
    parse_address,
    parse_duration,
    redact_url,
)


@pytest.mark.parametrize(
    "text,seconds",
    [("500ms", 0.5), ("5s", 5), ("2m", 120), ("1h", 3600), (3, 3), ("1.5s", 1.5), ("7", 7)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 parsecs", "-1s", "", True, None, "s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_durations_print_back_in_config_notation() -> None:
    assert [format_duration(s) for s in (0.5, 5, 120, 1.5)] == ["500ms", "5s", "2m", "1.5s"]


def test_addresses() -> None:
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_address("[::1]:8080") == ("::1", 8080)
    assert parse_address(":9000") == ("127.0.0.1", 9000)
    for bad in ("nope", "host:0", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_the_issue_example_validates(tmp_path: Path) -> None:
    path = tmp_path / "wsgate.yaml"
    path.write_text(
        """
listen: 127.0.0.1:8080
admin: 127.0.0.1:9901
state: memory
backends:
  - 127.0.0.1:9001
  - {address: 127.0.0.1:9002, id: pod-b, max_connections: 3}
balance: least_conn
affinity: {by: none}
limits:
  max_connections_per_backend: 2
  connect_rate: {per_second: 1, burst: 10}
  client_connect_rate: null
  queue: {max: 0, timeout: 5s}
health: {path: /health, interval: 5s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3}
timeouts: {connect: 2s, header: 10s, idle: null}
"""
    )
    config = load_config(path)
    assert isinstance(config.backends, list)
    assert [b.backend_id for b in config.backends] == ["127.0.0.1:9001", "pod-b"]
    assert config.backends[1].max_connections == 3
    assert config.limits.connect_rate is not None and config.limits.connect_rate.burst == 10
    assert config.health.interval == 5.0 and config.timeouts.connect == 2.0


def test_state_shorthand_and_long_form() -> None:
    assert build_config({"state": "redis://h:6379/0"}).state.store == "redis://h:6379/0"
    long = build_config(
        {"state": {"store": "redis://h/0", "lease_ttl": "15s", "on_failure": "local"}}
    )
    assert long.state.lease_ttl == 15 and long.state.on_failure == "local"


def test_state_on_sentinel_or_cluster() -> None:
    sentinel = build_config(
        {"state": {"sentinels": ["s1:26379", "s2:26379"], "service": "main", "password": "pw"}}
    ).state
    assert sentinel.shared and sentinel.sentinels == ["s1:26379", "s2:26379"]
    cluster = build_config({"state": {"cluster": ["c1:7000"], "namespace": "x"}})
    assert cluster.state.shared and cluster.state.cluster == ["c1:7000"]
    assert not build_config({}).state.shared
    dumped = build_config(
        {"state": {"sentinels": ["s:1"], "service": "m", "sentinel_password": "pw"}}
    ).public_dump()["state"]
    assert dumped["sentinel_password"] == "<redacted>" and "pw" not in str(dumped)


def test_discovery_forms() -> None:
    dns = build_config({"backends": {"dns": {"name": "svc.local", "port": 8081, "refresh": "5s"}}})
    assert isinstance(dns.backends, DnsDiscovery)
    file = build_config({"backends": {"file": "backends.yaml"}})
    assert isinstance(file.backends, FileDiscovery)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"lissten": "x"}, "lissten: unknown key"),
        ({"backends": ["nope"]}, "backends.0.address: expected host:port"),
        ({"backends": [{"address": "a:1", "bogus": 1}]}, "backends.0.bogus: unknown key"),
        ({"backends": ["a:1", "a:1"]}, "appears twice"),
        ({"limits": {"max_connections_per_backend": 0}}, "limits.max_connections_per_backend"),
        ({"state": "http://x"}, "state.store: expected 'memory' or a redis:// URL"),
        ({"backends": {"dns": {"name": "x"}}}, "dns.port: Field required"),
        ({"rebalance": {"close_code": 1005}}, "cannot be sent"),
        ({"balance": "random"}, "balance"),
        ({"state": {"sentinels": ["s:1"], "service": "m", "cluster": ["c:1"]}}, "not both"),
        ({"state": {"sentinels": ["s:1"]}}, "sentinels need service"),
        ({"state": {"store": "redis://h/0", "cluster": ["c:1"]}}, "a store URL or sentinels"),
        ({"state": {"service": "m"}}, "service and sentinel_password need sentinels"),
        ({"state": {"store": "redis://h/0", "password": "x"}}, "password goes with"),
        ({"state": {"cluster": ["nope"]}}, "state.cluster.0: expected host:port"),
        ({"state": {"sentinels": []}}, "state.sentinels"),
    ],
)
def test_errors_name_the_key_in_one_line(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        build_config(data)
    text = str(error.value)
    assert message in text and "\n" not in text


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_overrides_use_dotted_keys() -> None:
    config = load_config(None, {"limits.max_connections_per_backend": 7, "backends": ["h:1"]})
    assert config.limits.max_connections_per_backend == 7


def test_public_dump_redacts_secrets() -> None:
    config = build_config({"state": "redis://:hunter2@r:6379/0", "admin_token": "tok"})
    dump = config.public_dump()
    assert "hunter2" not in str(dump) and "tok" not in str(dump.get("admin_token"))
    assert redact_url("redis://u:p@h:1/0") == "redis://u:<redacted>@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


_WITHOUT_THE_RELAY = """
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wsgate.gateway._relay":
            raise ImportError("the C extension is not built here")
        return None

sys.meta_path.insert(0, Blocker())
from wsgate.config import ConfigError, build_config
config = build_config({"backends": ["127.0.0.1:9001"], "rebalance": {"close_code": 1013}})
try:
    build_config({"backends": ["127.0.0.1:9001"], "rebalance": {"close_code": 1006}})
except ConfigError as error:
    print("refused:", error)
print("close code", config.rebalance.close_code)
print("relay loaded:", any(name.startswith("wsgate.gateway") for name in sys.modules))
"""


def test_a_config_is_validated_without_the_compiled_relay() -> None:
    # Checking a config (CI, an editor, another OS) must not need the C extension.
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_THE_RELAY],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("refused:") and "1006 cannot be sent" in lines[0]
    assert lines[1:] == ["close code 1013", "relay loaded: False"]


def test_the_effective_config_of_discovered_pools_reads_back_the_same() -> None:
    # `wsgate check` prints public_dump(); discovery must come back as `dns:` / `file:`.
    config = build_config(
        {
            "backends": {"dns": {"name": "pods.example.internal", "port": 8080}},
            "routes": [
                {"name": "chat", "match": {"path_prefix": "/chat"}, "backends": {"file": "p.txt"}}
            ],
        }
    )
    again = build_config(config.public_dump())
    assert isinstance(again.backends, DnsDiscovery)
    assert again.backends == config.backends
    assert isinstance(again.routes[0].backends, FileDiscovery)
    assert again.public_dump() == config.public_dump()
