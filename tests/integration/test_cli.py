"""The command line: help everywhere, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsgate_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "command", ["serve", "check", "backend", "load", "demo", "state", "status"]
)
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: wsgate " + command in result.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["serve", "--rate", "fast"], "--rate"),
        (["serve", "--balance", "random"], "--balance"),
        (
            ["serve", "--max-per-backend", "0", "--backend", "127.0.0.1:1"],
            "max_connections_per_backend",
        ),
        (["serve", "--backend", "nohost"], "backends.0.address"),
        (["serve", "-c", "/nonexistent.yaml"], "cannot read config"),
        (["check", "--burst", "3"], "--burst needs --rate"),
        (["nosuchcommand"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0] and "Traceback" not in result.stderr


def test_bad_config_file(tmp_path: Path) -> None:
    path = tmp_path / "wsgate.yaml"
    path.write_text("backends: [127.0.0.1:9001]\nlimits: {queue: {max: -1}}\n")
    result = run("serve", "-c", str(path))
    assert result.returncode == 2
    expected = "invalid config: limits.queue.max: Input should be greater than or equal to 0"
    assert result.stderr.strip().splitlines() == [f"wsgate serve: error: {expected}"]


def test_check_prints_the_effective_config(tmp_path: Path) -> None:
    path = tmp_path / "wsgate.yaml"
    path.write_text("backends: [127.0.0.1:9001]\nstate: redis://:secret@127.0.0.1:6379/0\n")
    result = run("check", "-c", str(path), "--rate", "2", "--burst", "4")
    assert result.returncode == 0, result.stderr
    assert "per_second: 2.0" in result.stdout and "burst: 4" in result.stdout
    assert "secret" not in result.stdout


def test_port_in_use_is_a_clear_error(procs: ProcessGroup) -> None:
    port = free_port()
    procs.start("backend", wsgate_argv("backend", "--port", str(port)), port=("127.0.0.1", port))
    result = run(
        "serve", "--listen", f"127.0.0.1:{port}", "--backend", "127.0.0.1:1", "--admin", "off"
    )
    assert result.returncode == 2
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


BAD_ROUTES = {
    "duplicate names": (
        "routes:\n"
        "  - {name: chat, match: {path_prefix: /ws}, backends: [127.0.0.1:9001]}\n"
        "  - {name: chat, match: {path_prefix: /api}, backends: [127.0.0.1:9002]}\n",
        "invalid config: route name 'chat' appears twice",
    ),
    "same match": (
        "backends: [127.0.0.1:9001]\nroutes:\n"
        "  - {name: a, match: {host: Chat.example.com, path_prefix: /ws}}\n"
        "  - {name: b, match: {host: chat.example.com, path_prefix: /ws}}\n",
        "invalid config: routes 'a' and 'b' have the same match "
        "(host chat.example.com, path_prefix /ws)",
    ),
    "empty pool": (
        "routes:\n  - {name: chat, match: {path_prefix: /ws}, backends: []}\n",
        "invalid config: route 'chat' has no backends",
    ),
    "bad prefix": (
        "backends: [127.0.0.1:9001]\nroutes:\n  - {name: chat, match: {path_prefix: ws}}\n",
        "invalid config: routes.0.match.path_prefix: a path prefix starts with '/', got 'ws'",
    ),
}


@pytest.mark.parametrize("command", ["check", "serve"])
@pytest.mark.parametrize("case", sorted(BAD_ROUTES))
def test_bad_routes_are_one_line_and_exit_2(tmp_path: Path, command: str, case: str) -> None:
    text, expected = BAD_ROUTES[case]
    path = tmp_path / "wsgate.yaml"
    path.write_text(text)
    result = run(command, "-c", str(path), "--admin", "off")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"wsgate {command}: error: {expected}"]
