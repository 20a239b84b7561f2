"""Start and stop the processes of a local topology (tests, demo and bench share this).

Every process runs in its own process group so that stopping it stops its
children too; :class:`ProcessGroup` stops everything it started, in reverse
order, even when the code using it fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "Process",
    "ProcessGroup",
    "RedisServer",
    "find_pids",
    "find_redis_server",
    "free_port",
    "process_alive",
    "wait_for_port",
    "wsgate_argv",
]


# Ports free_port has given out in this process, so that it never gives one twice.
_given: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel's choice), and not one given before.

    The probe's socket is closed before the caller binds, so the kernel may well
    choose the same port for the next probe: two ports asked for one after the
    other (a gateway's listener and its admin API, say) could be one.
    """
    for _ in range(1000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _given:
            break
    _given.add(port)
    return port


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, process: Process | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if process is not None and process.popen.poll() is not None:
                raise RuntimeError(
                    f"{process.name} exited with {process.popen.returncode} before listening "
                    f"on {host}:{port}; its output:\n{process.output()}"
                ) from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie (killed, not yet reaped by its parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rpartition(")")[2].split()[:1] not in (["Z"], ["X"])


def find_pids(spec: str) -> list[int]:
    """The processes ``spec`` names: a pid, or text found in their command lines.

    The caller itself, and any ``wsgate load --storm-wait`` (which names it too),
    are left out.
    """
    if spec.isdigit():
        return [int(spec)] if process_alive(int(spec)) else []
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            if (
                spec in " ".join(words)
                and "--storm-wait" not in words
                and process_alive(int(entry.name))
            ):
                found.append(int(entry.name))
    return sorted(found)


def wsgate_argv(*args: str) -> list[str]:
    """The argv that runs a wsgate subcommand with this interpreter."""
    return [sys.executable, "-m", "wsgate.cli", *args]


class Process:
    """One child process with its output captured to a file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signum)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        else:
            # Children of an exited leader may still hold the group.
            self.signal(signal.SIGKILL)
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)
        self._log.close()


class ProcessGroup:
    """Processes started together and stopped together (reverse order)."""

    def __init__(self, log_dir: Path | None = None):
        self._own_dir = log_dir is None
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="wsgate-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[Process] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: tuple[str, int] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 15.0,
    ) -> Process:
        # A second process of the same name in this group gets a log of its own.
        serial = sum(1 for other in self.processes if other.name == name) + 1
        log_name = name if serial == 1 else f"{name}-{serial}"
        process = Process(name, argv, self.log_dir / f"{log_name}.log", env)
        self.processes.append(process)
        if port is not None:
            wait_for_port(*port, timeout=timeout, process=process)
        return process

    def stop_all(self) -> None:
        while self.processes:
            self.processes.pop().stop()
        if self._own_dir:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def find_redis_server() -> str | None:
    """The redis-server binary on PATH or in the usual Debian place."""
    found = shutil.which("redis-server")
    if found:
        return found
    return "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None


class RedisServer:
    """A private, non-persisting redis-server on a free loopback port."""

    def __init__(
        self,
        group: ProcessGroup,
        name: str = "redis",
        port: int | None = None,
        args: Sequence[str] = (),
    ):
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server not found; run ./scripts/setup.sh to install it")
        self.group = group
        self.name = name
        self.binary = binary
        self.port = port or free_port()
        self.args = list(args)  # more redis-server options (--replicaof, --cluster-enabled ...)
        self.process: Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--protected-mode", "no",
            "--dir", str(self.group.log_dir), "--dbfilename", f"{self.name}.rdb",
            *self.args,
        ]  # fmt: skip
        self.process = self.group.start(self.name, argv, port=("127.0.0.1", self.port))
        return self

    def kill(self) -> None:
        """Lose all data, as a crash would (the port stays the same on restart)."""
        if self.process is not None:
            self.process.kill()
            self.group.processes.remove(self.process)
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()


class RedisSentinel:
    """A redis-sentinel watching one master, with failover times short enough for tests."""

    def __init__(self, group: ProcessGroup, name: str, master: RedisServer, service: str):
        self.group = group
        self.name = name
        self.port = free_port()
        self.master = master
        self.service = service
        self.process: Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, quorum: int = 2, down_after_ms: int = 1000) -> RedisSentinel:
        # Sentinel rewrites its config file, so each one gets its own.
        path = self.group.log_dir / f"{self.name}.conf"
        path.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\n"
            f"dir {self.group.log_dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} {quorum}\n"
            f"sentinel down-after-milliseconds {self.service} {down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {down_after_ms * 3}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        binary = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"
        argv = [binary, str(path)]
        self.process = self.group.start(self.name, argv, port=("127.0.0.1", self.port))
        return self


def start_redis_cluster(
    group: ProcessGroup, masters: int = 3, replicas_each: int = 1, node_timeout_ms: int = 1000
) -> list[RedisServer]:
    """A Redis Cluster on loopback made with ``redis-cli --cluster create`` (masters first).

    A short ``cluster-node-timeout`` makes a master's failover take seconds, and
    without full coverage the other shards keep serving while one has none.
    """
    nodes = []
    for index in range(masters * (1 + replicas_each)):
        name = f"redis-node-{index}"
        args = [
            "--cluster-enabled", "yes", "--cluster-config-file", f"{name}-nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms), "--cluster-port", str(free_port()),
            "--cluster-require-full-coverage", "no",
        ]  # fmt: skip
        nodes.append(RedisServer(group, name, args=args).start())
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    addresses = [f"127.0.0.1:{node.port}" for node in nodes]
    argv = [cli, "--cluster", "create", *addresses]
    argv += ["--cluster-replicas", str(replicas_each), "--cluster-yes"]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return nodes
