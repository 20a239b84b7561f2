"""Admission cost against pool size: the Redis store and the memory store, on this machine.

Each caller loops ``admit`` then ``release`` (``least_conn``, the default
policy) over a pool of N backends with caps too high to fill and no rate
limit, so every admit takes the full path (choose, reserve) and is admitted.
The pool is handed to the store as the gateway hands it: the same sequence
while it does not change. It reports admissions per second (admit + release
cycles of all callers together), the latency of ``admit`` alone at p50 and
p99, and each figure against the 4-backend one, for N = 4, 100, 1,000 and
10,000. For Redis it also reads Redis's own CPU per script call (``INFO
commandstats``). A private redis-server is started on a free loopback port
unless ``--redis URL`` is given.

    .venv/bin/python -m bench.admission [--seconds 3] [--callers 50] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.results import write_results
from wsgate.admission.contract import AdmissionStore, Admitted, Candidate, Limits
from wsgate.admission.memory import MemoryStore
from wsgate.admission.redis import RedisStore
from wsgate.runtime import run_async
from wsgate.testbed.processes import ProcessGroup, RedisServer

__all__ = ["main", "measure", "pool_of"]

SIZES = (4, 100, 1_000, 10_000)


def pool_of(size: int) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:8080", 1_000_000)
        for i in range(size)
    )


def quantile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def measure(
    store: AdmissionStore, pool: Sequence[Candidate], callers: int, seconds: float
) -> dict[str, Any]:
    """Run ``callers`` admit/release loops for ``seconds``; return the figures."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    deadline = time.perf_counter() + seconds

    async def caller(sink: list[float]) -> None:
        clock = time.perf_counter
        for _ in range(10_000_000):
            started = clock()
            if started >= deadline:
                return
            decision = await store.admit(pool, least_loaded=True)
            sink.append(clock() - started)
            if not isinstance(decision, Admitted):
                raise RuntimeError(f"unexpected rejection: {decision}")
            await store.release(decision.ticket)

    # Warm up connections, the script cache and the pool outside the measured window.
    for _ in range(50):
        warm = await store.admit(pool, least_loaded=True)
        if not isinstance(warm, Admitted):
            raise RuntimeError(f"unexpected rejection while warming up: {warm}")
        await store.release(warm.ticket)
    started = time.perf_counter()
    await asyncio.gather(*(caller(sink) for sink in latencies))
    elapsed = time.perf_counter() - started
    merged = sorted(value for sink in latencies for value in sink)
    return {
        "store": store.kind,
        "backends": len(pool),
        "callers": callers,
        "admissions_per_second": round(len(merged) / elapsed),
        "admit_p50_ms": round(quantile(merged, 0.50) * 1000, 3),
        "admit_p99_ms": round(quantile(merged, 0.99) * 1000, 3),
        "admit_mean_ms": round(statistics.fmean(merged) * 1000, 3),
        "samples": len(merged),
    }


def script_cost(url: str) -> dict[str, float]:
    """Redis's own CPU per EVALSHA (µs) and calls so far, from INFO commandstats."""
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
    finally:
        client.close()
    return {"calls": float(stats.get("calls", 0)), "usec": float(stats.get("usec", 0))}


async def measured(
    store: AdmissionStore, pool: Sequence[Candidate], callers: int, seconds: float
) -> dict[str, Any]:
    """The figures, or the row of a store that refused (it shows in the table)."""
    try:
        return await measure(store, pool, callers, seconds)
    except RuntimeError as error:
        return {"store": store.kind, "backends": len(pool), "callers": callers, "error": str(error)}


async def script_costs(url: str, size: int, count: int = 2000) -> dict[str, Any]:
    """Redis's own µs per admit and per release (INFO commandstats), one call at a time."""
    pool = pool_of(size)
    store = RedisStore(url, namespace=f"cost-{size}", replica_id="cost", lease_ttl=30.0,
                       timeout=1.0, on_failure="closed", limits=Limits())  # fmt: skip
    await store.start()
    try:
        warm = await store.admit(pool, least_loaded=True)  # the pool goes over once
        if not isinstance(warm, Admitted):
            raise RuntimeError(f"cannot admit: {warm}")
        await store.release(warm.ticket)
        before = script_cost(url)
        tickets = []
        for _ in range(count):
            decision = await store.admit(pool, least_loaded=True)
            if not isinstance(decision, Admitted):
                raise RuntimeError(f"unexpected rejection: {decision}")
            tickets.append(decision.ticket)
        middle = script_cost(url)
        for ticket in tickets:
            await store.release(ticket)
        after = script_cost(url)
    finally:
        await store.close()

    def per_call(start: dict[str, float], end: dict[str, float]) -> float:
        return round((end["usec"] - start["usec"]) / max(1.0, end["calls"] - start["calls"]), 2)

    return {
        "backends": size,
        "admit_usec": per_call(before, middle),
        "release_usec": per_call(middle, after),
    }


