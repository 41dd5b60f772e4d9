"""Queue throughput and pickup latency of ``flow worker`` processes on Postgres.

    python benchmarks/queue_throughput.py [--workflows N] [--workers 1,2,4] [--json]
        [--concurrency 32] [--samples 50] [--enqueue first|live] [--parts ...]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]

Every part runs on a scratch database of its own (created here, dropped at the end).

  baseline    the bare Postgres commit: one connection, a loop of a single-row INSERT
              (200 bytes) and COMMIT, as ``run.py`` measures SQLite's; also 8 connections
              at once, with and without a ``pg_notify`` in each transaction (the store
              notifies in every append).
  shapes      the store and engine shapes of ``store_append.py`` and ``run.py`` on Postgres,
              with their own functions: sequential appends of one execution, a chain of
              1,000 trivial steps, 10-step chains and 5-step chains one after another, and
              5-step chains 100 in flight in one process (no queue); each as a fraction of
              the bare commit rate.
  interleaved the sequential shapes again, each in rounds between slices of bare commits:
              a ratio of two rates taken at the same moments, which the machine's drift
              moves much less. For the small workflows, each round also replays the
              statements one of them ran, without the engine: the store's SQL alone as a
              fraction of bare commits, and the engine's Python per workflow beside it.
  throughput  N 5-step chains (``_queue_bench_workflows.Chain5``) started with
              ``run_workflow(wf, ExecutionMode.ASYNC, queue="bench")``, run by 1, 2 and 4
              ``flow worker`` processes (``--concurrency C --poll-interval 0.05``).
              ``--enqueue first`` (default): all N are enqueued on a queue no worker
              serves, the workers are started, and once every one of them is ready (idle,
              its imports done) the N are moved to theirs in one statement: all workers
              start together, none competes with another's start-up; ``live``: the
              workers are started and idle, then the N are enqueued while they run.
              workflows/s = N / (last ``finished_at`` - first
              ``first_claimed_at``), from the executions' rows.
  latency     one idle worker; one workflow at a time: the time from just before
              ``run_workflow(queue=...)`` to the first step's ``StepStarted`` timestamp.

Throughput runs also say where the time went: CPU per workflow of the workers (from each
one's ready line on), of the Postgres processes of the scratch database and the server's
shared ones, of this process's enqueue, and of everything else on the machine (others'
programs); per workflow on the server (``pg_stat_database``, ``pg_stat_user_indexes``):
transactions, rollbacks, new connections, claim scans and the rows they read. ``--waits``
samples what the active backends wait for. ``--module FILE`` has the workers and this
process import another workflow file (defining ``Chain5``), e.g. one that patches the
store to try a change without editing it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from _queue_bench_workflows import Chain5  # the workers import the same file
from psycopg import sql
from run import Bench, chain10, chain_class  # also sets structlog to errors only, as run.py
from store_append import _create, _steps

from agentainer_flow import ExecutionMode, WorkflowClient
from agentainer_flow.store import ExecutionStatus, create_store
from agentainer_flow.store import sql as store_sql
from agentainer_flow.store.events import StepStarted
from agentainer_flow.store.postgres import CHANNEL

HERE = Path(__file__).resolve().parent
#: the file the workers import (``--module`` may name another that defines ``Chain5``)
MODULE = HERE / "_queue_bench_workflows.py"

WORKFLOW = "queue_bench_chain5"
WORKFLOW_CLASS: Any = Chain5
QUEUE = "bench"
HOLD = "bench-hold"  # no worker serves it: ``--enqueue first`` fills it, then moves all
DEFAULT_ADMIN = os.environ.get("FLOW_BENCH_POSTGRES_URL",
                               "postgresql://postgres@127.0.0.1:5432/postgres")
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT")
_TICK = os.sysconf("SC_CLK_TCK")

say_to = sys.stdout


def say(line: str = "") -> None:
    print(line, file=say_to, flush=True)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


# -- scratch databases ---------------------------------------------------------------------

class Databases:
    """Scratch databases on the server of ``admin``; every one is dropped by ``drop_all``."""

    def __init__(self, admin: str) -> None:
        self.admin = admin
        self.names: list[str] = []

    def create(self) -> str:
        name = f"flow_qbench_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.names.append(name)
        return _with_database(self.admin, name)

    def drop_all(self) -> None:
        with psycopg.connect(self.admin, autocommit=True, connect_timeout=5) as conn:
            for name in self.names:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        self.names.clear()


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{name}" + (f"?{query}" if query else "")


# -- CPU accounting (Linux /proc) ----------------------------------------------------------

def _proc_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _postgres_processes(database: str) -> dict[int, bool]:
    """Postgres processes: pid -> True for a backend of ``database``, False for a server
    process that serves every database (WAL writer, checkpointer...). Backends of other
    databases (other programs on this server) are left out."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f" {database} " in title:
                found[int(entry.name)] = True
            elif "(" not in title:  # a backend's title names its client: host(port)
                found[int(entry.name)] = False
    return found


