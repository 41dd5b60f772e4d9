"""Suspended executions cost nothing: a worker lets go of an execution whose every step
instance sleeps (lease released, nothing kept in memory) and claims it again when its timer
is due."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentainer_flow import ExecutionMode, Worker, WorkflowClient
from tests.e2e.sleep_workflows import Backoff, Napper

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")

MODULE = Path(__file__).resolve().parent / "sleep_workflows.py"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


async def test_a_sleeping_execution_is_released_and_resumed_on_time(store_url: str) -> None:
    async with WorkflowClient(store=store_url) as client:
        worker = Worker(client, queues=["naps"], concurrency=4, poll_interval=5.0,
                        suspend_after=1.0)
        running = asyncio.ensure_future(worker.run())
        try:
            execution = await client.run_workflow(Napper(7, "3s"), ExecutionMode.ASYNC,
                                                  queue="naps")
            deadline = time.monotonic() + 10
            while worker.suspended == 0:  # all three instances sleep: it is let go
                assert time.monotonic() < deadline, "never suspended"
                await asyncio.sleep(0.05)
            asleep = await execution.describe()
            assert asleep.lease_owner is None and asleep.wake_at is not None
            assert execution.id not in client.engine.runners  # nothing kept in memory
            result = await asyncio.wait_for(execution.get_result(), 30)
            woke_late = result["woke"] - asleep.wake_at
            assert 0 <= woke_late < 0.5, woke_late  # claimed again when due (the issue: 100 ms)
            history = [e.type for e in await client.get_history(execution.id)]
            assert history.count("timer_started") == 3 and history.count("timer_fired") == 3
        finally:
            worker.stop()
            worker.stop()
            await running



def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _start_worker(url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    return subprocess.Popen(
        [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(MODULE),
         "--store", url, "--queue", "naps", "--concurrency", "50", "--poll-interval", "1",
         "--grace", "0"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)


#: the CI profile sleeps 20 s; ``FLOW_SOAK=1`` (``nox -s soak``) sleeps the issue's minute
NAP = 60 if os.environ.get("FLOW_SOAK") else 20


@pytest.mark.postgres
async def test_a_thousand_sleepers_cost_one_worker_nothing(postgres_url: str) -> None:
    """1,000 executions sleeping (3 instances each) held by one worker process: its RSS
    stays within 50 MiB of its idle RSS, and they all complete within seconds of their due
    time."""
    worker = _start_worker(postgres_url)
    try:
        await asyncio.sleep(3.0)  # started, imported, connected
        idle = _rss_mib(worker.pid)
        peak = idle
        async with WorkflowClient(store=postgres_url) as client:
            started = time.time()
            executions = [await client.run_workflow(Napper(i, f"{NAP}s"), ExecutionMode.ASYNC,
                                                    queue="naps") for i in range(1000)]
            due = time.time() + NAP  # the last one's timers are due by then
            while time.time() < due - 1:
                peak = max(peak, _rss_mib(worker.pid))
                await asyncio.sleep(0.5)
            results = [await asyncio.wait_for(e.get_result(), NAP + 120) for e in executions]
            finished = time.time()
            sleeping = sum(q.sleeping for q in await client.store.list_queues())
        assert [r["n"] for r in results] == list(range(1000))
        assert sleeping == 0
        print(f"\nworker RSS idle {idle:.1f} MiB, peak while 1,000 slept {peak:.1f} MiB; "
              f"enqueued in {due - NAP - started:.1f} s, all done {finished - due:.1f} s "
              "after the last was due")
        assert peak - idle < 50, (idle, peak)
        assert finished - due < 15, finished - due
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=60)
        assert worker.returncode == 0, err[-2000:]


async def test_a_retry_backoff_is_slept_suspended(tmp_path: Path) -> None:
    """An execution waiting out a 3 s retry backoff is let go too, and retried on time."""
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}") as client:
        worker = Worker(client, queues=["naps"], concurrency=2, poll_interval=5.0,
                        suspend_after=1.0)
        running = asyncio.ensure_future(worker.run())
        try:
            execution = await client.run_workflow(Backoff(), ExecutionMode.ASYNC, queue="naps")
            assert await asyncio.wait_for(execution.get_result(), 30) == 2
            assert worker.suspended >= 1
            history = await client.get_history(execution.id)
            retry_at = next(e.details["retry_at"] for e in history
                            if e.type == "step_retry_scheduled")
            second = next(e for e in history if e.type == "step_started" and e.attempt == 2)
            assert 0 <= second.timestamp.timestamp() - retry_at < 0.5
        finally:
            worker.stop()
            worker.stop()
            await running
