"""The memory store's view of its pool: choose_backend's rule without a scan.

The pool is kept as given (order and caps), rebuilt only when the store is
given another sequence. The least loaded backend with room is the top of a
heap of ``(used / cap, backend)`` with lazy deletion: every change of a
backend's count pushes its new load, and entries whose load is no longer
current are dropped when they reach the top. A top at load 1 or more means
every backend is full. So admission and release cost O(log n) amortised,
whatever the pool's size; the heap is rebuilt when stale entries outnumber
the live ones.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence

from wsgate.admission.contract import Candidate

__all__ = ["PoolIndex"]


class PoolIndex:
    """Args:
    used: the store's live count per backend (read, never written, here).
    """

    def __init__(self, used: Mapping[str, int]) -> None:
        self._used = used
        self._source: Sequence[Candidate] | None = None
        self._order: Sequence[Candidate] = ()
        self._caps: dict[str, int] = {}
        self._heap: list[tuple[float, str]] = []

    def offer(self, candidates: Sequence[Candidate]) -> None:
        """Take ``candidates`` as the pool; nothing to do when it is the same sequence."""
        if candidates is self._source:
            return
        self._source = candidates
        caps = {c.backend_id: c.cap for c in candidates}
        if caps == self._caps and list(self._order) == list(candidates):
            return
        self._order = tuple(candidates)
        self._caps = caps
        self._rebuild()

    def changed(self, backend: str) -> None:
        """``backend``'s count changed."""
        cap = self._caps.get(backend)
        if cap is None or cap <= 0:
            return
        heapq.heappush(self._heap, (self._used.get(backend, 0) / cap, backend))
        if len(self._heap) > 2 * len(self._caps) + 64:
            self._rebuild()  # most entries are stale by now

    def choose(
        self,
        *,
        least_loaded: bool,
        preferred: str | None,
        first: Sequence[str],
        exclude: Collection[str],
    ) -> str | None:
        caps, used = self._caps, self._used
        for backend in (preferred, *first):
            if backend is None or backend in exclude:
                continue
            cap = caps.get(backend)
            if cap is not None and used.get(backend, 0) < cap:
                return backend
        if least_loaded:
            return self._least_loaded(exclude)
        for candidate in self._order:  # first fit: as far as the first with room
            backend = candidate.backend_id
            if backend not in exclude and used.get(backend, 0) < candidate.cap:
                return backend
        return None

    def _least_loaded(self, exclude: Collection[str]) -> str | None:
        heap, caps, used = self._heap, self._caps, self._used
        set_aside: list[tuple[float, str]] = []
        chosen: str | None = None
        while heap:
            load, backend = heap[0]
            cap = caps.get(backend)
            if cap is None or cap <= 0 or load != used.get(backend, 0) / cap:
                heapq.heappop(heap)  # stale: a newer entry holds its load
                continue
            if load >= 1.0:
                break  # the least loaded is full: all are
            if backend in exclude:
                set_aside.append(heapq.heappop(heap))
                continue
            chosen = backend
            break
        for entry in set_aside:
            heapq.heappush(heap, entry)
        return chosen

    def _rebuild(self) -> None:
        used = self._used
        self._heap = [(used.get(b, 0) / cap, b) for b, cap in self._caps.items() if cap > 0]
        heapq.heapify(self._heap)
