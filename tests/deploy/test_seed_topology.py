"""The seed topology from the dev overlay's manifests, run by ``podman kube play``:
Redis, two gateways sharing it, four demo backends found by DNS, and the seed load
(ten pods of five connections). The caps hold exactly, by the backends' own counts.

What kube play cannot run is stood in for, and docs/deploy.md says so: it has no
Services and no cluster DNS, so a small DNS server (cluster_dns.py, in a container
on the test's network) answers the names the config and the load use, as a
cluster's DNS would (the headless Service: every backend; the gateway's Service:
one gateway per query, as a ClusterIP spreads connections). Every pod gets it
through ``dnsConfig``, as a kubelet writes the cluster's resolver into pods. Images
are the locally built ones; the load starts once the gateways are ready; the
containers' ``ports`` lists are left out (see :func:`write_manifest`).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from manifests import DEPLOY, Rendered, container_port, render
from podman_tools import (
    GATEWAY_IMAGE,
    REDIS_IMAGE,
    ROOT,
    Podman,
    get_json,
    get_status,
    wait_for,
)

from wsgate.config import DnsDiscovery, load_config

pytestmark = [pytest.mark.slow, pytest.mark.containers]

NAMESPACE = "wsgate"
GATEWAYS = 2
BACKENDS = 4
LOADS = 10
CAP = 2
# kube play runs these kinds; the Services, the PDB and the Namespace are a cluster's.
PLAYABLE = {"Deployment", "ConfigMap"}


def seed_overlay(workdir: Path, prefix: str, nameserver: str) -> Path:
    """The dev overlay with the local images and the stand-in DNS, named for this test."""
    overlay = workdir / "overlay"
    overlay.mkdir()
    dns = {
        "nameservers": [nameserver],
        "searches": [f"{NAMESPACE}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        "options": [{"name": "ndots", "value": "5"}],
    }
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / "overlays" / "dev", overlay)],
        "namePrefix": prefix,
        "images": [
            {"name": "localhost/wsgate", "newName": GATEWAY_IMAGE.split(":")[0], "newTag": "test"},
            {
                "name": "docker.io/library/redis",
                "newName": REDIS_IMAGE.split(":")[0],
                "newTag": "7",
            },
        ],
        "patches": [
            {
                "target": {"kind": "Deployment"},
                "patch": yaml.safe_dump(
                    [
                        {"op": "add", "path": "/spec/template/spec/dnsPolicy", "value": "None"},
                        {"op": "add", "path": "/spec/template/spec/dnsConfig", "value": dns},
                    ]
                ),
            }
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return overlay


def write_manifest(path: Path, objects: list[dict[str, Any]]) -> Path:
    """The objects kube play runs, without their ``ports`` lists.

    podman 4.3's kube play publishes every ``containerPort`` on the host, so two
    replicas cannot both start: the lists go, and probes name their ports by number.
    """
    playable = copy.deepcopy([o for o in objects if o["kind"] in PLAYABLE])
    for obj in playable:
        if obj["kind"] != "Deployment":
            continue
        for container in obj["spec"]["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                for action in ("httpGet", "tcpSocket"):
                    if action in container.get(probe, {}):
                        check = container[probe][action]
                        check["port"] = container_port(container, check["port"])
            container.pop("ports", None)
    path.write_text(yaml.safe_dump_all(playable))
    return path


def stats_lines(url: str) -> dict[str, str]:
    with urllib.request.urlopen(url, timeout=2) as answer:
        text = answer.read().decode()
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def test_seed_topology_holds_the_caps_exactly(podman: Podman, tmp_path: Path) -> None:
    network, subnet = podman.network()
    nameserver = str(ipaddress.ip_network(subnet).network_address + 250)
    records_dir = tmp_path / "dns"
    records_dir.mkdir()
    records = records_dir / "records.json"
    records.write_text("{}")
    podman.run(
        "dns", "--network", network, "--ip", nameserver, "--read-only",
        "--sysctl", "net.ipv4.ip_unprivileged_port_start=53",
        "--volume", f"{records_dir}:/records:ro",
        "--volume", f"{ROOT / 'tests' / 'deploy' / 'cluster_dns.py'}:/cluster_dns.py:ro",
        "--entrypoint", "python3", GATEWAY_IMAGE, "/cluster_dns.py", "/records/records.json",
    )  # fmt: skip

    prefix = podman.prefix
    objects = Rendered(render(seed_overlay(tmp_path, prefix, nameserver)))
    config_text = objects.configmap(f"{prefix}wsgate-config")["data"]["wsgate.yaml"]
    (tmp_path / "wsgate.yaml").write_text(config_text)
    config = load_config(tmp_path / "wsgate.yaml")
    assert isinstance(config.backends, DnsDiscovery)
    load_deployment = objects.one("Deployment", f"{prefix}wsgate-load")
    system = [o for o in objects.objects if o is not load_deployment]

    def pod_container(deployment: str, index: int) -> str:
        (container,) = objects.one("Deployment", f"{prefix}{deployment}")["spec"]["template"][
            "spec"
        ]["containers"]
        name = f"{prefix}{deployment}-pod-{index}-{container['name']}"
        if name not in podman.containers:
            podman.containers.append(name)  # its log is shown if the test fails
        return name

    podman.play(write_manifest(tmp_path / "system.yaml", system), network)
    redis_ip = podman.ip(pod_container("wsgate-redis", 0), network)
    gateway_ips = [podman.ip(pod_container("wsgate", i), network) for i in range(GATEWAYS)]
    backend_ips = [podman.ip(pod_container("wsgate-backend", i), network) for i in range(BACKENDS)]
    gateway_service = f"wsgate.{NAMESPACE}.svc.cluster.local"
    answers = {
        "names": {
            config.backends.name: backend_ips,
            urlsplit(config.state.store).hostname: [redis_ip],
            gateway_service: gateway_ips,
        },
        "services": [gateway_service],
    }
    (records_dir / "records.tmp").write_text(json.dumps(answers))
    (records_dir / "records.tmp").rename(records)

    def system_ready() -> bool:
        for ip in gateway_ips:
            if get_status(f"http://{ip}:9901/ready") != 200:
                return False
            clusters = get_json(f"http://{ip}:9901/clusters")
            healthy = [b for b in clusters["backends"] if b["healthy"]]
            if len(healthy) != BACKENDS or clusters["state"]["mode"] != "ok":
                return False
            # A replica learns of the other at its next sync with the store, which may
            # come after it is ready: the shares are only settled once both count two.
            if stats_lines(f"http://{ip}:9901/stats")["state.live_replicas"] != str(GATEWAYS):
                return False
        return True

    wait_for(
        "both gateways ready, seeing each other and four healthy backends", system_ready, 180, 0.5
    )

    podman.play(write_manifest(tmp_path / "load.yaml", [load_deployment]), network)
    load_ips = [podman.ip(pod_container("wsgate-load", i), network) for i in range(LOADS)]

    peaks: dict[str, int] = {}

    def backends_full_and_talking() -> bool:
        counts = [get_json(f"http://{ip}:8081/stats") for ip in backend_ips]
        for ip, count in zip(backend_ips, counts, strict=True):
            peaks[ip] = max(
                peaks.get(ip, 0), count["active_connections"], count["peak_connections"]
            )
        return all(c["active_connections"] == CAP and c["messages"] >= CAP for c in counts)

    wait_for("every backend at its cap, with messages flowing", backends_full_and_talking, 150, 0.5)
    time.sleep(5)  # a little longer: refused clients keep retrying
    backends_full_and_talking()
    assert peaks == {ip: CAP for ip in backend_ips}, "a backend held more than its cap"

    views = [get_json(f"http://{ip}:9901/clusters")["backends"] for ip in gateway_ips]
    held = [sum(b["active_here"] for b in view) for view in views]
    assert sum(held) == CAP * BACKENDS
    assert all(h > 0 for h in held), f"sessions per gateway: {held}: both must admit"
    refused = sum(b["rejected_total"] for view in views for b in view)
    assert refused > 0, "the load asks for 50 connections: the gateways must refuse some"
    for ip in load_ips:
        assert get_status(f"http://{ip}:8081/health") == 200
