"""The rendered manifests as plain data: rendering with kustomize, then lookups (no I/O after)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEPLOY",
    "OVERLAYS",
    "Rendered",
    "container_port",
    "kubectl",
    "matches",
    "pre_stop_seconds",
    "render",
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ("dev", "prod")

Obj = dict[str, Any]


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(overlay: Path) -> list[Obj]:
    """``kubectl kustomize`` of a directory: every object it renders."""
    done = subprocess.run(
        [kubectl() or "kubectl", "kustomize", str(overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed: {done.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(done.stdout) if obj]


@dataclass
class Rendered:
    """One overlay's objects, looked up by kind and name."""

    objects: list[Obj]

    def all(self, kind: str) -> list[Obj]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str) -> Obj:
        found = [obj for obj in self.all(kind) if obj["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}"
        return found[0]

    def configmap(self, prefix: str) -> Obj:
        """The generated ConfigMap (kustomize adds a hash to its name)."""
        found = [obj for obj in self.all("ConfigMap") if obj["metadata"]["name"].startswith(prefix)]
        assert len(found) == 1, f"{len(found)} ConfigMaps named {prefix}*"
        return found[0]

    def pod_templates(self) -> list[tuple[Obj, Obj]]:
        """(Deployment, its pod template) for every Deployment."""
        return [(obj, obj["spec"]["template"]) for obj in self.all("Deployment")]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def container_port(container: Obj, port: int | str) -> int:
    """A probe's or Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {container['name']} has no port named {port}"
    return int(numbers[0])


def pre_stop_seconds(container: Obj) -> float:
    """How long the container's preStop hook pauses (``sleep N``, or the sleep action)."""
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"preStop runs {command}, not a sleep"
    return float(command[1])
