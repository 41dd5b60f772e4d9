"""Engine benchmarks on the embedded default store (SQLite, durable) and on memory.

    python benchmarks/run.py [--quick] [--store-dir DIR] [--write RESULTS.md]

Measures:
  1. a chain of N trivial steps (steps/s): the per-step cost of engine + durable commit;
  2. small 10-step workflows one after another (workflows/s), as a chain and as a diamond
     (1 -> 8 parallel -> 1);
  3. the same small workflows 100 at a time (workflows/s): appends of concurrent
     executions share commits;
  4. resuming a 10,000-event history (ms): load, fold, replay, finish.
Each figure is the best of a few runs; the bare durable SQLite commit is measured first,
since this disk's fsync latency moves every other number.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from agentainer_flow import ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow.store import NewExecution, create_store
from agentainer_flow.store.events import ExecutionStarted

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only


def chain_class(n: int, name: str) -> type:
    """A workflow whose DAG is a chain of ``n`` trivial steps."""

    def make(i: int) -> Any:
        async def body(self: Any, ctx: Any, prev: Any = None) -> int:
            return i

        body.__name__ = f"s{i}"
        return step(name=f"s{i}", depends_on=[f"s{i - 1}"] if i else [])(body)

    return workflow(name=name)(type(name, (), {f"s{i}": make(i) for i in range(n)}))


@workflow(name="bench_diamond")
class Diamond:
    """Ten steps: one, eight in parallel, one."""

    @step()
    async def start(self, ctx: Any) -> int:
        return 1

    @step(depends_on=["start"], parallel=True, count=8)
    async def fan(self, ctx: Any, i: int) -> int:
        return i

    @step(depends_on=["fan"], reduce=True)
    async def join(self, ctx: Any, fan_results: list[int]) -> int:
        return sum(fan_results)


def bare_commit_ms(directory: Path, n: int = 1000) -> float:
    """Mean latency of one durable SQLite commit (WAL, synchronous=FULL) on this disk."""
    path = directory / "bare.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (a INTEGER, b BLOB)")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT INTO t VALUES (?, ?)", (i, b"x" * 200))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed / n * 1000


async def best(runs: int, fn: Callable[[], Awaitable[float]]) -> float:
    return max([await fn() for _ in range(runs)])


class Bench:
    def __init__(self, directory: Path, quick: bool) -> None:
        self.dir = directory
        self.quick = quick
        self.runs = 2 if quick else 3
        self._n = 0

    def url(self, store: str) -> str:
        if store == "memory":
            return "memory://"
        self._n += 1
        return f"sqlite:///{self.dir / f'bench{self._n}.db'}"

    async def chain(self, store: str, n: int) -> float:
        cls = chain_class(n, f"bench_chain_{n}")

        async def once() -> float:
            async with WorkflowClient(store=self.url(store), runtime="mock") as client:
                start = time.perf_counter()
                ex = await client.run_workflow(cls())
                elapsed = time.perf_counter() - start
                assert await ex.get_result() == n - 1
            return n / elapsed

        return await best(self.runs, once)

    async def sequential(self, store: str, make: Callable[[], object], count: int) -> float:
        async def once() -> float:
            async with WorkflowClient(store=self.url(store), runtime="mock") as client:
                start = time.perf_counter()
                for _ in range(count):
                    await client.run_workflow(make())
                return count / (time.perf_counter() - start)

        return await best(self.runs, once)

    async def concurrent(self, store: str, make: Callable[[], object], count: int,
                         in_flight: int = 100) -> float:
        async def once() -> float:
            async with WorkflowClient(store=self.url(store), runtime="mock") as client:
                gate = asyncio.Semaphore(in_flight)

                async def one() -> None:
                    async with gate:
                        ex = await client.run_workflow(make(), ExecutionMode.ASYNC)
                        await ex.get_result()

                start = time.perf_counter()
                await asyncio.gather(*(one() for _ in range(count)))
                return count / (time.perf_counter() - start)

        return await best(self.runs, once)

    async def resume_10k(self) -> tuple[float, int]:
        """Milliseconds to resume an execution whose history holds 10,000 events."""
        n = 5000  # a chain of 5,000 steps: 10,000+ events
        cls = chain_class(n, "bench_resume")
        source = self.url("sqlite")
        async with WorkflowClient(store=source, runtime="mock") as client:
            ex = await client.run_workflow(cls())
            history = await client.store.load(ex.id)
        cut = 10_000  # the execution "crashed" after its 10,000th event
        times = []
        for _ in range(self.runs + 2):
            target = self.url("sqlite")
            store = create_store(target)
            async with store:
                first = history[0].event
                assert isinstance(first, ExecutionStarted)
                await store.create_execution(NewExecution(id=ex.id, workflow_name=cls.__name__),
                                             first)
                await store.append(ex.id, 2, [s.event for s in history[1:cut]])
            async with WorkflowClient(store=target, runtime="mock") as client:
                start = time.perf_counter()
                resumed = await client.resume(ex.id)
                elapsed = time.perf_counter() - start
                assert await resumed.get_result() == n - 1
            times.append(elapsed * 1000)
        return min(times), cut


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and smaller runs")
    parser.add_argument("--store-dir", type=Path, default=None)
    parser.add_argument("--write", type=Path, default=None, help="append results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.store_dir) as tmp:
        directory = Path(tmp)
        bench = Bench(directory, args.quick)
        commit = statistics.median(bare_commit_ms(directory) for _ in range(3))
        chain_n = 300 if args.quick else 1000
        small = 100 if args.quick else 300
        many = 300 if args.quick else 1000
        rows: list[tuple[str, str, str]] = []

        def row(what: str, value: str, note: str = "") -> None:
            rows.append((what, value, note))
            print(f"{what:<58} {value:>14}  {note}", flush=True)

        row("bare durable SQLite commit (WAL, synchronous=FULL)", f"{commit:.3f} ms")
        for store in ("sqlite", "memory"):
            label = "SQLite durable" if store == "sqlite" else "memory"
            rate = await bench.chain(store, chain_n)
            row(f"chain of {chain_n} trivial steps, {label}", f"{rate:,.0f} steps/s",
                f"{1000 / rate:.3f} ms/step")
        for shape, make in (("chain", lambda: chain10()), ("diamond", Diamond)):
            rate = await bench.sequential("sqlite", make, small)
            row(f"10-step {shape} workflows one after another, SQLite", f"{rate:,.0f} wf/s")
        for shape, make in (("chain", lambda: chain10()), ("diamond", Diamond)):
            rate = await bench.concurrent("sqlite", make, many)
            row(f"10-step {shape} workflows, 100 in flight, SQLite", f"{rate:,.0f} wf/s")
        ms, events = await bench.resume_10k()
        row(f"resume of a {events:,}-event history, SQLite", f"{ms:.0f} ms",
            "load + fold + finish")
    if args.write:
        with args.write.open("a") as f:
            cpu = platform.processor() or platform.machine()
            quick = " (quick)" if args.quick else ""
            f.write(f"\n### {time.strftime('%Y-%m-%d %H:%M')}, {cpu}, "
                    f"Python {platform.python_version()}{quick}\n\n")
            f.write("| measure | result | note |\n|---|---:|---|\n")
            for what, value, note in rows:
                f.write(f"| {what} | {value} | {note} |\n")
    return 0


_CHAIN10 = chain_class(10, "bench_chain_10")


def chain10() -> object:
    return _CHAIN10()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
