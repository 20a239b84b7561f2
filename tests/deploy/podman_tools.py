"""podman for the container tests: the image built once per session, and everything a
test starts removed after it, even when it fails.

Every podman command runs with a containers.conf of its own (runc and explicit
limits: podman's defaults and crun fail where a container may not raise its own
limits), so ``podman kube play`` gets them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_IMAGE",
    "GATEWAY_IMAGE",
    "REDIS_IMAGE",
    "ROOT",
    "Podman",
    "build_images",
    "get_json",
    "get_status",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/wsgate-base:bookworm"
GATEWAY_IMAGE = "localhost/wsgate:test"
REDIS_IMAGE = "localhost/wsgate-test-redis:7"
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=1024:1024"]

[engine]
runtime = "runc"
"""


class Podman:
    """Runs podman; remembers what it made, to remove it in :meth:`clean_up`."""

    def __init__(self, workdir: Path, prefix: str) -> None:
        self.prefix = prefix
        self.conf = workdir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.played: list[Path] = []

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        done = subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()[-2000:]}")
        return done.stdout

    def network(self) -> tuple[str, str]:
        """A bridge network of the test's own: its name and its subnet."""
        name = f"{self.prefix}net"
        self("network", "create", name)
        self.networks.append(name)
        (info,) = json.loads(self("network", "inspect", name))
        return name, info["subnets"][0]["subnet"]

    def run(self, name: str, *args: str) -> str:
        """``podman run -d``: a container removed by :meth:`clean_up`."""
        full = f"{self.prefix}{name}"
        self.containers.append(full)
        self("run", "-d", "--name", full, *args)
        return full

    def ip(self, container: str, network: str) -> str:
        data = json.loads(self("inspect", container))
        address: str = data[0]["NetworkSettings"]["Networks"][network]["IPAddress"]
        return address

    def play(self, manifest: Path, network: str) -> None:
        self.played.append(manifest)
        self("kube", "play", "--network", network, str(manifest), timeout=300)

    def pods(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = json.loads(
            self("pod", "ps", "--format", "json", "--filter", f"name=^{self.prefix}")
        )
        return found

    def logs(self, container: str) -> str:
        return self("logs", container, check=False, timeout=30)[-3000:]

    def clean_up(self) -> None:
        pods = [pod["Name"] for pod in self.pods()]
        if pods:
            self("pod", "rm", "--force", "--time", "1", *pods, check=False, timeout=180)
        for manifest in reversed(self.played):
            self("kube", "down", str(manifest), check=False, timeout=120)
        for container in self.containers:
            self("rm", "--force", "--time", "0", container, check=False)
        for network in self.networks:
            self("network", "rm", "--force", network, check=False)


def build_images(podman: Podman) -> None:
    """The base (mmdebstrap), the wsgate image FROM it, and a Redis image FROM it.

    What is cached (the base's tarball, the wheelhouse, podman's layers) makes a
    second run take seconds; a fresh machine builds everything (a few minutes).
    """
    env = {**podman.env, "BASE": BASE_IMAGE, "IMAGE": GATEWAY_IMAGE}
    for step in (["base", BASE_IMAGE], ["image"]):
        done = subprocess.run(
            [str(ROOT / "scripts" / "image.sh"), *step],
            capture_output=True,
            text=True,
            timeout=1200,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"image.sh {step[0]}: {done.stderr[-3000:]}"
    podman(
        "build",
        "--runtime",
        "runc",
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=1024:1024",
        "--build-arg",
        f"BASE={BASE_IMAGE}",
        "--tag",
        REDIS_IMAGE,
        "--file",
        str(ROOT / "tests" / "deploy" / "redis.Containerfile"),
        str(ROOT / "tests" / "deploy"),
        timeout=900,
    )


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def get_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
    """Wait until ``check()`` holds; the seconds it took."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)
    return time.monotonic() - start
