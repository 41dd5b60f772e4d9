"""Append and load throughput of an event store backend.

    python benchmarks/store_append.py [--url sqlite:///bench.db] [--synchronous NORMAL]

Reports: sequential appends of one execution (one engine step = one append of two small
events), appends/s with many executions appending at once (group commit on SQLite), and the
time to load a 10,000-event history.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agentainer_flow.store import ExecutionStatus, NewExecution, create_store
from agentainer_flow.store.events import ExecutionStarted, StepCompleted, StepStarted


async def _create(store: Any, eid: str) -> None:
    await store.create_execution(
        NewExecution(id=eid, workflow_name="bench"), ExecutionStarted(workflow_name="bench")
    )


async def _steps(
    store: Any, eid: str, n: int, latencies: list[float] | None = None, seq: int = 2
) -> int:
    for i in range(n):
        events = [StepStarted(step=f"s{i}", ts=1.0), StepCompleted(step=f"s{i}", result=i, ts=2.0)]
        t0 = time.perf_counter()
        await store.append(eid, seq, events, status=ExecutionStatus.RUNNING)
        if latencies is not None:
            latencies.append(time.perf_counter() - t0)
        seq += 2
    return seq


def sqlite_commit_baseline(directory: Path, synchronous: str, n: int = 2000) -> float:
    """Seconds per bare SQLite commit of one small row update, WAL, in ``directory``."""
    import sqlite3

    path = directory / "baseline.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("CREATE TABLE t (x INTEGER)")
    conn.execute("INSERT INTO t VALUES (0)")
    t0 = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE t SET x = ?", (i,))
        conn.execute("COMMIT")
    elapsed = (time.perf_counter() - t0) / n
    conn.close()
    return elapsed


async def run(
    url: str, options: dict[str, Any], sequential: int, executions: int, each: int
) -> None:
    async with create_store(url, **options) as store:
        await _create(store, "seq")
        seq = await _steps(store, "seq", 200)  # warm up
        lat: list[float] = []
        t0 = time.perf_counter()
        await _steps(store, "seq", sequential, lat, seq)
        elapsed = time.perf_counter() - t0
        lat.sort()
        print(
            f"sequential: {sequential / elapsed:,.0f} appends/s; latency mean "
            f"{statistics.fmean(lat) * 1e3:.3f} ms, p50 {lat[len(lat) // 2] * 1e3:.3f} ms, "
            f"p99 {lat[int(len(lat) * 0.99)] * 1e3:.3f} ms"
        )

        ids = [f"c{i}" for i in range(executions)]
        await asyncio.gather(*(_create(store, eid) for eid in ids))
        commits0 = getattr(store, "commit_count", None)
        t0 = time.perf_counter()
        await asyncio.gather(*(_steps(store, eid, each) for eid in ids))
        elapsed = time.perf_counter() - t0
        total = executions * each
        line = f"{executions} concurrent executions: {total / elapsed:,.0f} appends/s"
        if commits0 is not None:
            line += f" ({total} appends in {store.commit_count - commits0} commits)"
        print(line)

        await _create(store, "long")
        seq = 2
        for _ in range(100):
            batch = [StepCompleted(step="s", result={"i": i, "v": "x" * 20}) for i in range(100)]
            await store.append("long", seq, batch)
            seq += len(batch)
        loads = []
        for _ in range(5):
            t0 = time.perf_counter()
            history = await store.load("long")
            loads.append(time.perf_counter() - t0)
        print(f"load {len(history):,} events: best {min(loads) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="store URL (default: a fresh SQLite file)")
    parser.add_argument("--synchronous", help="SQLite synchronous mode (FULL by default)")
    parser.add_argument("--sequential", type=int, default=3000)
    parser.add_argument("--executions", type=int, default=100)
    parser.add_argument("--each", type=int, default=50)
    args = parser.parse_args()
    options = {"synchronous": args.synchronous} if args.synchronous else {}
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        if url.startswith("sqlite"):
            base = sqlite_commit_baseline(Path(tmp), args.synchronous or "FULL")
            print(f"baseline: bare SQLite commit {base * 1e3:.3f} ms")
        asyncio.run(run(url, options, args.sequential, args.executions, args.each))


if __name__ == "__main__":
    main()
