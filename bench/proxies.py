"""The benchmarked paths: the echo backend alone, and each proxy in front of it.

Every proxy runs as a real process on loopback with a config file generated in
the run's work directory, tuned the same way: one thread or worker, no access
log, long tunnel timeouts, the open-files limit of the bench itself. A path
whose binary is missing is skipped with one line that says so.

- ``direct``: clients talk to the echo backend itself (the ceiling).
- ``wsgate-memory`` / ``wsgate-redis``: ``wsgate serve`` with the embedded
  store or a private redis-server; ``wsgate-redis-wN`` runs ``--workers N``.
- ``haproxy``: ``nbthread 1``, ``mode http``; it switches to a tunnel on 101.
- ``haproxy-tls`` / ``wsgate-memory-tls``: the same, terminating TLS with one
  certificate (ECDSA P-256, made for the run) and one cipher suite
  (TLS 1.3, ``TLS_AES_256_GCM_SHA384``, what OpenSSL picks for both by default).
- ``nginx``: one process (``master_process off``), ``proxy_http_version 1.1``
  and the ``Upgrade``/``Connection`` headers passed on.
- ``asyncio-floor`` (only when asked for): the least an asyncio proxy on uvloop
  does per upgrade (:mod:`bench.floor`), the reference for wsgate's set-up cost.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.driver import Target
from wsgate.testbed.processes import (
    Process,
    ProcessGroup,
    RedisServer,
    free_port,
    wsgate_argv,
)
from wsgate.testbed.topology import free_port_run

__all__ = [
    "BASE_PATHS",
    "EXTRA_PATHS",
    "TLS_PATHS",
    "Endpoint",
    "Launch",
    "Unavailable",
    "parse_path_name",
    "pin_tree",
    "start_echo",
    "start_path",
    "tree_cpu_seconds",
    "tree_rss",
    "worker_pids",
]

BASE_PATHS = (
    "direct",
    "wsgate-memory",
    "wsgate-redis",
    "haproxy",
    "nginx",
    "wsgate-memory-tls",
    "haproxy-tls",
)
TLS_PATHS = ("wsgate-memory-tls", "haproxy-tls")
# Paths run only when named: references for one figure, not products.
EXTRA_PATHS = ("asyncio-floor",)
TLS_SUITE = "TLS_AES_256_GCM_SHA384"
HAPROXY = "/usr/sbin/haproxy"
NGINX = "/usr/sbin/nginx"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_WSGATE_PATH = re.compile(r"^wsgate-(memory|redis)(?:-w(\d+))?$")


class Unavailable(Exception):
    """A path this machine cannot run; the message is the one line the report shows."""


@dataclass
class Endpoint:
    """A running path: where clients connect and which process the memory figure reads."""

    name: str
    target: Target
    pid: int | None
    version: str
    argv: list[str] = field(default_factory=list)


def parse_path_name(name: str) -> tuple[str, int]:
    """The kind of a path name and its wsgate worker count (1 for the others)."""
    if name in ("direct", "haproxy", "nginx", *TLS_PATHS, *EXTRA_PATHS):
        return name, 1
    match = _WSGATE_PATH.match(name)
    if match is None:
        raise ValueError(
            f"unknown path {name!r}; choose from {', '.join(BASE_PATHS + EXTRA_PATHS)} "
            "(wsgate paths may end in -wN for N worker processes)"
        )
    workers = int(match.group(2) or 1)
    if workers < 1:
        raise ValueError(f"{name}: a gateway needs at least one worker")
    if workers > 1 and match.group(1) == "memory":
        raise ValueError(
            f"{name}: several workers share their caps through Redis only; "
            f"use wsgate-redis-w{workers}"
        )
    return f"wsgate-{match.group(1)}", workers


def start_echo(group: ProcessGroup, processes: int = 1) -> tuple[Target, int]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.echo", "--listen", f"127.0.0.1:{port}"]
    argv += ["--processes", str(processes)]
    process = group.start("echo", argv, port=("127.0.0.1", port), env=_bench_env())
    return Target("127.0.0.1", port), process.pid


def start_path(
    name: str,
    group: ProcessGroup,
    echo: Target,
    *,
    nofile: int,
    redis: list[RedisServer],
    proxy_buffer: int | None = None,
    under: Launch | None = None,
) -> Endpoint:
    """Start one path in front of ``echo``; raise :class:`Unavailable` to skip it.

    ``redis`` holds the run's one redis-server once a path has needed it.
    ``proxy_buffer`` sets HAProxy's ``tune.bufsize`` and nginx's
    ``proxy_buffer_size`` (their defaults, 16 KiB and one 4 KiB page, when None).
    ``under`` runs the proxy under another program (a profiler), given longer to start.
    """
    kind, workers = parse_path_name(name)
    launch = under or Launch()
    if kind == "direct":
        return Endpoint(name, echo, None, "echo backend alone")
    if kind in ("haproxy", "haproxy-tls"):
        tls = _bench_certificate(group) if kind == "haproxy-tls" else None
        return _start_haproxy(name, group, echo, nofile, proxy_buffer, tls, launch)
    if kind == "wsgate-memory-tls":
        tls = _bench_certificate(group)
        return _start_wsgate(name, group, echo, False, workers, redis, launch, tls)
    if kind == "nginx":
        return _start_nginx(name, group, echo, nofile, proxy_buffer, launch)
    if kind == "asyncio-floor":
        return _start_floor(name, group, echo, launch)
    return _start_wsgate(name, group, echo, kind == "wsgate-redis", workers, redis, launch)


@dataclass(frozen=True)
class Launch:
    """How a proxy's command is run: as it is, or after a wrapper's (``valgrind ...``).

    ``slowdown``: how many times slower the wrapper makes it, and so how much
    longer its own deadlines must be (wsgate's wait for Redis's answers).
    """

    wrapper: tuple[str, ...] = ()
    start_timeout: float = 15.0
    slowdown: float = 1.0

    def start(
        self,
        group: ProcessGroup,
        name: str,
        argv: Sequence[str],
        port: int,
        env: dict[str, str] | None = None,
    ) -> Process:
        """Start the proxy ``argv`` so, and wait until it listens on ``port``."""
        return group.start(
            name,
            [*self.wrapper, *argv],
            port=("127.0.0.1", port),
            env=env,
            timeout=self.start_timeout,
        )


@dataclass(frozen=True)
class _Certificate:
    cert: Path
    key: Path
    combined: Path  # certificate then key, as HAProxy's crt takes them


def _bench_certificate(group: ProcessGroup) -> _Certificate:
    """The run's one serving certificate, made on first use in the run's directory."""
    directory = group.log_dir / "tls"
    combined = directory / "bench.pem"
    if not combined.exists():
        from wsgate.testbed.certs import TestCA

        pair = TestCA("wsgate bench CA").issue(directory, "bench")
        combined.write_bytes(pair.cert.read_bytes() + pair.key.read_bytes())
    return _Certificate(directory / "bench.crt", directory / "bench.key", combined)


def _bench_env() -> dict[str, str]:
    """Children find the bench package and wsgate's sources whatever the working directory."""
    root = Path(__file__).resolve().parent.parent
    paths = [str(root), str(root / "src"), os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown version"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown version"


def _start_haproxy(
    name: str,
    group: ProcessGroup,
    echo: Target,
    nofile: int,
    buffer: int | None,
    tls: _Certificate | None,
    launch: Launch,
) -> Endpoint:
    binary = HAPROXY if os.access(HAPROXY, os.X_OK) else shutil.which("haproxy")
    if binary is None:
        raise Unavailable(
            f"{name}: skipped, {HAPROXY} is not installed (./scripts/setup.sh --bench)"
        )
    port = free_port()
    # No global maxconn: HAProxy derives it from the open-files limit it inherits
    # (half of it, as each proxied connection holds two sockets).
    ssl = f" ssl crt {tls.combined} alpn http/1.1" if tls else ""
    config = f"""\
global
    nbthread 1
    ulimit-n {nofile}
{f"    tune.bufsize {buffer}" if buffer else ""}
    ssl-default-bind-ciphersuites {TLS_SUITE}
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode http
    option dontlognull
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 10s
    timeout client-fin 5s
    timeout server-fin 5s

frontend bench
    bind 127.0.0.1:{port}{ssl}
    maxconn {nofile}
    default_backend echo

backend echo
    server echo {echo.host}:{echo.port} maxconn {nofile}
"""
    path = group.log_dir / f"{name}.cfg"
    path.write_text(config)
    argv = [binary, "-db", "-f", str(path)]
    process = launch.start(group, name, argv, port)
    version = _version([binary, "-v"])
    target = Target("127.0.0.1", port, tls=tls is not None)
    return Endpoint(name, target, process.pid, version, argv)


def _start_floor(name: str, group: ProcessGroup, echo: Target, launch: Launch) -> Endpoint:
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", "--listen", f"127.0.0.1:{port}"]
    argv += ["--backend", f"{echo.host}:{echo.port}"]
    process = launch.start(group, name, argv, port, env=_bench_env())
    version = f"uvloop {importlib.metadata.version('uvloop')}, no admission"
    return Endpoint(name, Target("127.0.0.1", port), process.pid, version, argv)


def _start_nginx(
    name: str, group: ProcessGroup, echo: Target, nofile: int, buffer: int | None, launch: Launch
) -> Endpoint:
    binary = NGINX if os.access(NGINX, os.X_OK) else shutil.which("nginx")
    if binary is None:
        raise Unavailable(f"{name}: skipped, {NGINX} is not installed (./scripts/setup.sh --bench)")
    port = free_port()
    prefix = group.log_dir / name
    prefix.mkdir(exist_ok=True)
    # master_process off: one process does all the work, as `nbthread 1` for HAProxy.
    # worker_connections counts client and upstream sockets alike.
    config = f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections {nofile};
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    upstream echo {{
        server {echo.host}:{echo.port};
    }}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://echo;
            proxy_http_version 1.1;
{f"            proxy_buffer_size {buffer};" if buffer else ""}
{f"            proxy_buffers 4 {buffer};" if buffer else ""}
{f"            proxy_busy_buffers_size {buffer};" if buffer else ""}
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_connect_timeout 5s;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""
    path = prefix / "nginx.conf"
    path.write_text(config)
    argv = [binary, "-p", str(prefix), "-c", str(path), "-e", str(prefix / "error.log")]
    process = launch.start(group, name, argv, port)
    version = _version([binary, "-v"])
    return Endpoint(name, Target("127.0.0.1", port), process.pid, version, argv)


def _start_wsgate(
    name: str,
    group: ProcessGroup,
    echo: Target,
    with_redis: bool,
    workers: int,
    redis: list[RedisServer],
    launch: Launch,
    tls: _Certificate | None = None,
) -> Endpoint:
    try:
        present = importlib.util.find_spec("wsgate.app.serve") is not None
    except ModuleNotFoundError:
        present = False
    if not present:
        raise Unavailable(f"{name}: skipped, `wsgate serve` is not in this checkout")
    # Worker i answers on admin port + i: the run of ports must be free.
    port, admin = free_port(), free_port_run(workers)
    argv = wsgate_argv(
        "serve",
        "--listen", f"127.0.0.1:{port}",
        "--backend", f"{echo.host}:{echo.port}",
        "--max-per-backend", "100000",
        "--admin", f"127.0.0.1:{admin}",
        "--no-access-log",
        "--log-level", "warning",
    )  # fmt: skip
    if with_redis:
        if not redis:
            try:
                redis.append(RedisServer(group, name="redis").start())
            except FileNotFoundError:
                raise Unavailable(
                    f"{name}: skipped, redis-server is not installed (./scripts/setup.sh)"
                ) from None
        argv += ["--state", redis[0].url]
    if workers > 1:
        argv += ["--workers", str(workers)]
    settings = []
    if tls is not None:
        settings.append(f"tls: {{cert: {tls.cert}, key: {tls.key}}}")
    if launch.slowdown > 1:  # Redis's answers are late by the proxy's own pace
        settings.append(f"state: {{timeout: {0.1 * launch.slowdown:g}s}}")
    if settings:
        config = group.log_dir / f"{name}.yaml"
        config.write_text("".join(f"{line}\n" for line in settings))
        argv += ["-c", str(config)]
    process = launch.start(group, name, argv, port, env=_bench_env())
    _wait_ready(f"http://127.0.0.1:{admin}/ready", timeout=launch.start_timeout)
    target = Target("127.0.0.1", port, tls=tls is not None)
    return Endpoint(name, target, process.pid, _wsgate_version(), argv)


def _wsgate_version() -> str:
    from wsgate import __version__

    commit = _version(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"])
    return f"wsgate {__version__} ({commit[:12]})"


def _wait_ready(url: str, timeout: float) -> None:
    """Wait until the gateway's admin says it is ready (its backend checked healthy)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as error:
            last = f"{error.code}"
        except (OSError, ValueError) as error:
            last = str(error)
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:g}s (last: {last})")


def _descendants(pid: int) -> list[int]:
    """A process and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(entry.path, "stat").read_text()
            # The command name may hold spaces and parentheses: split after the last ')'.
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(children.get(current, []))
    return found


def worker_pids(pid: int) -> list[int]:
    """The processes that serve: a supervisor's descendants, or the process itself."""
    below = _descendants(pid)[1:]
    return below or [pid]


def tree_rss(pid: int) -> int:
    """Resident memory in bytes of a process and all its descendants."""
    total = 0
    for current in _descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


def redis_pid(endpoint: Endpoint, redis: Sequence[RedisServer]) -> int | None:
    """The Redis server a wsgate path admits through, if it uses one (its CPU is not the
    proxy's)."""
    if "--state" not in endpoint.argv or not redis or redis[0].process is None:
        return None
    return redis[0].process.pid


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process and its live descendants."""
    ticks = 0
    for current in _descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _CLOCK_TICKS


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Bind every thread of a process and its descendants to ``cpus``."""
    for current in _descendants(pid):
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)
