"""Process-level set-up shared by every long-running command."""

from __future__ import annotations

import gc
import logging
import resource
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["raise_open_files_limit", "run_async", "setup_logging", "tune_collector"]

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


def tune_collector() -> None:
    """Make the cyclic garbage collector cheap for a process full of connections.

    Everything allocated at start-up lives as long as the process: ``gc.freeze``
    takes it out of every future collection. Each new connection allocates a few
    dozen objects that reference counting frees; collecting the youngest
    generation every 10,000 allocations instead of 700 keeps the collector off
    the connection set-up path without letting cyclic garbage pile up.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


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