def _machine() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _children_ticks(pid: int) -> int:
    """CPU of the exited children that ``pid`` waited for (cutime + cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[13]) + int(fields[14])


def _postmaster() -> int | None:
    """The Postgres server's main process: a postgres process whose parent is not one."""
    pids = set()
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pid = int(entry.name)
                    pids.add(pid)
                    parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                pass
    roots = [p for p in pids if parents[p] not in pids]
    return roots[0] if len(roots) == 1 else None


class CpuMeter:
    """CPU seconds between ``start()`` and ``stop()`` of given processes, of this process, of
    the Postgres backends of one database and the server's shared processes, and how busy
    the machine was. Backends come and go (a pool reconnects): live ones are sampled every
    100 ms; those that exit are counted from the server's main process, which waits for
    them (``cutime``: exited backends of every database, so also other programs' on this
    server)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._seen: dict[int, tuple[int, int]] = {}  # pid -> (ticks at start/first seen, last)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._postmaster = _postmaster()

    def _sample(self, first: bool = False) -> None:
        for pid in _postgres_processes(self.database):
            ticks = _proc_ticks(pid)
            if not ticks:
                continue
            base = self._seen.get(pid, (ticks if first else 0, 0))[0]
            self._seen[pid] = (base, ticks)

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    def start(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = time.time()
        self.own0 = sum(_proc_ticks(p) for p in pids)
        self.m0 = _machine()
        self.main0 = _proc_ticks(os.getpid())
        self.exited0 = _children_ticks(self._postmaster) if self._postmaster else 0
        self._sample(first=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        alive = set(_postgres_processes(self.database))
        own = (sum(_proc_ticks(p) for p in self.pids) - self.own0) / _TICK
        live = sum(last - base for pid, (base, last) in self._seen.items() if pid in alive)
        restarted = self._postmaster is not None and _postmaster() != self._postmaster
        if self._postmaster is not None and not restarted:
            exited = _children_ticks(self._postmaster) - self.exited0
        else:  # no server process to ask (or the server restarted): what was last seen
            exited = sum(last for pid, (_, last) in self._seen.items() if pid not in alive)
        before = sum(base for pid, (base, _) in self._seen.items() if pid not in alive)
        pg = (live + exited - before) / _TICK
        main = (_proc_ticks(os.getpid()) - self.main0) / _TICK
        m1 = _machine()
        busy = (m1[0] - self.m0[0]) / max(1, m1[1] - self.m0[1])
        seconds = time.time() - self.t0
        others = busy * (os.cpu_count() or 1) * seconds - own - pg - main
        return {"seconds": seconds, "processes_cpu_s": own, "postgres_cpu_s": pg,
                "postgres_exited_backends_cpu_s": exited / _TICK,
                "this_process_cpu_s": main, "other_cpu_s": max(0.0, others),
                "machine_busy": busy, "postgres_restarted": restarted}


def server_counters(url: str) -> dict[str, int]:
    """The scratch database's counters: transactions, rollbacks, rows fetched, connections
    opened, and the scans (claims) of the claim's index with the rows they read."""
    with psycopg.connect(url, autocommit=True) as conn:
        xacts, rollbacks, fetched, sessions = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_fetched, sessions FROM pg_stat_database "
            "WHERE datname = current_database()").fetchone()
        scans, read = conn.execute(
            "SELECT coalesce(sum(idx_scan), 0), coalesce(sum(idx_tup_read), 0) "
            "FROM pg_stat_user_indexes WHERE indexrelname = 'ix_flow_executions_unfinished_queue'"
        ).fetchone()
    return {"transactions": int(xacts), "rollbacks": int(rollbacks),
            "rows_fetched": int(fetched), "connections": int(sessions),
            "claim_scans": int(scans), "claim_rows_read": int(read)}


