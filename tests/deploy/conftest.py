"""Fixtures of the container tests: the images (built once a session) and a podman
whose containers, pods and networks are removed after each test, even on failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from podman_tools import Podman, build_images


def _cannot_run_containers() -> str | None:
    if os.geteuid() != 0:
        return "the container tests run podman as root"
    if shutil.which("podman") is None and shutil.which("apt-get") is None:
        return "podman is not installed (scripts/image.sh installs it from Debian's packages)"
    return None


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> None:
    why = _cannot_run_containers()
    if why is not None:
        # .ci/run asks for them: there, not running them is a failure.
        if os.environ.get("WSGATE_CONTAINER_TESTS") == "required":
            pytest.fail(why)
        pytest.skip(why)
    workdir = tmp_path_factory.mktemp("images")
    builder = Podman(workdir, f"wsgate-build-{os.getpid()}-")
    build_images(builder)


@pytest.fixture
def podman(images: None, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Podman]:
    tool = Podman(tmp_path, f"wsgate-t{os.getpid()}-")
    try:
        yield tool
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for container in tool.containers:
                print(f"----- {container} -----\n{tool.logs(container)}")
        tool.clean_up()
