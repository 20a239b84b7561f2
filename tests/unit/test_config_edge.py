"""Config keys of the edge: tls, proxy_protocol, trusted_proxies, per-client cap, backend TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from wsgate.config import ConfigError, build_config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tls": {"cert": "a.crt"}}, "tls.key: Field required"),
        ({"tls": {"cert": "a", "key": "b", "min_version": "1.1"}}, "tls.min_version"),
        ({"tls": {"cert": "a", "key": "b", "colour": 1}}, "tls.colour: unknown key"),
        ({"proxy_protocol": {"trusted": []}}, "proxy_protocol.trusted"),
        ({"proxy_protocol": {"trusted": ["10.0.0.0/33"]}}, "expected a CIDR block"),
        (
            {"proxy_protocol": {"trusted": ["10.0.0.0/8"], "timeout": "soon"}},
            "proxy_protocol.timeout",
        ),
        ({"trusted_proxies": ["not-a-network"]}, "trusted_proxies.0: expected a CIDR block"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies"),
        ({"forwarded_header": "x-real-ip"}, "forwarded_header"),
        ({"limits": {"max_connections_per_client": 0}}, "limits.max_connections_per_client"),
        ({"backend_tls": {"verify": "maybe"}}, "backend_tls"),
    ],
)
def test_bad_values_are_one_line(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(data)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_defaults_trust_no_one() -> None:
    config = build_config({})
    assert config.tls is None and config.proxy_protocol is None
    assert config.trusted_proxies == [] and config.limits.max_connections_per_client is None
    assert config.forwarded_header == "x-forwarded-for"


def test_values_as_written() -> None:
    config = build_config(
        {
            "tls": {"cert": "/tls/tls.crt", "key": "/tls/tls.key", "min_version": 1.3},
            "proxy_protocol": {"trusted": ["10.0.0.7/8", "fd00::/8"], "timeout": "500ms"},
            "trusted_proxies": ["172.16.0.0/12"],
            "limits": {"max_connections_per_client": 4},
            "backend_tls": True,
            "backends": [{"address": "10.1.0.1:8443", "tls": {"verify": False}}, "10.1.0.2:80"],
        }
    )
    assert config.tls is not None and config.tls.cert == Path("/tls/tls.crt")
    assert config.tls.min_version == "1.3"
    assert config.proxy_protocol is not None
    assert config.proxy_protocol.trusted == ["10.0.0.0/8", "fd00::/8"]
    assert config.proxy_protocol.timeout == 0.5
    assert config.backend_tls is not None and config.backend_tls.verify
    assert isinstance(config.backends, list)
    assert config.backends[0].tls is not None and not config.backends[0].tls.verify
    assert config.backends[1].tls is None
    assert config.public_dump()["proxy_protocol"]["timeout"] == "500ms"
