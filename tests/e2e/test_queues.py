"""Queues with real worker processes: a queue's concurrency limit holds across workers
(measured from the executions' own start and end stamps), priorities order the work, and a
worker inside a program (``Worker``) serves its queue only."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentainer_flow import (
    ExecutionMode,
    ExecutionStatus,
    Queue,
    Worker,
    WorkflowCancelledError,
    WorkflowClient,
)
from tests.e2e.queue_workflows import Job

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")

MODULE = Path(__file__).resolve().parent / "queue_workflows.py"
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


def start_worker(url: str, name: str, *queues: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    args = [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(MODULE),
            "--store", url, "--id", name, "--concurrency", "4", "--poll-interval", "0.1",
            "--grace", "0"]
    for q in queues:
        args += ["--queue", q]
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def stop(workers: list[subprocess.Popen[str]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err


def most_at_once(spans: list[tuple[float, float]]) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    now = peak = 0
    for _, step in edges:  # an end before a start at the same instant
        now += step
        peak = max(peak, now)
    return peak


async def test_a_queue_limited_to_two_never_runs_more_across_three_workers(
        store_url: str) -> None:
    queue = Queue("limited-two", concurrency=2)
    async with WorkflowClient(store=store_url) as client:
        executions = [await client.run_workflow(Job(i), ExecutionMode.ASYNC, queue=queue)
                      for i in range(12)]
        workers = [start_worker(store_url, f"w{i}", "limited-two") for i in range(3)]
        try:
            results = [await asyncio.wait_for(e.get_result(), 120) for e in executions]
        finally:
            stop(workers)
        holders = {(await e.describe()).lease_owner for e in executions}
    assert sorted(r["n"] for r in results) == list(range(12))
    spans = [(r["start"], r["end"]) for r in results]
    assert most_at_once(spans) == 2, spans  # the limit held, and was used
    assert holders == {None}  # every lease released


async def test_priorities_and_queues_choose_what_a_worker_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url) as client:
        low = await client.run_workflow(Job(1, 0.0), ExecutionMode.ASYNC, queue="jobs")
        high = await client.run_workflow(Job(2, 0.0), ExecutionMode.ASYNC, queue="jobs",
                                         priority=10)
        other = await client.run_workflow(Job(3, 0.0), ExecutionMode.ASYNC, queue="other")
        worker = Worker(client, queues=["jobs"], concurrency=1, once=True)
        assert await worker.run() == 2
        first, second = [await e.get_result() for e in (high, low)]
        assert first["end"] <= second["start"]  # priority 10 ran first
        assert (await other.status()).value == "pending"  # not this worker's queue
        stats = {q.config.name: q for q in await client.store.list_queues()}
        assert stats["other"].pending == 1
        assert "jobs" not in stats  # no limits, nothing left in it


def _workers(url: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    proc = subprocess.run([sys.executable, "-m", "agentainer_flow._cli", "workers", "--json",
                           "--store", url], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    import json

    rows: list[dict] = json.loads(proc.stdout)
    return rows


def test_flow_workers_lists_live_workers(store_url: str) -> None:
    """Two workers report themselves; one stopped cleanly leaves the list, one SIGKILLed
    stays with a heartbeat that no longer moves (``flow workers`` calls it lost after 15 s)."""
    a = start_worker(store_url, "alpha", "gpu", "cpu")
    b = start_worker(store_url, "beta")
    try:
        deadline = time.monotonic() + 30
        while len(rows := _workers(store_url)) < 2:
            assert time.monotonic() < deadline, rows
            time.sleep(0.2)
        by_name = {r["name"]: r for r in rows}
        assert by_name["alpha"]["queues"] == ["gpu", "cpu"] and by_name["alpha"]["alive"]
        assert by_name["beta"]["queues"] == ["*"] and by_name["beta"]["concurrency"] == 4
        stop([a])
        b.send_signal(signal.SIGKILL)
        b.communicate()
        rows = _workers(store_url)
        assert [r["name"] for r in rows] == ["beta"]  # alpha said goodbye; beta could not
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.kill()
            p.communicate()


async def test_a_per_tenant_limit_runs_one_execution_per_tenant_at_once(
        tmp_path: Path) -> None:
    """``Queue(concurrency_key="tenant")``: executions with the same ``tenant`` tag run one
    at a time, different tenants side by side."""
    tenants = Queue("per-tenant", concurrency_key="tenant")
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}") as client:
        runs = [(t, await client.run_workflow(Job(i, 0.3), ExecutionMode.ASYNC, queue=tenants,
                                              tags={"tenant": t}))
                for i, t in enumerate(["a", "a", "a", "b", "b", "b"])]
        worker = Worker(client, queues=[tenants], concurrency=6, once=True)
        await worker.run()
        results = [(t, await e.get_result()) for t, e in runs]
    for tenant in ("a", "b"):
        spans = [(r["start"], r["end"]) for t, r in results if t == tenant]
        assert most_at_once(spans) == 1, (tenant, spans)
    assert most_at_once([(r["start"], r["end"]) for _, r in results]) == 2


def test_flow_worker_imports_a_dotted_module_name(tmp_path: Path) -> None:
    """``-m`` takes a workflow file or a module name (found from the working directory)."""
    pkg = tmp_path / "myapp"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "jobs.py").write_text(MODULE.read_text())
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    cli = [sys.executable, "-m", "agentainer_flow._cli"]
    (tmp_path / "c.json").write_text('{"n": 3, "hold": 0.0}')
    queued = subprocess.run([*cli, "run", str(pkg / "jobs.py") + ":Job", "--config",
                             str(tmp_path / "c.json"), "--queue", "q", "--no-wait",
                             "--store", url], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert queued.returncode == 0, queued.stderr
    ran = subprocess.run([*cli, "worker", "-m", "myapp.jobs", "--queue", "q", "--once",
                          "--store", url], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert f"{queued.stdout.strip()} queued_job: completed" in ran.stdout


async def test_stopping_a_worker_lets_the_running_attempt_finish_and_starts_nothing_new(
        tmp_path: Path) -> None:
    from tests.e2e import queue_workflows

    queue_workflows.BODIES.clear()
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}") as client:
        execution = await client.run_workflow(queue_workflows.TwoStage(), ExecutionMode.ASYNC,
                                              queue="stages")
        worker = Worker(client, queues=["stages"], grace=30)
        running = asyncio.ensure_future(worker.run())
        for _ in range(500):  # until the first step's body runs
            if "first" in queue_workflows.BODIES:
                break
            await asyncio.sleep(0.02)
        began = time.monotonic()
        worker.stop()
        await running
        assert time.monotonic() - began < 5  # not the whole grace: the attempt was done
        types = [(e.type, e.step) for e in await client.get_history(execution.id)]
        assert ("step_completed", "first") in types  # the running attempt finished
        assert queue_workflows.BODIES == ["first"]  # the next step's body did not run here
        record = await execution.describe()
        assert record.lease_owner is None and not record.status.is_terminal
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}") as client:
        await Worker(client, queues=["stages"], once=True).run()
        assert await client.get_execution(execution.id).get_result() == 2
    assert queue_workflows.BODIES == ["first", "second"]  # each body ran once


@pytest.mark.postgres
async def test_a_cancel_asked_as_a_worker_claims_is_not_lost(postgres_url: str) -> None:
    """Cancels asked 0 to 30 ms after the start, while a worker claims and begins the run:
    each execution ends cancelled, and at once (the worker hears the cancel through
    LISTEN/NOTIFY, even one asked before its run began), not when its 1.5 s step ends
    with the cancel lost (the row saying cancel requested, the history completed)."""
    w = start_worker(postgres_url, "canceller", "cancels")
    try:
        async with WorkflowClient(store=postgres_url) as client:
            for _ in range(600):  # up (its heartbeat is written once it listens) and idle
                if any(info.name == "canceller" for info in await client.store.list_workers()):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # (its LISTEN connection is opened meanwhile)
            for i in range(12):
                ex = await client.run_workflow(Job(i, 1.5), ExecutionMode.ASYNC,
                                               queue="cancels")
                await asyncio.sleep((i % 4) * 0.01)
                assert await ex.cancel()
                t0 = time.monotonic()
                with pytest.raises(WorkflowCancelledError):
                    await asyncio.wait_for(ex.get_result(), 30)
                assert time.monotonic() - t0 < 1.2, f"execution {i}: the cancel waited"
                record = await ex.describe()
                assert record.status is ExecutionStatus.CANCELLED
    finally:
        stop([w])
