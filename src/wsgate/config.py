"""The typed configuration: the one place that holds defaults and validation.

A config is read from YAML, checked by pydantic models that forbid unknown keys,
and may be overridden by command-line flags. Every user mistake ends in a
:class:`ConfigError` whose message names the key and the problem in one line.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from wsgate.routing import (
    DEFAULT_ROUTE,
    RouteKey,
    check_host,
    check_path_prefix,
    check_routes,
    inherit_route_keys,
)
from wsgate.wire import CloseCode, check_close_code

__all__ = [
    "AffinityConfig",
    "BackendSpec",
    "BackendTlsConfig",
    "Config",
    "ConfigError",
    "DnsDiscovery",
    "Duration",
    "FileDiscovery",
    "HealthConfig",
    "LimitsConfig",
    "PassiveHealthConfig",
    "ProxyProtocolConfig",
    "QueueConfig",
    "RateConfig",
    "RebalanceConfig",
    "RouteConfig",
    "RouteMatch",
    "StateConfig",
    "TimeoutsConfig",
    "TlsConfig",
    "format_duration",
    "load_config",
    "parse_address",
    "parse_duration",
    "redact_url",
]

Balance = Literal["round_robin", "least_conn", "p2c", "hash"]


class ConfigError(Exception):
    """A configuration the user must fix; the message is one line meant for them."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Turn ``500ms``, ``5s``, ``2m``, ``1h`` or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 500ms, 5s or 2m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"expected a duration like 500ms, 5s or 2m, got {value!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Write seconds back in the config's own notation."""
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]


def parse_address(value: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6, ``:port`` for the default host)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {value!r}")
    return (host or default_host), int(port)


def _check_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {value!r}")
    parse_address(value)
    return value.strip()


Address = Annotated[str, BeforeValidator(_check_address)]


def _check_cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR block like 10.0.0.0/8, got {value!r}")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"expected a CIDR block like 10.0.0.0/8, got {value!r}") from None


Cidr = Annotated[str, BeforeValidator(_check_cidr)]


def _version_text(value: object) -> object:
    # YAML reads an unquoted 1.2 as a number.
    return f"{value:g}" if isinstance(value, float) else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateConfig(_Model):
    """A token bucket: ``per_second`` tokens refill, at most ``burst`` stored."""

    per_second: float = Field(gt=0)
    burst: int = Field(default=1, ge=1)


class QueueConfig(_Model):
    """Wait for a free slot instead of answering 503 at once."""

    max: int = Field(default=0, ge=0)
    timeout: Duration = 5.0


class LimitsConfig(_Model):
    max_connections_per_backend: int = Field(default=2, ge=1)
    connect_rate: RateConfig | None = None
    client_connect_rate: RateConfig | None = None
    queue: QueueConfig = QueueConfig()
    # Concurrent connections one client address may hold, over all backends and replicas.
    max_connections_per_client: int | None = Field(default=None, ge=1)
    # What a 503 no_capacity answer tells clients to wait: nobody knows when a
    # slot frees, so this is a hint that keeps retries from hammering the gate.
    retry_after: Duration = 5.0


class BackendTlsConfig(_Model):
    """TLS toward a backend: verified against the system's CAs (or ``ca``) by default."""

    enabled: bool = True  # ``tls: false`` on a backend turns backend_tls off for it
    verify: bool = True
    ca: Path | None = None
    server_name: str | None = None  # the name to verify and send as SNI; the host otherwise


def _backend_tls(value: object) -> object:
    if isinstance(value, bool):
        return {"enabled": value}
    return value


BackendTls = Annotated[BackendTlsConfig | None, BeforeValidator(_backend_tls)]


class BackendSpec(_Model):
    address: Address
    id: str | None = None
    max_connections: int | None = Field(default=None, ge=1)
    tls: BackendTls = None  # overrides backend_tls for this backend

    @property
    def backend_id(self) -> str:
        return self.id or self.address


def _backend_from_text(value: object) -> object:
    return {"address": value} if isinstance(value, str) else value


BackendEntry = Annotated[BackendSpec, BeforeValidator(_backend_from_text)]


class DnsDiscovery(_Model):
    name: str
    port: int = Field(gt=0, lt=65536)
    refresh: Duration = 5.0
    server: Address | None = None  # resolver to ask; the system's when unset


class FileDiscovery(_Model):
    path: Path
    refresh: Duration = 1.0


def _discovery_shape(value: object) -> object:
    # `dns: {...}` and `file: PATH` are written as one-key mappings.
    if isinstance(value, dict):
        try:
            if set(value) == {"dns"}:
                return DnsDiscovery.model_validate(value["dns"])
            if set(value) == {"file"}:
                spec = value["file"]
                return FileDiscovery.model_validate(
                    {"path": spec} if isinstance(spec, str) else spec
                )
        except ValidationError as error:
            raise ValueError(f"{next(iter(value))}.{_describe(error)}") from None
        raise ValueError("expected a list of backends, {dns: {...}} or {file: PATH}")
    return value