class WaitSampler:
    """What the database's active backends wait for, sampled from pg_stat_activity every
    20 ms (``--waits``): counts of (wait_event_type, wait_event), None for running."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        query = ("SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE datname = "
                 "current_database() AND pid <> pg_backend_pid() AND state = 'active'")
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.02):
                for kind, event in conn.execute(query).fetchall():
                    key = f"{kind}/{event}" if kind else "running (CPU)"
                    self.counts[key] = self.counts.get(key, 0) + 1

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        total = sum(self.counts.values()) or 1
        return {k: v / total for k, v in sorted(self.counts.items(), key=lambda kv: -kv[1])}


# -- worker processes ----------------------------------------------------------------------

class WorkerProcess:
    """One ``flow worker`` process; its progress lines are counted as they arrive."""

    def __init__(self, url: str, name: str, concurrency: int, poll: float, log_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        self.args = [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(MODULE),
                     "--store", url, "--queue", QUEUE, "--concurrency", str(concurrency),
                     "--poll-interval", str(poll), "--id", name, "--grace", "0"]
        self.stderr_path = log_dir / f"{name}.err"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen(self.args, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                     bufsize=1)
        self.name = name
        self.ready_at: float | None = None
        self.ready_ticks = 0
        self.claimed = 0
        self.completed = 0
        self.other: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self.ready_at is None and " started (concurrency" in line:
                self.ready_ticks = _proc_ticks(self.proc.pid)
                self.ready_at = time.time()
            elif ": claimed (" in line:
                self.claimed += 1
            elif line.rstrip().endswith(": completed"):
                self.completed += 1
            elif " stopped; " not in line:
                self.other.append(line.rstrip())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        self._stderr.close()

    def errors(self) -> list[str]:
        text = self.stderr_path.read_text() if self.stderr_path.exists() else ""
        return [line for line in text.splitlines() if line.strip()] + self.other


@contextmanager
def workers(url: str, count: int, concurrency: int, poll: float) -> Iterator[list[WorkerProcess]]:
    """``count`` worker processes, stopped (SIGTERM, then SIGKILL) whatever happens."""
    with tempfile.TemporaryDirectory(prefix="qbench-") as logs:
        procs: list[WorkerProcess] = []
        try:
            for i in range(count):
                procs.append(WorkerProcess(url, f"qbench-w{i}", concurrency, poll, Path(logs)))
            yield procs
        finally:
            for p in procs:
                if p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGTERM)
            for p in procs:
                p.stop()
            for p in procs:
                for line in p.errors()[:5]:
                    say(f"    [{p.name}] {line}")


async def wait_ready(procs: list[WorkerProcess], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(p.ready_at is None for p in procs):
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.proc.returncode}): "
                                   + "\n".join(p.errors()[-10:]))
        if time.monotonic() > deadline:
            raise TimeoutError("workers did not start")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def client_on(url: str) -> Any:
    async with WorkflowClient(store=url, runtime="mock") as client:
        yield client


# -- 1. the bare commit --------------------------------------------------------------------

def bare_commit(url: str, n: int = 2000, rounds: int = 3) -> dict[str, float]:
    """Median seconds of one INSERT (200 bytes) + COMMIT on one connection; and commits/s of
    8 connections at once, without and with a pg_notify in each transaction."""
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bare (a integer, b bytea)")
        conn.commit()
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(n):
                conn.execute("INSERT INTO bare VALUES (%s, %s)", (i, b"x" * 200))
                conn.commit()
            times.append((time.perf_counter() - t0) / n)

    def concurrent(notify: bool, threads: int = 8, each: int = 300) -> float:
        def loop() -> None:
            with psycopg.connect(url) as c:
                for i in range(each):
                    c.execute("INSERT INTO bare VALUES (%s, %s)", (i, b"x" * 200))
                    if notify:
                        c.execute("SELECT pg_notify('qbench_bare', 'x')")
                    c.commit()

        pool = [threading.Thread(target=loop) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return threads * each / (time.perf_counter() - t0)

    plain = statistics.median(concurrent(False) for _ in range(rounds))
    notified = statistics.median(concurrent(True) for _ in range(rounds))
    commit = statistics.median(times)
    return {"commit_ms": commit * 1e3, "commits_per_s": 1 / commit,
            "eight_connections_per_s": plain, "eight_connections_notify_per_s": notified}


# -- 2. the shapes of store_append.py and run.py -------------------------------------------

class _PgBench(Bench):
    """``run.py``'s benchmarks on one Postgres database (every run on the same one)."""

    def __init__(self, url: str, quick: bool) -> None:
        super().__init__(Path(tempfile.gettempdir()), quick)
        self.pg = url

    def url(self, store: str) -> str:
        return self.pg


