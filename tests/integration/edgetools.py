"""Helpers of the edge tests: metrics read from the admin API, access-log records, TLS."""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from wsgate.testbed.certs import IssuedPair, TestCA
from wsgate.testbed.topology import GatewayProcess

__all__ = [
    "access_records",
    "client_context",
    "metric",
    "peer_serial",
    "secret_volume",
    "swap_secret",
]


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics (0 when the series is absent)."""
    with urllib.request.urlopen(gateway.admin_url + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def access_records(gateway: GatewayProcess) -> list[dict[str, Any]]:
    """The access log so far: the JSON lines of the gateway's stdout."""
    return [
        json.loads(line) for line in gateway.process.output().splitlines() if line.startswith("{")
    ]


def client_context(ca: TestCA) -> ssl.SSLContext:
    """A client that verifies the gateway against the test's own CA, as a browser would."""
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(["http/1.1"])
    return context


def peer_serial(ssl_object: Any) -> int:
    der = ssl_object.getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


def secret_volume(root: Path, pair: IssuedPair) -> tuple[Path, Path]:
    """A directory laid out as a Kubernetes Secret volume: tls.crt -> ..data/tls.crt."""
    root.mkdir(parents=True, exist_ok=True)
    swap_secret(root, pair.cert.read_bytes(), pair.key.read_bytes(), "..first")
    for name in ("tls.crt", "tls.key"):
        (root / name).symlink_to(f"..data/{name}")
    return root / "tls.crt", root / "tls.key"


def swap_secret(root: Path, cert: bytes, key: bytes, version: str) -> None:
    """What the kubelet does on an update: a new directory, then ..data relinked atomically."""
    target = root / version
    target.mkdir()
    (target / "tls.crt").write_bytes(cert)
    (target / "tls.key").write_bytes(key)
    link = root / "..data_tmp"
    link.symlink_to(version)
    link.replace(root / "..data")