Backends = Annotated[
    list[BackendEntry] | DnsDiscovery | FileDiscovery, BeforeValidator(_discovery_shape)
]


def _unique_backend_ids(backends: Backends) -> None:
    if isinstance(backends, list):
        seen: set[str] = set()
        for spec in backends:
            if spec.backend_id in seen:
                raise ValueError(f"backend id {spec.backend_id!r} appears twice")
            seen.add(spec.backend_id)


class PassiveHealthConfig(_Model):
    consecutive_failures: int = Field(default=5, ge=1)
    ejection: Duration = 30.0


class HealthConfig(_Model):
    enabled: bool = True
    path: str = "/health"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(default=2, ge=1)
    unhealthy_threshold: int = Field(default=3, ge=1)
    passive: PassiveHealthConfig | None = None


class TimeoutsConfig(_Model):
    connect: Duration = 2.0
    header: Duration = 10.0
    idle: Duration | None = None


class AffinityConfig(_Model):
    by: Literal["none", "ip", "cookie", "header"] = "none"
    cookie: str = "wsgate_backend"
    header: str = "X-Session-Key"


class StateConfig(_Model):
    store: str = "memory"
    namespace: str = "default"
    lease_ttl: Duration = 15.0
    timeout: Duration = 0.1
    on_failure: Literal["closed", "local"] = "closed"
    # How often each replica looks for others whose process ended (their slots
    # are freed within about three of these, not at their lease's end); 0
    # leaves it to the leases.
    departure_check: Duration = 0.5
    # Instead of a URL in ``store``: a master found through Sentinel, or a Cluster.
    sentinels: list[Address] | None = Field(default=None, min_length=1)
    service: str | None = None
    sentinel_password: str | None = None
    cluster: list[Address] | None = Field(default=None, min_length=1)
    password: str | None = None

    @model_validator(mode="after")
    def _one_kind_of_redis(self) -> StateConfig:
        if self.sentinels is not None and self.cluster is not None:
            raise ValueError("use sentinels or cluster, not both")
        named = self.sentinels is not None or self.cluster is not None
        if named and self.store != "memory":
            raise ValueError("use a store URL or sentinels/cluster, not both")
        if self.sentinels is not None and not self.service:
            raise ValueError("sentinels need service: the master's name in Sentinel")
        if self.sentinels is None and (self.service or self.sentinel_password):
            raise ValueError("service and sentinel_password need sentinels")
        if self.password is not None and not named:
            raise ValueError("password goes with sentinels or cluster (a URL carries its own)")
        return self

    @property
    def shared(self) -> bool:
        """Whether admission state is in Redis (shared by replicas) rather than memory."""
        return self.store != "memory" or self.sentinels is not None or self.cluster is not None

    @field_validator("store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"expected 'memory' or a redis:// URL, got {value!r}")
        return value

    @field_validator("namespace")
    @classmethod
    def _plain_namespace(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
            raise ValueError("use letters, digits, '.', '_' or '-' only")
        return value


class TlsConfig(_Model):
    """TLS on the listener. The files are read at start, on SIGHUP and when they change."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_version_text)] = "1.2"
    handshake_timeout: Duration = 10.0


class ProxyProtocolConfig(_Model):
    """PROXY protocol v1/v2 from these sources (and only from them, always)."""

    trusted: list[Cidr] = Field(min_length=1)
    timeout: Duration = 3.0


def _state_from_text(value: object) -> object:
    return {"store": value} if isinstance(value, str) else value


class RebalanceConfig(_Model):
    enabled: bool = False
    max_skew: float = Field(default=1, ge=0)
    rate: float = 2.0
    close_code: int = int(CloseCode.SERVICE_RESTART)
    interval: Duration = 1.0

    @field_validator("close_code")
    @classmethod
    def _sendable(cls, value: int) -> int:
        return check_close_code(value)

    @field_validator("rate", mode="before")
    @classmethod
    def _rate(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().removesuffix("/s")
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a rate like 2/s") from None
        return value


# -- routes: each with the pool keys of its own; see wsgate.routing -------------------------------
class RouteMatch(_Model):
    host: str | None = None
    path_prefix: str = "/"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return None if value is None else check_host(value)

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        return check_path_prefix(value)

    @property
    def key(self) -> RouteKey:
        return RouteKey(self.host, self.path_prefix)


class RouteConfig(_Model):
    """One route: what it matches and its own pool, policy, limits and checks."""

    name: str
    match: RouteMatch = RouteMatch()
    backends: Backends = Field(default_factory=list)
    balance: Balance = "least_conn"
    affinity: AffinityConfig = AffinityConfig()
    limits: LimitsConfig = LimitsConfig()
    health: HealthConfig = HealthConfig()

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # The name goes into Redis keys, metric labels and URLs.
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError(f"use up to 64 letters, digits, '.', '_' or '-', got {value!r}")
        return value

    @model_validator(mode="after")
    def _own_backend_ids(self) -> RouteConfig:
        _unique_backend_ids(self.backends)
        return self


class Config(_Model):
    listen: Address = "127.0.0.1:8080"
    tls: TlsConfig | None = None
    proxy_protocol: ProxyProtocolConfig | None = None
    trusted_proxies: list[Cidr] = Field(default_factory=list)
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    admin: Address | None = "127.0.0.1:9901"
    admin_token: str | None = None
    state: Annotated[StateConfig, BeforeValidator(_state_from_text)] = StateConfig()
    backends: Backends = Field(default_factory=list)
    balance: Balance = "least_conn"
    affinity: AffinityConfig = AffinityConfig()
    limits: LimitsConfig = LimitsConfig()
    health: HealthConfig = HealthConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    max_head_size: int = Field(default=16 * 1024, ge=1024)
    connect_attempts: int = Field(default=3, ge=1)
    drain_timeout: Duration = 30.0
    max_connection_duration: Duration | None = None
    rebalance: RebalanceConfig = RebalanceConfig()
    backend_tls: BackendTls = None  # TLS toward every backend (a backend's own tls wins)
    access_log: bool = True
    replica_id: str | None = None

    routes: list[RouteConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _routes_inherit(cls, data: object) -> object:
        return inherit_route_keys(data)

    @model_validator(mode="after")
    def _valid_pools_and_routes(self) -> Config:
        _unique_backend_ids(self.backends)
        # Without routes, an empty pool is today's gateway waiting for its backends.
        check_routes(
            (r.name, r.match.key, bool(self.routes) and r.backends == []) for r in self.route_list()
        )
        return self

    @property
    def has_default_route(self) -> bool:
        """Whether the top-level keys form a route: always without ``routes``; with
        them, when the top-level ``backends`` is set."""
        return not self.routes or self.backends != []

    def route_list(self) -> list[RouteConfig]:
        """Every route, the default route (the top-level keys) first when there is one."""
        if not self.has_default_route:
            return list(self.routes)
        default = RouteConfig(
            name=DEFAULT_ROUTE,
            backends=self.backends,
            balance=self.balance,
            affinity=self.affinity,
            limits=self.limits,
            health=self.health,
        )
        return [default, *self.routes]

    def public_dump(self) -> dict[str, Any]:
        """The effective configuration as plain data, secrets redacted."""
        data = self.model_dump(mode="json")
        data["backends"] = _backends_dump(self.backends, data["backends"])
        for route, dumped in zip(self.routes or [], data.get("routes") or [], strict=True):
            if route.backends is not None:
                dumped["backends"] = _backends_dump(route.backends, dumped["backends"])
        data["state"]["store"] = redact_url(self.state.store)
        for secret in ("password", "sentinel_password"):
            if data["state"][secret] is not None:
                data["state"][secret] = "<redacted>"
        if self.admin_token:
            data["admin_token"] = "<redacted>"
        return data


def _backends_dump(backends: object, dumped: Any) -> Any:
    """Discovery written back as the one-key mapping it is read from, so the dump reloads."""
    if isinstance(backends, DnsDiscovery):
        return {"dns": dumped}
    if isinstance(backends, FileDiscovery):
        return {"file": dumped}
    return dumped


def redact_url(url: str) -> str:
    """Hide the password of a URL such as ``redis://:secret@host:6379/0``.

    redis-py also takes ``?password=...`` in the query; that is hidden too.
    """
    parts = urlsplit(url)
    if parts.query and "password=" in parts.query:
        query = re.sub(r"(^|&)password=[^&]*", r"\1password=<redacted>", parts.query)
        parts = parts._replace(query=query)
        url = urlunsplit(parts)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:<redacted>@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    # Drop pydantic's names for union branches and validators ("list[...]", "function-before[...]").
    where = ".".join(str(part) for part in first["loc"] if "[" not in str(part))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}" if where else message


def build_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"invalid config: {_describe(error)}") from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read a YAML file (if any), apply overrides (dotted keys allowed), validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise ConfigError(f"cannot read config {path}: {error.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config {path} is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
        data = loaded
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = target.get(key)
            if not isinstance(node, dict):
                node = {}
                target[key] = node
            target = node
        target[last] = value
    return build_config(data)
