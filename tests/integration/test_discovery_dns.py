"""DNS discovery against real DNS servers on loopback: a small dnslib one, and dnsmasq."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
from dnslib import RCODE
from tinydns import TinyDns

from wsgate.config import BackendSpec, DnsDiscovery
from wsgate.testbed.processes import ProcessGroup
from wsgate.upstreams.discovery import DiscoveryError, DnsSource, diff_backends

NAME = "ws.test.local"


class Follower:
    """Pulls snapshots in the background, as the backend pool does."""

    def __init__(self, source: DnsSource):
        self.received: asyncio.Queue[tuple[float, list[BackendSpec]]] = asyncio.Queue()
        self.task = asyncio.create_task(self._follow(source))

    async def _follow(self, source: DnsSource) -> None:
        async for snapshot in source.snapshots():
            self.received.put_nowait((time.monotonic(), snapshot))

    async def next(self, within: float = 3.0) -> tuple[float, list[BackendSpec]]:
        async with asyncio.timeout(within):
            return await self.received.get()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def source(port: int, refresh: float = 0.2) -> DnsSource:
    return DnsSource(
        DnsDiscovery(name=NAME, port=8081, refresh=refresh, server=f"127.0.0.1:{port}")
    )


def ids(snapshot: list[BackendSpec]) -> list[str]:
    return [spec.backend_id for spec in snapshot]


async def test_answers_are_followed_within_a_refresh(dns: TinyDns):
    dns.records[NAME] = ["127.0.0.3", "127.0.0.2"]
    follower = Follower(source(dns.port, refresh=0.2))
    try:
        _, first = await follower.next()
        assert ids(first) == ["127.0.0.2:8081", "127.0.0.3:8081"]

        changed_at = time.monotonic()
        dns.records[NAME] = ["127.0.0.3", "::1", "127.0.0.4"]
        seen_at, second = await follower.next()
        assert seen_at - changed_at < 0.2 + 0.3  # one refresh, and some slack
        changes = diff_backends(first, second)
        assert ids(list(changes.added)) == ["127.0.0.4:8081", "[::1]:8081"]
        assert ids(list(changes.removed)) == ["127.0.0.2:8081"]
        assert ids(list(changes.kept)) == ["127.0.0.3:8081"]

        del dns.records[NAME]  # NXDOMAIN: the Service has no pods left
        _, third = await follower.next()
        assert third == []
    finally:
        await follower.stop()
    assert {qtype for _, qtype in dns.seen} == {"A", "AAAA"}


async def test_no_answer_keeps_the_backends_seen_last(
    dns: TinyDns, caplog: pytest.LogCaptureFixture
):
    dns.records[NAME] = ["127.0.0.2"]
    follower = Follower(source(dns.port, refresh=0.1))
    try:
        await follower.next()
        with caplog.at_level(logging.WARNING, logger="wsgate.discovery"):
            dns.records[NAME] = []
            dns.failing["AAAA"] = RCODE.SERVFAIL  # half an answer is no answer
            await asyncio.sleep(0.5)
            dns.failing.clear()
            dns.silent = True
            await asyncio.sleep(0.6)
            assert follower.received.empty()
        dns.silent = False
        _, snapshot = await follower.next()
        assert snapshot == []
        assert [r.getMessage() for r in caplog.records] == [
            f"DNS discovery failed: AAAA {NAME} from 127.0.0.1:{dns.port}: the server answered "
            "SERVFAIL; keeping the 1 backends seen last",
            f"DNS discovery failed: A {NAME} from 127.0.0.1:{dns.port}: no answer within 0.2s; "
            "keeping the 1 backends seen last",
        ]
    finally:
        await follower.stop()


async def test_a_large_answer_comes_by_tcp(dns: TinyDns):
    dns.records[NAME] = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(400)]
    snapshot = await source(dns.port).observe()
    assert len(snapshot) == 400
    assert ("tcp", "A") in dns.seen


async def test_an_unreachable_server_is_one_clear_error():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DiscoveryError) as caught:
        await source(port).observe()
    assert time.monotonic() - started < 1.0
    assert str(caught.value) in {
        f"DNS discovery failed: {qtype} {NAME} from 127.0.0.1:{port}: Connection refused"
        for qtype in ("A", "AAAA")
    }


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")
async def test_dnsmasq_hosts_file(procs: ProcessGroup, tmp_path: Path):
    """dnsmasq, as a cluster DNS would: authoritative for the zone, re-read on SIGHUP."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.2 {NAME}\n")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dnsmasq = procs.start(
        "dnsmasq",
        [
            str(shutil.which("dnsmasq")), "--keep-in-foreground", "--conf-file=/dev/null",
            "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--local=/test.local/",
            "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
            f"--user={getpass.getuser()}", "--pid-file=", "--log-facility=-", "--cache-size=0",
        ],
        port=("127.0.0.1", port),
    )  # fmt: skip
    follower = Follower(source(port, refresh=0.2))
    try:
        _, first = await follower.next()
        assert ids(first) == ["127.0.0.2:8081"]
        hosts.write_text(f"127.0.0.2 {NAME}\n127.0.0.3 {NAME}\n::1 {NAME}\n")
        dnsmasq.signal(signal.SIGHUP)
        _, second = await follower.next()
        assert ids(second) == ["127.0.0.2:8081", "127.0.0.3:8081", "[::1]:8081"]
    finally:
        await follower.stop()
