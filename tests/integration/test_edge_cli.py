"""``wsgate check`` with TLS: the pair is loaded, its subject and expiry printed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from wsgate.testbed.certs import TestCA
from wsgate.testbed.processes import wsgate_argv


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        wsgate_argv("check", "-c", str(config)),
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_check_prints_the_certificate(tmp_path: Path) -> None:
    pair = TestCA().issue(tmp_path, common_name="gate.example")
    config = tmp_path / "wsgate.yaml"
    config.write_text(f"tls: {{cert: {pair.cert}, key: {pair.key}}}\n")
    result = check(config)
    assert result.returncode == 0, result.stderr
    note = result.stdout.strip().splitlines()[-1]
    assert note.startswith("# tls: subject CN=gate.example")
    assert f"serial {pair.serial:x}" in note and "expires 20" in note


def test_check_refuses_a_mismatched_pair_in_one_line(tmp_path: Path) -> None:
    ca = TestCA()
    one, other = ca.issue(tmp_path, "one"), ca.issue(tmp_path, "other")
    config = tmp_path / "wsgate.yaml"
    config.write_text(f"tls: {{cert: {one.cert}, key: {other.key}}}\n")
    result = check(config)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"wsgate check: error: tls: key {other.key} does not match certificate {one.cert}"
    ]


def test_check_refuses_a_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "wsgate.yaml"
    config.write_text(f"tls: {{cert: {tmp_path}/none.crt, key: {tmp_path}/none.key}}\n")
    result = check(config)
    assert result.returncode == 2
    assert "cannot read certificate" in result.stderr and "Traceback" not in result.stderr
