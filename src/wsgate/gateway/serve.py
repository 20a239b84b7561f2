"""``wsgate serve``: run the gateway until SIGTERM/SIGINT (drain) or SIGKILL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from typing import Any

from wsgate.config import Config, ConfigError, load_config
from wsgate.runtime import raise_open_files_limit, run_async, setup_logging

__all__ = ["add_arguments", "add_config_arguments", "config_from_args", "run"]

log = logging.getLogger("wsgate.serve")


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.add_argument(
        "--no-access-log", action="store_true", help="do not write the JSON access log"
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.no_access_log:
        config = config.model_copy(update={"access_log": False})
    try:
        setup_logging(args.log_level)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    raise_open_files_limit()
    return run_async(serve(config))


async def serve(config: Config) -> int:
    from wsgate.gateway.server import Gateway

    gateway = Gateway(config)
    try:
        await gateway.start()
    except OSError as error:
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

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        log.info("signal received: draining")
        await gateway.drain()
    finally:
        await gateway.stop()
        if admin is not None:
            await admin.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    return 0
