"""Discovery: what two snapshots differ by, backends files, and the file source."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import pytest

from wsgate.config import BackendSpec, DnsDiscovery, FileDiscovery, load_config
from wsgate.upstreams.discovery import (
    DiscoveryError,
    DnsSource,
    FileSource,
    diff_backends,
    parse_backend_list,
    source_for,
    specs_from_addresses,
)


def spec(address: str, id: str | None = None, cap: int | None = None) -> BackendSpec:
    return BackendSpec(address=address, id=id, max_connections=cap)


class TestDiff:
    def test_added_removed_kept_in_order(self):
        a, b, c, d = (spec(f"10.0.0.{i}:80") for i in range(1, 5))
        changes = diff_backends([a, b, c], [d, c, a])
        assert changes.added == (d,)
        assert changes.removed == (b,)
        assert changes.kept == (c, a)
        assert changes.updated == ()
        assert changes.changed

    def test_same_snapshot_is_no_change(self):
        snapshot = [spec("10.0.0.1:80"), spec("10.0.0.2:80", cap=3)]
        changes = diff_backends(snapshot, [s.model_copy() for s in reversed(snapshot)])
        assert not changes.changed
        assert changes.kept == tuple(reversed(snapshot))

    def test_first_and_last_snapshots(self):
        snapshot = [spec("10.0.0.1:80"), spec("[fd00::1]:80")]
        assert diff_backends([], snapshot).added == tuple(snapshot)
        assert diff_backends(snapshot, []).removed == tuple(snapshot)

    def test_id_keeps_a_backend_whose_address_or_cap_changed(self):
        old = [spec("10.0.0.1:80", id="pod-a"), spec("10.0.0.2:80", id="pod-b", cap=2)]
        new = [spec("10.0.0.9:80", id="pod-a"), spec("10.0.0.2:80", id="pod-b", cap=4)]
        changes = diff_backends(old, new)
        assert changes.added == changes.removed == ()
        assert changes.updated == tuple(new)
        assert changes.changed

    def test_a_new_address_without_id_is_a_new_backend(self):
        changes = diff_backends([spec("10.0.0.1:80")], [spec("10.0.0.1:81")])
        assert [s.backend_id for s in changes.added] == ["10.0.0.1:81"]
        assert [s.backend_id for s in changes.removed] == ["10.0.0.1:80"]

    def test_duplicate_ids_are_refused(self):
        with pytest.raises(ValueError, match="'x' appears twice"):
            diff_backends([], [spec("10.0.0.1:80", id="x"), spec("10.0.0.2:80", id="x")])


class TestAddresses:
    def test_ids_are_ip_and_port(self):
        specs = specs_from_addresses(["10.0.0.2", "fd00::1", "10.0.0.2"], 8081)
        assert [s.backend_id for s in specs] == ["10.0.0.2:8081", "[fd00::1]:8081"]
        assert [s.address for s in specs] == ["10.0.0.2:8081", "[fd00::1]:8081"]

    def test_the_same_answer_twice_is_no_change(self):
        first = specs_from_addresses(["10.0.0.1", "10.0.0.2"], 80)
        again = specs_from_addresses(["10.0.0.1", "10.0.0.2"], 80)
        assert first == again
        assert not diff_backends(first, again).changed


class TestBackendsFile:
    def test_the_shapes_of_the_static_list(self):
        specs = parse_backend_list(
            "- 127.0.0.1:8081\n- {address: '[::1]:8082', id: b, max_connections: 4}\n",
            "b.yaml",
        )
        assert specs == [spec("127.0.0.1:8081"), spec("[::1]:8082", id="b", cap=4)]
        assert parse_backend_list(b"[]", "b.yaml") == []

    @pytest.mark.parametrize(
        ("content", "message"),
        [
            ("", "backends file b.yaml is empty; write [] for no backends"),
            ("- [oops\n", "backends file b.yaml is not valid YAML at line 2"),
            ("dns: {name: x, port: 1}", "backends file b.yaml must be a list"),
            ("- 127.0.0.1\n", "backends file b.yaml: entry 1, address: expected host:port"),
            (
                "- {address: '127.0.0.1:1', max_connections: 0}",
                "backends file b.yaml: entry 1, max_connections: Input should be greater",
            ),
            ("- 127.0.0.1:1\n- {address: '127.0.0.1:1', w: 2}", "entry 2, w: unknown key"),
            ("- 127.0.0.1:1\n- {port: 2}", "entry 2, address: Field required"),
            ("- 127.0.0.1:1\n- 5", "entry 2: expected host:port or {address, id, max_"),
            ("- {address: 'h:1', id: a}\n- {address: 'h:2', id: a}", "id 'a' appears twice"),
        ],
    )
    def test_mistakes_are_one_clear_line(self, content: str, message: str):
        with pytest.raises(DiscoveryError) as caught:
            parse_backend_list(content, "b.yaml")
        assert message in str(caught.value)
        assert "\n" not in str(caught.value)


def test_source_for_the_config_forms(tmp_path: Path):
    dns = load_config(None, {"backends": {"dns": {"name": "ws.test", "port": 81}}}).backends
    file = load_config(None, {"backends": {"file": str(tmp_path / "b.yaml")}}).backends
    assert isinstance(dns, DnsDiscovery) and isinstance(file, FileDiscovery)
    assert isinstance(source_for(dns), DnsSource)
    assert isinstance(source_for(file), FileSource)
    source = DnsSource(DnsDiscovery(name="ws.test", port=81, server="127.0.0.1:5353", refresh=0))
    assert source.server == ("127.0.0.1", 5353)
    assert source.refresh > 0  # never a busy loop


class Follower:
    """Pulls a source's snapshots in the background, as the backend pool does."""

    def __init__(self, source: FileSource):
        self.received: asyncio.Queue[list[BackendSpec]] = asyncio.Queue()
        self.task = asyncio.create_task(self._follow(source))

    async def _follow(self, source: FileSource) -> None:
        async for snapshot in source.snapshots():
            self.received.put_nowait(snapshot)

    async def next(self, within: float = 2.0) -> list[BackendSpec]:
        async with asyncio.timeout(within):
            return await self.received.get()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def write(path: Path, text: str) -> None:
    """Replace the file atomically, as the docs ask of writers."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


class TestFileSource:
    """A real file on disk, re-read every refresh."""

    async def test_follows_changes_and_keeps_the_last_good_list(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ):
        path = tmp_path / "backends.yaml"
        write(path, "- 127.0.0.1:9001\n- 127.0.0.1:9002\n")
        follower = Follower(FileSource(FileDiscovery(path=path, refresh=0.05)))
        try:
            first = await follower.next()
            assert [s.backend_id for s in first] == ["127.0.0.1:9001", "127.0.0.1:9002"]

            write(path, "- 127.0.0.1:9002\n- {address: '127.0.0.1:9003', id: three}\n")
            second = await follower.next()
            changes = diff_backends(first, second)
            assert [s.backend_id for s in changes.added] == ["three"]
            assert [s.backend_id for s in changes.removed] == ["127.0.0.1:9001"]

            # Broken, then missing: one log line each, no snapshot; then a good list again.
            with caplog.at_level(logging.INFO, logger="wsgate.discovery"):
                write(path, "- 127.0.0.1:9002\n- nonsense\n")
                await asyncio.sleep(0.3)
                path.unlink()
                await asyncio.sleep(0.3)
                assert follower.received.empty()
                write(path, "[]\n")
                assert await follower.next() == []
            assert [r.getMessage() for r in caplog.records] == [
                f"backends file {path}: entry 2, address: expected host:port, got 'nonsense'; "
                "keeping the 2 backends seen last",
                f"cannot read backends file {path}: No such file or directory; "
                "keeping the 2 backends seen last",
                f"file {path} answers again: 0 backends",
            ]
        finally:
            await follower.stop()

    async def test_an_unchanged_list_gives_no_new_snapshot(self, tmp_path: Path):
        path = tmp_path / "backends.yaml"
        write(path, "- 127.0.0.1:9001\n")
        follower = Follower(FileSource(FileDiscovery(path=path, refresh=0.05)))
        try:
            await follower.next()
            write(path, "# same backends, new comment\n- 127.0.0.1:9001\n")
            await asyncio.sleep(0.3)
            assert follower.received.empty()
            path.write_text("- 127.0.0.1:9004\n")  # in place, same size, same second
            assert [s.backend_id for s in await follower.next()] == ["127.0.0.1:9004"]
        finally:
            await follower.stop()

    async def test_a_missing_file_at_start_is_an_error_not_an_empty_pool(self, tmp_path: Path):
        source = FileSource(FileDiscovery(path=tmp_path / "absent.yaml"))
        with pytest.raises(DiscoveryError, match="No such file"):
            await source.observe()
