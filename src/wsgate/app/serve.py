"""``wsgate serve``: run the gateway until SIGTERM/SIGINT (drain) or SIGKILL.

SIGHUP reads the config again, with the same command-line overrides as at
start, and applies it live (see :meth:`Gateway.reload`); ``--watch-config``
does the same whenever the file's content changes. A config that does not
load is refused with one log line and the running one stays. A second
SIGTERM/SIGINT during a drain ends the drain at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wsgate.config import Config, ConfigError, load_config, parse_address
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging, tune_collector

if TYPE_CHECKING:
    from wsgate.gateway.server import Gateway

__all__ = [
    "add_arguments",
    "add_config_arguments",
    "config_from_args",
    "load_from_args",
    "reload_gateway",
    "run",
    "serve",
    "worker_config",
]

log = logging.getLogger("wsgate.serve")

# How often --watch-config reads the file to see whether it changed.
WATCH_INTERVAL = 1.0


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that override the config file (shared by ``serve`` and ``check``)."""
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML config file")
    parser.add_argument("--listen", metavar="HOST:PORT", help="where clients connect")
    parser.add_argument(
        "--backend", action="append", metavar="HOST:PORT", help="a backend (repeatable)"
    )
    parser.add_argument("--max-per-backend", type=int, metavar="N", help="cap per backend")
    parser.add_argument("--rate", type=float, metavar="PER_SECOND", help="global connect rate")
    parser.add_argument("--burst", type=int, metavar="N", help="connect-rate burst")
    parser.add_argument(
        "--balance", choices=["round_robin", "least_conn", "p2c", "hash"], help="policy"
    )
    parser.add_argument("--admin", metavar="HOST:PORT", help="admin API address ('off' to disable)")
    parser.add_argument("--state", metavar="URL", help="'memory' or a redis:// URL")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = args.listen
    if args.backend:
        overrides["backends"] = list(args.backend)
    if args.max_per_backend is not None:
        overrides["limits.max_connections_per_backend"] = args.max_per_backend
    if args.rate is not None or args.burst is not None:
        base = load_config(args.config).limits.connect_rate if args.config else None
        per_second = args.rate if args.rate is not None else (base.per_second if base else None)
        if per_second is None:
            raise ConfigError("--burst needs --rate (or connect_rate in the config)")
        burst = args.burst if args.burst is not None else (base.burst if base else 1)
        overrides["limits.connect_rate"] = {"per_second": per_second, "burst": burst}
    if args.balance:
        overrides["balance"] = args.balance
    if args.admin:
        overrides["admin"] = None if args.admin == "off" else args.admin
    if args.state:
        overrides["state.store"] = args.state
    return load_config(args.config, overrides)


def load_from_args(args: argparse.Namespace) -> Config:
    """The config as ``serve`` runs it: the file, then every command-line override.

    Called at start and again on each reload, so a reload keeps the overrides.
    """
    config = config_from_args(args)
    if getattr(args, "no_access_log", False):
        config = config.model_copy(update={"access_log": False})
    return config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--no-access-log", action="store_true", help="do not write the JSON access log"
    )
    parser.add_argument(
        "--watch-config",
        action="store_true",
        help="reload when the config file changes (SIGHUP always reloads)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="worker processes sharing the listen port (SO_REUSEPORT); N > 1 needs "
        "a shared state (state: redis://...)",
    )
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    config = load_from_args(args)
    if args.watch_config and not args.config:
        raise ConfigError("--watch-config needs a config file (-c FILE)")
    if args.workers < 1:
        raise ConfigError("--workers must be at least 1")
    if args.workers > 1 and not config.state.shared:
        raise ConfigError(
            "--workers > 1 needs a shared state (state: redis://...): with the memory "
            "store each worker would enforce the caps on its own"
        )
    try:
        setup_logging(args.log_level)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    raise_open_files_limit()
    if args.workers > 1 and args.worker_index is None:
        from wsgate.app.workers import supervise

        return supervise(args.workers, args.argv)

    def load() -> Config:
        loaded = load_from_args(args)
        return loaded if args.worker_index is None else worker_config(loaded, args.worker_index)

    watch = Path(args.config) if args.watch_config else None
    return run_async(serve(load(), reload=load, watch=watch, reuse_port=args.workers > 1))


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index`` of ``serve --workers``: its own replica id and admin port.

    Every worker is a replica of its own in the shared state; worker 0 serves
    the admin API on the configured port, worker ``i`` on that port plus ``i``.
    """
    base = config.replica_id or f"{socket.gethostname()}-{os.getppid()}"
    update: dict[str, Any] = {"replica_id": f"{base}-w{index}"}
    if config.admin:
        host, port = parse_address(config.admin)
        update["admin"] = f"[{host}]:{port + index}" if ":" in host else f"{host}:{port + index}"
    return config.model_copy(update=update)


def reload_gateway(gateway: Gateway, load: Callable[[], Config], why: str) -> bool:
    """Load the config again and apply it; on any mistake keep the running one."""
    try:
        gateway.reload(load(), why)
    except ConfigError as error:
        log.error("config reload (%s) refused, the running config stays: %s", why, error)
        return False
    except Exception:
        log.exception("config reload (%s) failed", why)
        return False
    return True


async def _watch(gateway: Gateway, load: Callable[[], Config], path: Path) -> None:
    def content() -> bytes | None:
        try:
            return path.read_bytes()
        except OSError:
            return None  # being replaced: look again next round

    seen = content()
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = content()
        if now is not None and now != seen:
            seen = now
            reload_gateway(gateway, load, f"{path} changed")


async def serve(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    watch: Path | None = None,
    reuse_port: bool = False,
) -> int:
    from wsgate.gateway.server import Gateway

    gateway = Gateway(config, reuse_port=reuse_port)
    try:
        await gateway.start()
    except OSError as error:
        # Nothing to stop: the relay thread starts once the gateway listens.
        raise ConfigError(f"cannot listen on {config.listen}: {error.strerror}") from None
    admin = None
    if config.admin:
        from wsgate.admin.server import AdminServer

        admin = AdminServer(gateway, config.admin, config.admin_token)
        try:
            await admin.start()
        except OSError as error:
            await gateway.stop()
            raise ConfigError(f"cannot listen on admin {config.admin}: {error.strerror}") from None

    tune_collector()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s during the drain: closing what is still open now", signum.name)
            gateway.cut_drain()
        else:
            log.info("%s received: draining", signum.name)
            stop.set()

    handled = [signal.SIGTERM, signal.SIGINT]
    for signum in handled:
        loop.add_signal_handler(signum, on_stop_signal, signum)
    watcher: asyncio.Task[None] | None = None
    if reload is not None:
        handled.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, reload_gateway, gateway, reload, "SIGHUP")
        if watch is not None:
            watcher = loop.create_task(_watch(gateway, reload, watch), name="watch-config")
    try:
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
        await gateway.drain()
    finally:
        if watcher is not None:
            watcher.cancel()
        await gateway.stop()
        if admin is not None:
            await admin.stop()
        for signum in handled:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    return 0