async def shapes(url: str, commits_per_s: float, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with create_store(url) as store:
        eid = f"seq-{uuid.uuid4().hex[:8]}"
        await _create(store, eid)
        seq = await _steps(store, eid, 200)  # warm up
        lat: list[float] = []
        n = 1000 if quick else 3000
        t0 = time.perf_counter()
        await _steps(store, eid, n, lat, seq)
        rate = n / (time.perf_counter() - t0)
    out["sequential_appends"] = {"per_s": rate, "p50_ms": pct(lat, 0.5) * 1e3,
                                 "of_bare": rate / commits_per_s}
    say(f"  sequential appends, 1 execution (store_append.py)  {rate:8,.0f} appends/s  "
        f"p50 {pct(lat, 0.5) * 1e3:.3f} ms  = {rate / commits_per_s:.0%} of bare commits")
    bench = _PgBench(url, quick)
    chain_n = 300 if quick else 1000
    steps = await bench.chain("pg", chain_n)
    out["chain_steps"] = {"steps": chain_n, "per_s": steps, "of_bare": steps / commits_per_s}
    say(f"  chain of {chain_n} trivial steps (run.py)          {steps:8,.0f} steps/s    "
        f"         = {steps / commits_per_s:.0%} of bare commits (1 commit a step)")
    small = 100 if quick else 300
    for label, make, commits in (("10-step chains one after another", chain10, 11),
                                 ("5-step chains one after another", Chain5, 6)):
        wf = await bench.sequential("pg", make, small)
        out[label] = {"per_s": wf, "commits_each": commits,
                      "of_bare": wf * commits / commits_per_s}
        say(f"  {label:<46}{wf:8,.0f} wf/s        "
            f"= {wf * commits / commits_per_s:.0%} of bare commits ({commits} commits each)")
    many = 300 if quick else 1000
    wf = await bench.concurrent("pg", Chain5, many)
    out["5-step chains, 100 in flight, one process, no queue"] = {"per_s": wf, "count": many}
    say(f"  5-step chains, 100 in flight, 1 process, no queue {wf:8,.0f} wf/s")
    return out


def _bare_slice(conn: psycopg.Connection[Any], n: int) -> float:
    """Seconds for ``n`` bare commits (``bare_commit``'s INSERT + COMMIT) on ``conn``."""
    t0 = time.perf_counter()
    for i in range(n):
        conn.execute("INSERT INTO bare VALUES (%s, %s)", (i, b"x" * 200))
        conn.commit()
    return time.perf_counter() - t0


@contextmanager
def _statements() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The statements (SQL and bound parameters) the store runs meanwhile, in order."""
    seen: list[tuple[str, dict[str, Any]]] = []
    rows = store_sql.Tx.rows

    def recorded(tx: store_sql.Tx, stmt: store_sql.Prepared, values: Any) -> Any:
        seen.append((stmt.sql, dict(stmt.bind(values))))
        return rows(tx, stmt, values)

    store_sql.Tx.rows = recorded  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        store_sql.Tx.rows = rows  # type: ignore[method-assign]


def _replay(cur: psycopg.Cursor[Any], statements: list[tuple[str, dict[str, Any]]],
            n: int) -> float:
    """Seconds to run ``statements`` (one workflow's, as recorded) ``n`` times, each time for
    a new execution id and with its times moved to now: the same SQL without the engine."""
    old_id = statements[0][1]["id"]
    t_rec = statements[0][1]["created_at"]
    elapsed = 0.0
    for _ in range(n):
        new_id, shift = str(uuid.uuid4()), time.time() - t_rec
        batch = [(text, {k: new_id if v == old_id else
                         v + shift if isinstance(v, float) and abs(v - t_rec) < 3600 else v
                         for k, v in params.items()})
                 for text, params in statements]
        t0 = time.perf_counter()
        for text, params in batch:
            cur.execute(text, params)
            if not cur.fetchall():
                raise RuntimeError("a replayed statement matched no row: its guard failed")
        elapsed += time.perf_counter() - t0
    return elapsed


async def interleaved(url: str, quick: bool) -> dict[str, Any]:
    """The sequential shapes against bare commits measured in slices between theirs.

    The machine's speed drifts within a minute (the bare commit moved from 0.78 to 1.23 ms
    between runs a minute apart, and a shape's rate by as much on the same code), so a
    ratio taken against one bare measurement made a minute before swings with the drift.
    Here each shape runs in rounds, each round a slice of 250 bare commits on a connection
    of this process and then a slice of the shape: both see the same moments. The ratio is
    the shape's commits per second (nominal: one a step, plus the start) over the bare
    commits per second, each from its own slices' summed time.

    Each round of the small workflows also replays, on a connection of its own, the very
    statements one such workflow ran (recorded in the warm-up), for new executions: the
    store's SQL alone, without the engine. Its ratio is the ceiling the engine's Python
    takes the shape down from; the difference per workflow is that Python.
    """
    rounds = 4 if quick else 8
    chain = chain_class(200, "bench_chain_200")
    out: dict[str, Any] = {}
    with psycopg.connect(url) as conn, psycopg.connect(url, autocommit=True) as replay_conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bare (a integer, b bytea)")
        conn.commit()
        replay_cur = replay_conn.cursor(binary=True)  # as the store's
        async with WorkflowClient(store=url, runtime="mock") as client:
            for label, make, commits, per_round in (
                    ("chain of 200 trivial steps", chain, 200, 1),
                    ("10-step chains one after another", chain10, 11, 25),
                    ("5-step chains one after another", Chain5, 6, 40)):
                for _ in range(3):  # warm up: statements prepared, caches filled
                    await client.run_workflow(make())
                with _statements() as recorded:
                    await client.run_workflow(make())
                replay = recorded if commits != 200 and len(recorded) == commits else None
                if replay is not None:
                    _replay(replay_cur, replay, 5)  # prepared there too
                bare_s = shape_s = replay_s = 0.0
                for _ in range(rounds):
                    bare_s += _bare_slice(conn, 250)
                    t0 = time.perf_counter()
                    for _ in range(per_round):
                        await client.run_workflow(make())
                    shape_s += time.perf_counter() - t0
                    if replay is not None:
                        replay_s += _replay(replay_cur, replay, per_round)
                bare_per_s = rounds * 250 / bare_s
                wf_per_s = rounds * per_round / shape_s
                ratio = wf_per_s * commits / bare_per_s
                out[label] = {"per_s": wf_per_s, "commits_each": commits,
                              "statements_each": len(recorded),
                              "bare_commit_ms": 1e3 / bare_per_s, "of_bare": ratio}
                unit = "steps/s" if commits == 200 else "wf/s   "
                rate = wf_per_s * 200 if commits == 200 else wf_per_s
                say(f"  {label:<46}{rate:8,.0f} {unit}  bare {1e3 / bare_per_s:.3f} ms "
                    f"= {ratio:.0%} of bare commits")
                if replay is not None:
                    n = rounds * per_round
                    sql_ratio = commits * n / replay_s / bare_per_s
                    python_ms = (shape_s - replay_s) / n * 1e3
                    out[label].update({"sql_alone_of_bare": sql_ratio,
                                       "engine_python_ms_per_wf": python_ms})
                    say(f"    its statements replayed without the engine: {sql_ratio:.0%} of "
                        f"bare commits; the engine adds {python_ms:.2f} ms a workflow")
    return out


# -- 3. throughput ---------------------------------------------------------------------------

async def enqueue(client: WorkflowClient, n: int, in_flight: int = 50,
                  queue: str = QUEUE) -> tuple[float, float]:
    """Start ``n`` executions on ``queue``, ``in_flight`` at a time: (seconds, CPU seconds
    of this process)."""
    gate = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with gate:
            await client.run_workflow(WORKFLOW_CLASS(), ExecutionMode.ASYNC, queue=queue)

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(n)))
    return time.perf_counter() - t0, time.process_time() - cpu0


def release_held(url: str) -> None:
    """Move the executions waiting on ``HOLD`` to the workers' queue, and wake them (a
    NOTIFY naming one of them, as a new execution's insert does)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE flow_executions SET queue = %s WHERE queue = %s", (QUEUE, HOLD))
        conn.execute("SELECT pg_notify(%s, id) FROM flow_executions WHERE queue = %s LIMIT 1",
                     (CHANNEL, QUEUE))


async def throughput(url: str, n: int, count: int, concurrency: int, poll: float,
                     mode: str, waits: bool = False) -> dict[str, Any]:
    meter = CpuMeter(url.rsplit("/", 1)[1].split("?")[0])
    async with client_on(url) as client:
        enqueue_s = enqueue_cpu = 0.0
        if mode == "first":
            enqueue_s, enqueue_cpu = await enqueue(client, n, queue=HOLD)
            await asyncio.sleep(1.1)  # backends report their counters at most once a second
        before = server_counters(url)
        with workers(url, count, concurrency, poll) as procs:
            await wait_ready(procs)
            ready = [p.ready_at or 0.0 for p in procs]
            meter.start([p.proc.pid for p in procs])
            base = {p.proc.pid: p.ready_ticks for p in procs}
            meter.own0 = sum(base.values())  # worker CPU from each one's ready line on
            sampler = WaitSampler(url) if waits else None
            if mode == "live":
                enqueue_s, enqueue_cpu = await enqueue(client, n)
            else:
                release_held(url)
            deadline = time.monotonic() + max(120.0, n / 10)
            while sum(p.completed for p in procs) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{sum(p.completed for p in procs)} of {n} completed")
                await asyncio.sleep(0.05)
            cpu = meter.stop()
            waited = sampler.stop() if sampler is not None else None
            per_worker = [p.completed for p in procs]
        await asyncio.sleep(0.5)  # the workers' backends have exited and reported
        after = server_counters(url)
        rows = await client.store.list_executions(workflow_name=WORKFLOW, limit=None)
    server = {k: (after[k] - before[k]) / n for k in after}
    done = [r for r in rows if r.status is ExecutionStatus.COMPLETED]
    if len(done) != n or len(rows) != n:
        raise RuntimeError(f"{len(done)} of {len(rows)} executions completed, expected {n}")
    first = min(r.first_claimed_at or r.created_at for r in rows)
    ends = sorted(r.finished_at or 0.0 for r in rows)
    window = ends[-1] - first
    lo, hi = int(n * 0.1), int(n * 0.9)
    middle = (hi - lo) / (ends[hi] - ends[lo]) if ends[hi] > ends[lo] else float("nan")
    in_worker = [(r.finished_at or 0.0) - (r.first_claimed_at or 0.0) for r in rows]
    return {
        "workers": count, "concurrency": concurrency, "workflows": n, "enqueue": mode,
        "per_s": n / window, "window_s": window, "middle_80pct_per_s": middle,
        "enqueue_s": enqueue_s, "enqueue_per_s": n / enqueue_s if enqueue_s else None,
        "enqueue_cpu_ms_per_wf": enqueue_cpu / n * 1e3,
        "ready_spread_s": max(ready) - min(ready),
        "first_claim_after_last_ready_s": first - max(ready),
        "claim_to_finish_p50_ms": pct(in_worker, 0.5) * 1e3,
        "per_worker_completed": per_worker,
        "worker_cpu_ms_per_wf": cpu["processes_cpu_s"] / n * 1e3,
        "postgres_cpu_ms_per_wf": cpu["postgres_cpu_s"] / n * 1e3,
        "postgres_exited_backends_cpu_ms_per_wf":
            cpu["postgres_exited_backends_cpu_s"] / n * 1e3,
        "benchmark_process_cpu_ms_per_wf": cpu["this_process_cpu_s"] / n * 1e3,
        "machine_busy": cpu["machine_busy"],
        "other_processes_cores": cpu["other_cpu_s"] / cpu["seconds"],
        "postgres_restarted": cpu["postgres_restarted"],  # by someone else: a void run
        "server_per_wf": server,  # with --enqueue live, the enqueue's share too
        "backend_waits": waited,
    }


# -- 4. pickup latency -------------------------------------------------------------------------

async def latency(url: str, samples: int, concurrency: int, poll: float) -> dict[str, Any]:
    rng = random.Random(7)
    pickup, returned, claimed, to_step = [], [], [], []
    async with client_on(url) as client:
        with workers(url, 1, concurrency, poll) as procs:
            await wait_ready(procs)
            for i in range(samples + 5):  # 5 to warm up
                await asyncio.sleep(rng.uniform(0.05, 0.15))  # the worker waits, idle
                t0 = time.time()
                ex = await client.run_workflow(WORKFLOW_CLASS(), ExecutionMode.ASYNC,
                                               queue=QUEUE)
                t1 = time.time()
                await ex.get_result(timeout=30)
                record = await ex.describe()
                history = await client.store.load(ex.id)
                start = next(s.event.ts for s in history if isinstance(s.event, StepStarted))
                if i < 5:
                    continue
                pickup.append(start - t0)
                returned.append(t1 - t0)
                claimed.append((record.first_claimed_at or 0.0) - t0)
                to_step.append(start - (record.first_claimed_at or 0.0))

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50_ms": pct(values, 0.5) * 1e3, "p90_ms": pct(values, 0.9) * 1e3,
                "max_ms": max(values) * 1e3}

    return {"samples": samples, "pickup": stats(pickup), "run_workflow_returns": stats(returned),
            "claimed": stats(claimed), "claim_to_first_step": stats(to_step)}


# -- main ------------------------------------------------------------------------------------

def python_probe() -> float:
    """Seconds for 5 million additions in a Python loop, best of 3: how fast this machine's
    CPU is just now. Seen here between about 0.45 and 0.55 s on the same machine kind, and
    the costs per workflow moved by up to 2x from one hour to the next while it barely
    moved: what it does not catch (memory, system calls, the host's other guests) moves
    more. Compare runs by their ratios and CPU per workflow, taken together."""
    best = float("inf")
    for _ in range(3):
        t0, total = time.perf_counter(), 0
        for i in range(5_000_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best


def _revision() -> str:
    """The commit of the engine this runs (and whether its tree is modified), or where the
    engine was imported from when it is not this checkout (``PYTHONPATH=export``)."""
    import agentainer_flow

    repo = HERE.parent
    where = Path(agentainer_flow.__file__).resolve().parent.parent
    if where != repo:
        return f"engine imported from {where}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "engine", "store", "sdk"],
                               cwd=repo, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (engine/store/sdk modified)" if dirty else "")


def use_module(path: Path) -> None:
    global MODULE, WORKFLOW_CLASS
    spec = importlib.util.spec_from_file_location(f"qbench_{path.stem}", path.resolve())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    MODULE, WORKFLOW_CLASS = path.resolve(), module.Chain5


async def main() -> int:
    global say_to
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=2000, help="N for throughput")
    parser.add_argument("--workers", default="1,2,4", help="worker process counts")
    parser.add_argument("--concurrency", type=int, default=32, help="--concurrency of each")
    parser.add_argument("--poll-interval", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=50, help="pickup latency samples")
    parser.add_argument("--enqueue", choices=("first", "live"), default="first")
    parser.add_argument("--parts", default="baseline,shapes,interleaved,throughput,latency")
    parser.add_argument("--quick", action="store_true", help="smaller shapes runs")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN,
                        help="a Postgres URL whose user may create databases")
    parser.add_argument("--waits", action="store_true",
                        help="sample what the active backends wait for (pg_stat_activity)")
    parser.add_argument("--module", type=Path, default=None,
                        help="a workflow file defining Chain5 (queue_bench_chain5) for the "
                        "workers and this process to import instead of the default, e.g. to "
                        "try a change to the store in a subclass")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.module is not None:
        use_module(args.module)
    parts = set(args.parts.split(","))
    counts = [int(c) for c in args.workers.split(",") if c]
    if args.json:
        say_to = sys.stderr
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_at_start": os.getloadavg()},
        "revision": _revision(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
        "python_loop_probe_s": python_probe(),
    }
    dbs = Databases(args.admin_url)
    try:
        with psycopg.connect(args.admin_url, connect_timeout=5) as conn:
            result["machine"]["postgres"] = conn.execute("SHOW server_version").fetchone()[0]
        say(f"{result['time']}, {result['machine']['cpus']} CPUs, Python "
            f"{result['machine']['python']}, Postgres {result['machine']['postgres']}, "
            f"revision {result['revision']}, load {os.getloadavg()[0]:.2f}, Python probe "
            f"{result['python_loop_probe_s']:.3f} s")
        commits_per_s = None
        if "baseline" in parts or "shapes" in parts:
            bare = bare_commit(dbs.create())
            result["bare_commit"] = bare
            commits_per_s = bare["commits_per_s"]
            say(f"bare Postgres commit (INSERT + COMMIT, 1 connection): {bare['commit_ms']:.3f} ms"
                f" = {commits_per_s:,.0f} commits/s; 8 connections: "
                f"{bare['eight_connections_per_s']:,.0f}/s, with pg_notify: "
                f"{bare['eight_connections_notify_per_s']:,.0f}/s")
        if "shapes" in parts:
            assert commits_per_s is not None
            say("shapes on Postgres:")
            result["shapes"] = await shapes(dbs.create(), commits_per_s, args.quick)
        if "interleaved" in parts:
            say("sequential shapes, each in rounds between slices of bare commits:")
            result["interleaved"] = await interleaved(dbs.create(), args.quick)
        if "throughput" in parts:
            say(f"throughput: {args.workflows} 5-step chains, enqueue {args.enqueue}, "
                f"--concurrency {args.concurrency} --poll-interval {args.poll_interval}")
            result["throughput"] = []
            for count in counts:
                r = await throughput(dbs.create(), args.workflows, count, args.concurrency,
                                     args.poll_interval, args.enqueue, args.waits)
                result["throughput"].append(r)
                say(f"  {count} worker(s): {r['per_s']:7,.0f} wf/s over {r['window_s']:.2f} s "
                    f"(middle 80%: {r['middle_80pct_per_s']:,.0f} wf/s); enqueue "
                    f"{r['enqueue_per_s']:,.0f}/s ({r['enqueue_cpu_ms_per_wf']:.2f} ms CPU each); "
                    f"per worker {r['per_worker_completed']}; "
                    f"CPU/wf: workers {r['worker_cpu_ms_per_wf']:.2f} ms, postgres "
                    f"{r['postgres_cpu_ms_per_wf']:.2f} ms (exited backends "
                    f"{r['postgres_exited_backends_cpu_ms_per_wf']:.2f}); machine "
                    f"{r['machine_busy']:.0%} busy, {r['other_processes_cores']:.2f} cores by "
                    f"others; ready spread "
                    f"{r['ready_spread_s'] * 1e3:.0f} ms")
                if r["postgres_restarted"]:
                    say("    the Postgres server restarted during this run: do not use it")
                sv = r["server_per_wf"]
                say(f"    per workflow on the server: {sv['transactions']:.1f} transactions "
                    f"({sv['rollbacks']:.2f} rolled back), "
                    f"{sv['claim_scans']:.2f} claim scans reading {sv['claim_rows_read']:,.0f} "
                    f"index rows, {sv['rows_fetched']:,.0f} rows fetched, "
                    f"{sv['connections']:.3f} new connections")
                if r["backend_waits"]:
                    top = list(r["backend_waits"].items())[:5]
                    say("    active backends were: " + ", ".join(f"{k} {v:.0%}" for k, v in top))
        if "latency" in parts:
            r = await latency(dbs.create(), args.samples, args.concurrency, args.poll_interval)
            result["latency"] = r
            say(f"pickup latency, 1 idle worker, {args.samples} samples: p50 "
                f"{r['pickup']['p50_ms']:.1f} ms, p90 {r['pickup']['p90_ms']:.1f} ms, max "
                f"{r['pickup']['max_ms']:.1f} ms (run_workflow returns p50 "
                f"{r['run_workflow_returns']['p50_ms']:.1f} ms; claimed p50 "
                f"{r['claimed']['p50_ms']:.1f} ms; claim to first step p50 "
                f"{r['claim_to_first_step']['p50_ms']:.1f} ms)")
    finally:
        dbs.drop_all()
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
