"""Where a process's CPU time goes, from ``perf record -e cpu-clock -g`` samples.

On a machine without hardware counters (most VMs) ``perf stat`` cannot count
instructions, but the kernel's CPU clock can still be sampled. Each sample is
one call chain, innermost frame first, as ``perf script -F tid,ip,sym`` prints
it. :func:`tally` sorts them out:

- a sample whose innermost frame is in user space is the proxy's own work;
- a kernel sample taken inside a system call is put down to that call, named
  by the kernel's handler (``__x64_sys_connect`` is ``connect``), or as the C
  library's wrapper above the kernel's entry is named when no handler is on the
  chain (the sample fell in the entry or exit path itself);
- any other kernel sample (an interrupt, a fault, being switched out while
  running user code) is "kernel, outside system calls".

Only shares are taken from the samples; the seconds come from ``/proc``, which
counts every tick. This module is pure: text in, counts out.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["OUTSIDE_CALLS", "USER", "Tally", "tally"]

USER = "user space"
OUTSIDE_CALLS = "kernel, outside system calls"

# x86-64 Linux puts the kernel in the upper half of the address space.
_KERNEL_START = 0xFFFF_8000_0000_0000
_ENTRY = re.compile(r"^entry_SYSCALL|^do_syscall_64$")
# glibc's inner names for its wrappers: __GI___libc_read is read.
_WRAPPER_PREFIX = re.compile(r"^(?:__GI_|__libc_|_)+")
# The kernel's handler of a call, for a wrapper perf could not name.
_HANDLER = re.compile(r"^(?:__x64_sys_|__ia32_sys_|__se_sys_|__do_sys_|ksys_|__sys_)(\w+)")


@dataclass
class Tally:
    """Samples by what they were spent on, and by thread."""

    by_use: Counter[str] = field(default_factory=Counter)
    by_thread: Counter[int] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.by_use.values())

    def kernel(self) -> int:
        return self.total - self.by_use[USER]

    def share(self, use: str) -> float:
        total = self.total
        return self.by_use[use] / total if total else 0.0


def _frame(line: str) -> tuple[int, str] | None:
    parts = line.split(None, 1)
    if not parts:
        return None
    try:
        address = int(parts[0], 16)
    except ValueError:
        return None
    symbol = parts[1].strip() if len(parts) > 1 else "[unknown]"
    return address, symbol.split("+", 1)[0]


def _use(frames: list[tuple[int, str]]) -> str:
    if not frames or frames[0][0] < _KERNEL_START:
        return USER
    for depth, (address, symbol) in enumerate(frames):
        if address >= _KERNEL_START and _ENTRY.match(symbol):
            for _, callee in reversed(frames[:depth]):
                handler = _HANDLER.match(callee)
                if handler is not None:
                    return handler.group(1)
            for caller_address, caller in frames[depth + 1 :]:
                if caller_address < _KERNEL_START:
                    if caller != "[unknown]":
                        return _WRAPPER_PREFIX.sub("", caller)
                    break
            return "system call, unnamed"
    return OUTSIDE_CALLS


def tally(script: str) -> Tally:
    """Sort the samples of ``perf script -F tid,ip,sym`` output."""
    result = Tally()
    for block in script.split("\n\n"):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        head = lines[0].split()
        if len(head) != 1 or not head[0].isdigit():
            continue  # not a sample's first line
        frames = [frame for frame in map(_frame, lines[1:]) if frame is not None]
        result.by_use[_use(frames)] += 1
        result.by_thread[int(head[0])] += 1
    return result
