"""The kustomize overlays: they render, every object validates, and the objects agree.

Fast and offline: ``kubectl kustomize`` renders, kubernetes-validate checks every
built-in kind against the schemas it ships (Kubernetes 1.32, strict: unknown fields
are errors), KEDA's ScaledObject is checked against a schema written from KEDA's
published CRD, and ``wsgate check`` reads the gateway's config from the ConfigMap.
"""

from __future__ import annotations

import copy
import json
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
from manifests import (
    DEPLOY,
    OVERLAYS,
    Rendered,
    container_port,
    kubectl,
    matches,
    pre_stop_seconds,
    render,
)

from wsgate.config import Config, DnsDiscovery, load_config, parse_address
from wsgate.testbed.processes import wsgate_argv

KUBERNETES = "1.32.0"
KEDA_SCHEMA = Path(__file__).with_name("keda-scaledobject.schema.json")
GATEWAY = "wsgate"
BACKEND_SERVICE = "wsgate-backend"
REDIS_SERVICE = "wsgate-redis"
CLUSTER_DOMAIN = "svc.cluster.local"

pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl (with kustomize) is not installed: see docs/deploy.md"
)


@cache
def rendered(overlay: str) -> Rendered:
    return Rendered(render(DEPLOY / "overlays" / overlay))


def gateway_config(objects: Rendered, tmp_path: Path) -> tuple[Path, Config]:
    """The ConfigMap's wsgate.yaml, written out and loaded as the gateway loads it."""
    path = tmp_path / "wsgate.yaml"
    path.write_text(objects.configmap("wsgate-config")["data"]["wsgate.yaml"])
    return path, load_config(path)


def gateway_container(objects: Rendered) -> dict:
    (container,) = objects.one("Deployment", GATEWAY)["spec"]["template"]["spec"]["containers"]
    return container


def validate(obj: dict) -> None:
    if obj["kind"] == "ScaledObject":
        jsonschema.validate(obj, json.loads(KEDA_SCHEMA.read_text()))
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_seed_topology(overlay: str) -> None:
    objects = rendered(overlay)
    kinds = {obj["kind"] for obj in objects.objects}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    assert objects.one("Deployment", GATEWAY)["spec"]["replicas"] == 2
    assert objects.one("Deployment", "wsgate-backend")["spec"]["replicas"] == 4
    assert {
        obj["metadata"].get("namespace") for obj in objects.objects if obj["kind"] != "Namespace"
    } == {"wsgate"}