async def run_all(
    url: str, seconds: float, callers: int, sizes: Sequence[int], costs: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The figures per store and size; ``costs`` gets the script's cost per call."""
    results = []
    for size in sizes:
        pool = pool_of(size)
        results.append(await measured(MemoryStore(Limits()), pool, callers, seconds))
        store = RedisStore(url, namespace=f"bench-{size}", replica_id="bench", lease_ttl=30.0,
                           timeout=1.0, on_failure="closed", limits=Limits())  # fmt: skip
        await store.start()
        try:
            if store.mode != "ok":
                raise RuntimeError(f"cannot use Redis at {url}")
            before = script_cost(url)
            row = await measured(store, pool, callers, seconds)
            after = script_cost(url)
        finally:
            await store.close()
        calls = after["calls"] - before["calls"]
        if calls:
            # Each cycle is two script calls (admit, release): this is their mean.
            row["redis_usec_per_call"] = round((after["usec"] - before["usec"]) / calls, 2)
        results.append(row)
    for size in (sizes[0], sizes[-1]):
        try:
            costs.append(await script_costs(url, size))
        except RuntimeError as error:
            costs.append({"backends": size, "error": str(error)})
    for row in results:
        base = next(r for r in results if r["store"] == row["store"] and r["backends"] == sizes[0])
        if "error" not in row and "error" not in base:
            rate = row["admissions_per_second"] / base["admissions_per_second"]
            row["vs_smallest"] = round(rate, 2)
    return results


def to_markdown(results: list[dict[str, Any]], costs: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Admission cost against pool size",
        "",
        f"- Command: `{command}`",
        f"- When: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- least_conn, admit + release cycles of all callers together; Redis on loopback.",
        "",
        "| store | backends | callers | admits/s | vs 4 | p50 ms | p99 ms | Redis µs/call |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results:
        usec = row.get("redis_usec_per_call")
        if "error" in row:
            lines.append(
                f"| {row['store']} | {row['backends']:,} | {row['callers']} "
                f"| failed: {row['error']} | | | | |"
            )
            continue
        lines.append(
            f"| {row['store']} | {row['backends']:,} | {row['callers']} "
            f"| {row['admissions_per_second']:,} | {row['vs_smallest']:.2f}x "
            f"| {row['admit_p50_ms']:.3f} | {row['admit_p99_ms']:.3f} "
            f"| {'—' if usec is None else f'{usec:.1f}'} |"
        )
    lines += [
        "",
        "Redis's own time per script call, one call at a time (`INFO commandstats`):",
        "",
        "| backends | admit µs | release µs |",
        "|---:|---:|---:|",
    ]
    for cost in costs:
        if "error" in cost:
            lines.append(f"| {cost['backends']:,} | failed: {cost['error']} | |")
        else:
            lines.append(
                f"| {cost['backends']:,} | {cost['admit_usec']:.1f} | {cost['release_usec']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m bench.admission", description="Admission cost against pool size."
    )
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (3)")
    parser.add_argument("--callers", type=int, default=50, help="concurrent callers (50)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="pool sizes")
    parser.add_argument("--out", type=Path, help="write admission.md and admission.json here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        sizes = tuple(int(part) for part in args.sizes.split(","))
    except ValueError:
        parser.exit(2, f"--sizes: expected comma-separated integers, got {args.sizes!r}\n")
    if args.seconds <= 0 or args.callers < 1 or min(sizes) < 1:
        parser.exit(2, "--seconds, --callers and --sizes must be positive\n")
    with ProcessGroup() as group:
        url = args.redis or RedisServer(group).start().url
        costs: list[dict[str, Any]] = []
        results = run_async(run_all(url, args.seconds, args.callers, sizes, costs))
    command = "python -m bench.admission " + " ".join(argv)
    markdown = to_markdown(results, costs, command.strip())
    if args.out is not None:
        document = {"command": command.strip(), "results": results, "script_costs": costs}
        write_results(args.out, "admission", markdown, document)
    print(json.dumps(results, indent=2) if args.json else markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
