"""Process-level set-up shared by every long-running command."""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["raise_open_files_limit", "run_async", "setup_logging"]

T = TypeVar("T")


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard limit; a proxy needs 2 fds a connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return int(soft if soft != resource.RLIM_INFINITY else hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop (the data plane's event loop)."""
    import uvloop

    return uvloop.run(main)


def setup_logging(level: str = "info") -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(
        level=numeric,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def current_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
