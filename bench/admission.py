"""Admission cost: the Redis store against the memory store, on this machine.

Each caller loops ``admit`` then ``release`` on four backends with caps too
high to fill and no rate limit, so every admit takes the full path (choose,
reserve) and is admitted. It reports admissions per second (admit + release
cycles of all callers together) and the latency of ``admit`` alone at p50 and
p99, at 1 and at 50 concurrent callers. A private redis-server is started on a
free loopback port unless ``--redis URL`` is given.

    .venv/bin/python bench/admission.py [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

from wsgate.admission.contract import AdmissionStore, Admitted, Candidate, Limits
from wsgate.admission.memory import MemoryStore
from wsgate.admission.redis import RedisStore
from wsgate.runtime import run_async
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["main", "measure"]

CANDIDATES = [Candidate(f"10.0.0.{i}:8080", 1_000_000) for i in range(1, 5)]


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure(store: AdmissionStore, callers: int, seconds: float) -> dict[str, Any]:
    """Run ``callers`` admit/release loops for ``seconds``; return the figures."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    deadline = time.perf_counter() + seconds

    async def caller(sink: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(10_000_000):
            started = clock()
            if started >= deadline:
                return
            decision = await store.admit(CANDIDATES, least_loaded=True)
            sink.append(clock() - started)
            if not isinstance(decision, Admitted):
                raise RuntimeError(f"unexpected rejection: {decision}")
            await store.release(decision.ticket)

    # Warm up connections and the script cache outside the measured window.
    for _ in range(50):
        warm = await store.admit(CANDIDATES)
        assert isinstance(warm, Admitted)
        await store.release(warm.ticket)
    started = time.perf_counter()
    await asyncio.gather(*(caller(sink) for sink in latencies))
    elapsed = time.perf_counter() - started
    merged = sorted(value for sink in latencies for value in sink)
    return {
        "store": store.kind,
        "callers": callers,
        "admissions_per_second": round(len(merged) / elapsed),
        "admit_p50_ms": round(quantile(merged, 0.50) * 1000, 3),
        "admit_p99_ms": round(quantile(merged, 0.99) * 1000, 3),
        "admit_mean_ms": round(statistics.fmean(merged) * 1000, 3),
        "samples": len(merged),
    }


async def run_all(url: str, seconds: float) -> list[dict[str, Any]]:
    results = []
    for callers in (1, 50):
        memory = MemoryStore(Limits())
        results.append(await measure(memory, callers, seconds))
        redis_store = RedisStore(url, namespace="bench", replica_id="bench", lease_ttl=30.0,
                                 timeout=1.0, on_failure="closed", limits=Limits())  # fmt: skip
        await redis_store.start()
        try:
            if redis_store.mode != "ok":
                raise RuntimeError(f"cannot use Redis at {url}")
            results.append(await measure(redis_store, callers, seconds))
        finally:
            await redis_store.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with ProcessGroup() as group:
        url = args.redis or RedisServer(group).start().url
        results = run_async(run_all(url, args.seconds))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'store':<8}{'callers':>8}{'admits/s':>11}{'p50 ms':>9}{'p99 ms':>9}")
    for row in results:
        print(
            f"{row['store']:<8}{row['callers']:>8}{row['admissions_per_second']:>11}"
            f"{row['admit_p50_ms']:>9.3f}{row['admit_p99_ms']:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
