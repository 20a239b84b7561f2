"""A fixed CPU budget per process, from the kernel's CPU controller (cgroups).

The workers figure gives every gateway worker the same slice of a CPU so that
a machine with too few cores to give each worker one of its own (and the load
side another) still shows whether a second worker's CPU turns into throughput.

Each confined process gets a group of its own under the run's parent group,
with a CFS quota of ``cpus`` times the period. Both cgroup layouts are handled: v2
(``cpu.max`` in the unified hierarchy, with the ``cpu`` controller enabled for
children) and v1 (``cpu.cfs_quota_us`` under the ``cpu`` hierarchy). Where
neither is writable, :class:`BudgetUnavailable` says why in one line.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

__all__ = ["BudgetUnavailable", "CpuBudgets"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
# A short period keeps a throttled worker's pauses short (a few milliseconds):
# the figure is throughput, but long stalls would make it lumpy.
PERIOD_US = 10_000


class BudgetUnavailable(Exception):
    """This machine cannot confine a process to a CPU budget; the message says why."""


class CpuBudgets:
    """A parent cgroup for one run; :meth:`confine` puts a process in a child with a quota.

    Use it as a context manager: on exit every confined process still alive is
    moved back to where the run started and every group is removed.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.parent, self.version = _parent_for(name)
        self.children: list[Path] = []

    def __enter__(self) -> CpuBudgets:
        self.create()
        return self

    def create(self) -> None:
        """Make the parent group; :meth:`release` removes it."""
        try:
            self.parent.mkdir(exist_ok=True)
            if self.version == 2:
                # Children of this group may only use the controllers it enables for them.
                (self.parent / "cgroup.subtree_control").write_text("+cpu")
        except OSError as error:
            with contextlib.suppress(OSError):
                self.parent.rmdir()
            raise BudgetUnavailable(f"cannot create {self.parent}: {error.strerror}") from None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.release()

    def confine(self, pid: int, cpus: float) -> None:
        """Limit process ``pid`` (all its threads) to ``cpus`` CPUs' worth of time."""
        child = self.parent / f"p{pid}"
        quota = max(1000, round(cpus * PERIOD_US))
        try:
            child.mkdir(exist_ok=True)
            self.children.append(child)
            if self.version == 2:
                (child / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (child / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                (child / "cpu.cfs_quota_us").write_text(str(quota))
            (child / "cgroup.procs").write_text(str(pid))
        except OSError as error:
            raise BudgetUnavailable(f"cannot confine process {pid}: {error}") from None

    def release(self) -> None:
        home = self.parent.parent / "cgroup.procs"
        for child in reversed(self.children):
            with contextlib.suppress(OSError):
                for pid in (child / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        home.write_text(pid)
            with contextlib.suppress(OSError):
                child.rmdir()
        self.children.clear()
        with contextlib.suppress(OSError):
            self.parent.rmdir()


def _parent_for(name: str) -> tuple[Path, int]:
    """Where this run's parent group goes, and the cgroup version there."""
    unified = CGROUP_ROOT / "cgroup.controllers"
    if unified.exists():
        if "cpu" not in unified.read_text().split():
            raise BudgetUnavailable("the cgroup v2 hierarchy has no cpu controller")
        base = CGROUP_ROOT / _own_group_v2()
        if not os.access(base, os.W_OK):
            raise BudgetUnavailable(f"{base} is not writable (run as root)")
        return base / name, 2
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.cfs_quota_us").exists():
        if not os.access(v1, os.W_OK):
            raise BudgetUnavailable(f"{v1} is not writable (run as root)")
        return v1 / name, 1
    raise BudgetUnavailable("no cgroup CPU controller is mounted")


def _own_group_v2() -> str:
    """This process's group in the unified hierarchy, relative to its root."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].lstrip("/")
    return ""
