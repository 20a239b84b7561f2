"""The image, run as the manifests run it: read-only root, non-root, every capability
dropped. A WebSocket goes through it to a demo backend; SIGTERM closes the session
with 1001 and the container exits 0 well within ``drain_timeout``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from podman_tools import GATEWAY_IMAGE, Podman, get_json, get_status, wait_for
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = [pytest.mark.slow, pytest.mark.containers]

DRAIN_TIMEOUT = 20.0
# As the manifests run it, but as the image's own user (the manifests name it too).
LOCKED_DOWN = (
    "--read-only",
    "--cap-drop",
    "all",
    "--security-opt",
    "no-new-privileges",
)


def host_uid(podman: Podman, container: str) -> int:
    """The user the container's first process runs as, as the host's kernel sees it."""
    pid = podman("inspect", "--format", "{{.State.Pid}}", container).strip()
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_gateway_image_serves_and_drains_read_only(podman: Podman, tmp_path: Path) -> None:
    network, _ = podman.network()
    backend = podman.run(
        "backend", "--network", network, *LOCKED_DOWN, GATEWAY_IMAGE,
        "backend", "--host", "0.0.0.0", "--port", "8081", "--pod-id", "pod-a",
    )  # fmt: skip
    backend_ip = podman.ip(backend, network)
    config = tmp_path / "wsgate.yaml"
    config.write_text(
        "listen: 0.0.0.0:8080\n"
        "admin: 0.0.0.0:9901\n"
        f"backends: [{backend_ip}:8081]\n"
        "health: {interval: 500ms, healthy_threshold: 1}\n"
        f"drain_timeout: {DRAIN_TIMEOUT:.0f}s\n"
    )
    config.chmod(0o644)
    started = time.monotonic()
    gateway = podman.run(
        "gateway", "--network", network, *LOCKED_DOWN,
        "--volume", f"{config}:/etc/wsgate/wsgate.yaml:ro", GATEWAY_IMAGE,
    )  # fmt: skip
    ip = podman.ip(gateway, network)
    ready_after = wait_for(
        "/ready answers 200", lambda: get_status(f"http://{ip}:9901/ready") == 200, 60
    )
    since_run = time.monotonic() - started
    print(f"gateway ready {since_run:.2f} s after podman run, {ready_after:.2f} s after its IP")
    assert host_uid(podman, gateway) == 10001
    assert (
        podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", gateway).strip() == "true"
    )
    wait_for(
        "the backend is healthy",
        lambda: get_json(f"http://{ip}:9901/clusters")["backends"][0]["healthy"],
        30,
    )

    with connect(f"ws://{ip}:8080/", open_timeout=10) as session:
        session.send("hello")
        answer = json.loads(session.recv(timeout=10))
        assert (answer["pod"], answer["echo"]) == ("pod-a", "hello")
        assert get_json(f"http://{backend_ip}:8081/stats")["active_connections"] == 1

        podman("kill", "--signal", "TERM", gateway)
        signalled = time.monotonic()
        with pytest.raises(ConnectionClosed) as closed:
            session.recv(timeout=DRAIN_TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    exit_code = podman("wait", gateway, timeout=DRAIN_TIMEOUT + 30).strip()
    took = time.monotonic() - signalled
    assert exit_code == "0"
    assert took < DRAIN_TIMEOUT, f"the drain took {took:.1f} s"
    wait_for(
        "the backend saw the session end",
        lambda: get_json(f"http://{backend_ip}:8081/stats")["active_connections"] == 0,
        10,
    )