def test_dev_runs_the_seed_load() -> None:
    load = rendered("dev").one("Deployment", "wsgate-load")
    assert load["spec"]["replicas"] == 10
    (container,) = load["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "load"
    for flag in (
        "--clients=1",
        "--connections=5",
        "--connect-interval=10s",
        "--message-interval=10s-20s",
        "--health-port=8081",
    ):
        assert flag in args


def test_prod_scales_and_leaves_the_load_out() -> None:
    objects = rendered("prod")
    assert not [d for d in objects.all("Deployment") if d["metadata"]["name"] == "wsgate-load"]
    hpa = objects.one("HorizontalPodAutoscaler", GATEWAY)
    assert hpa["spec"]["scaleTargetRef"]["name"] == GATEWAY
    scaled = objects.one("ScaledObject", "wsgate-backend")
    objects.one("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    (trigger,) = scaled["spec"]["triggers"]
    assert "wsgate_backend_global_active_connections" in trigger["metadata"]["query"]
    public = objects.one("Service", "wsgate-public")
    assert public["spec"]["type"] == "LoadBalancer"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_strictly(overlay: str) -> None:
    for obj in rendered(overlay).objects:
        validate(obj)


def test_validation_rejects_what_a_cluster_would() -> None:
    """The strict checks are on: a misspelt field or a number as a KEDA string fails."""
    objects = rendered("prod")
    deployment = copy.deepcopy(objects.one("Deployment", GATEWAY))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    scaled = copy.deepcopy(objects.one("ScaledObject", "wsgate-backend"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 1.6
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_configmap_passes_wsgate_check(overlay: str, tmp_path: Path) -> None:
    path, _ = gateway_config(rendered(overlay), tmp_path)
    done = subprocess.run(
        wsgate_argv("check", "-c", str(path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_are_the_configs(overlay: str, tmp_path: Path) -> None:
    objects = rendered(overlay)
    _, config = gateway_config(objects, tmp_path)
    container = gateway_container(objects)
    assert config.admin is not None
    admin_port = parse_address(config.admin)[1]
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], container_port(container, ready["port"])) == ("/ready", admin_port)
    assert (live["path"], container_port(container, live["port"])) == ("/healthz", admin_port)
    service = objects.one("Service", GATEWAY)
    (port,) = service["spec"]["ports"]
    assert container_port(container, port["targetPort"]) == parse_address(config.listen)[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_outlasts_the_prestop_and_the_drain(overlay: str, tmp_path: Path) -> None:
    objects = rendered(overlay)
    _, config = gateway_config(objects, tmp_path)
    pod = objects.one("Deployment", GATEWAY)["spec"]["template"]["spec"]
    pause = pre_stop_seconds(gateway_container(objects))
    assert pause > 0
    assert pod["terminationGracePeriodSeconds"] > config.drain_timeout + pause


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    objects = rendered(overlay)
    templates = objects.pod_templates()
    for deployment, template in templates:
        assert matches(
            deployment["spec"]["selector"]["matchLabels"], template["metadata"]["labels"]
        )
    # Every Service, PDB selects the pods of exactly one Deployment.
    for obj in [*objects.all("Service"), *objects.all("PodDisruptionBudget")]:
        spec = obj["spec"]
        selector = spec["selector"].get("matchLabels", spec["selector"])
        chosen = [d for d, t in templates if matches(selector, t["metadata"]["labels"])]
        assert len(chosen) == 1, f"{obj['kind']} {obj['metadata']['name']} selects {len(chosen)}"
        if obj["kind"] == "Service":
            (container,) = chosen[0]["spec"]["template"]["spec"]["containers"]
            for port in spec["ports"]:
                container_port(container, port["targetPort"])
    for _, template in templates:
        for constraint in template["spec"].get("topologySpreadConstraints", []):
            assert matches(
                constraint["labelSelector"]["matchLabels"], template["metadata"]["labels"]
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_names_the_services(overlay: str, tmp_path: Path) -> None:
    objects = rendered(overlay)
    _, config = gateway_config(objects, tmp_path)
    namespace = objects.one("Deployment", GATEWAY)["metadata"]["namespace"]
    assert isinstance(config.backends, DnsDiscovery)
    headless = objects.one("Service", BACKEND_SERVICE)
    assert headless["spec"]["clusterIP"] == "None"
    assert config.backends.name == f"{BACKEND_SERVICE}.{namespace}.{CLUSTER_DOMAIN}"
    (port,) = headless["spec"]["ports"]
    assert port["port"] == config.backends.port
    redis = urlsplit(config.state.store)
    assert redis.hostname == f"{REDIS_SERVICE}.{namespace}.{CLUSTER_DOMAIN}"
    (redis_port,) = objects.one("Service", REDIS_SERVICE)["spec"]["ports"]
    assert redis.port == redis_port["port"]


def test_the_load_connects_to_the_gateway_service() -> None:
    objects = rendered("dev")
    (container,) = objects.one("Deployment", "wsgate-load")["spec"]["template"]["spec"][
        "containers"
    ]
    url = urlsplit(container["args"][1])
    (port,) = objects.one("Service", GATEWAY)["spec"]["ports"]
    assert (url.scheme, url.hostname, url.port) == ("ws", GATEWAY, port["port"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_locked_down(overlay: str) -> None:
    for deployment, template in rendered(overlay).pod_templates():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, deployment["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(container["resources"]["limits"])


def test_no_proxy_protocol_on_one_side_only(tmp_path: Path) -> None:
    """The NLB sends PROXY headers only if the gateway expects them, and the other way."""
    objects = rendered("prod")
    path, _ = gateway_config(objects, tmp_path)
    annotations = objects.one("Service", "wsgate-public")["metadata"]["annotations"]
    nlb_sends = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol" in annotations
    gateway_expects = "proxy_protocol" in path.read_text()
    assert nlb_sends == gateway_expects
