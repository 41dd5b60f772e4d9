"""A parent waiting for a child workflow costs nothing under workers: the worker lets it go
(lease released, nothing kept in memory) while any worker runs the child, and the child's
end wakes it at once. Real ``flow worker`` processes, SIGKILLed where it hurts, on SQLite
and Postgres."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agentainer_flow import ExecutionMode, ExecutionStatus, Worker, WorkflowClient
from agentainer_flow.engine.runner import CHILD_CHECK_BACK
from agentainer_flow.store import EventStore, ExecutionRecord, NewExecution
from agentainer_flow.store.events import ExecutionStarted
from tests.e2e.child_workflows import WaitingParent

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")

MODULE = Path(__file__).resolve().parent / "child_workflows.py"
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT",
            "FLOW_LEASE_SECONDS", "FLOW_CHILD_CHECK_BACK")
QUEUE = "kids"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


class WorkerProcess:
    """A ``flow worker`` subprocess serving the test queue; what it prints goes to a file
    (a pipe nobody reads would fill up and stall it)."""

    def __init__(self, url: str, out: Path, *, concurrency: int = 4,
                 lease: float | None = None, **env_vars: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(env_vars)
        args = [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(MODULE),
                "--store", url, "--queue", QUEUE, "--concurrency", str(concurrency),
                "--poll-interval", "0.5", "--grace", "0"]
        if lease is not None:
            args += ["--lease", str(lease)]
        self.out = out
        self._file = out.open("a")
        self._offset = out.stat().st_size
        self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._file, stderr=subprocess.STDOUT, text=True)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._file.close()

    def started(self) -> bool:
        """Whether it said it started (its signal handlers are in place then)."""
        with self.out.open() as f:
            f.seek(self._offset)
            return " started (" in f.read()

    def stop(self) -> str:
        """SIGTERM it (once it started), check that it exited cleanly; what it printed."""
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and not self.started():
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._file.close()
        text = self.out.read_text()
        assert code == 0, text[-3000:]
        return text

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._file.close()


async def until(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


def let_go(record: ExecutionRecord) -> bool:
    """Whether the execution is suspended: nobody holds it, a wake-up time is set."""
    return (record.lease_owner is None and record.wake_at is not None
            and not record.status.is_terminal)


async def types(client: WorkflowClient, execution_id: str) -> Counter[str]:
    return Counter(e.type for e in await client.get_history(execution_id))


async def test_a_parent_is_let_go_while_its_child_runs_and_woken_when_it_ends(
        store_url: str, tmp_path: Path) -> None:
    worker = WorkerProcess(store_url, tmp_path / "worker.out")
    try:
        async with WorkflowClient(store=store_url) as client:
            parent = await client.run_workflow(WaitingParent(7, "3s"), ExecutionMode.ASYNC,
                                               queue=QUEUE)
            seen: dict[str, ExecutionRecord] = {}

            async def parent_let_go() -> bool:
                seen["parent"] = await parent.describe()
                children = await client.list_executions(parent_id=parent.id)
                if children:
                    seen["child"] = children[0]
                return let_go(seen["parent"]) and bool(children)

            await until("the parent is let go", parent_let_go, 30)
            asleep, child = seen["parent"], seen["child"]
            assert not child.status.is_terminal  # let go while the child runs
            assert child.queue == QUEUE  # for the same workers to claim
            assert asleep.wake_at is not None
            assert asleep.wake_at - time.time() > CHILD_CHECK_BACK - 5  # a check-back time
            assert await asyncio.wait_for(parent.get_result(), 30) == {"n": 7, "child": 70}
            ended, child = await parent.describe(), await client.describe(child.id)
            assert ended.finished_at is not None and child.finished_at is not None
            # woken by the child's end, not by its check-back timer
            assert ended.finished_at - child.finished_at < 2.0
            parent_events = await types(client, parent.id)
            assert parent_events["child_workflow_started"] == 1
            assert parent_events["child_workflow_completed"] == 1
            assert parent_events["step_completed"] == 1
            assert (await types(client, child.id))["timer_started"] == 1
            assert [c.id for c in await client.list_executions(parent_id=parent.id)] == [
                child.id]
    finally:
        worker.ensure_dead()
    out = worker.out.read_text()
    assert f"{parent.id} waiting_parent: suspended" in out, out[-3000:]


async def test_a_parent_and_its_child_in_a_worker_of_the_callers_process(
        tmp_path: Path) -> None:
    """``Worker`` inside the program that started the parent and waits for it: the child
    is claimed by the same engine, and the waits follow the store across the let-go."""
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}") as client:
        worker = Worker(client, queues=[QUEUE], concurrency=2, poll_interval=5.0)
        running = asyncio.ensure_future(worker.run())
        try:
            parents = [await client.run_workflow(WaitingParent(i, "2.5s"),
                                                 ExecutionMode.ASYNC, queue=QUEUE)
                       for i in range(3)]
            results = await asyncio.wait_for(
                asyncio.gather(*(p.get_result() for p in parents)), 30)
            assert results == [{"n": i, "child": i * 10} for i in range(3)]
            assert worker.suspended >= 6  # the parents, and the sleeping children
            assert worker.skipped == set()
            assert not client.engine.runners and not client.engine._objects
        finally:
            worker.stop()
            worker.stop()
            await running


@pytest.mark.postgres
async def test_two_hundred_waiting_parents_do_not_fill_a_worker_of_twenty(
        postgres_url: str, tmp_path: Path) -> None:
    """200 parents, each waiting for a child that holds its worker slot, on one worker of
    concurrency 20: parents holding their slots would leave none to their children."""
    count = 200
    worker = WorkerProcess(postgres_url, tmp_path / "worker.out", concurrency=20)
    try:
        async with WorkflowClient(store=postgres_url) as client:
            started = time.monotonic()
            parents = [await client.run_workflow(WaitingParent(i, "0.3s", busy=True),
                                                 ExecutionMode.ASYNC, queue=QUEUE)
                       for i in range(count)]

            async def all_done() -> bool:
                done = await client.list_executions(
                    workflow_name="waiting_parent", statuses=[ExecutionStatus.COMPLETED],
                    limit=None)
                return len(done) == count

            await until("every parent completed", all_done, 120)
            elapsed = time.monotonic() - started
            results = [await p.get_result() for p in parents]
            children = await client.list_executions(workflow_name="busy_child", limit=None)
        out = worker.stop()
    finally:
        worker.ensure_dead()
    assert results == [{"n": i, "child": i * 10} for i in range(count)]
    assert len(children) == count
    assert {c.status for c in children} == {ExecutionStatus.COMPLETED}
    assert out.count("waiting_parent: suspended") >= count
    print(f"\n{count} parents, each waiting for a 0.3 s child, on one worker of concurrency "
          f"20: all done in {elapsed:.1f} s")


async def test_a_worker_killed_while_parents_wait_loses_and_repeats_nothing(
        store_url: str, tmp_path: Path) -> None:
    """SIGKILL the worker once while every parent is let go and every child sleeps, and
    again as soon as the first parent completed (children ending, parents being woken);
    a fresh worker finishes them all, each child started once and run once. (A parent
    whose wake-up died with the worker waits for its check-back: 3 s here.)"""
    count = 12
    out = tmp_path / "worker.out"
    fast = {"FLOW_CHILD_CHECK_BACK": "3"}
    worker = WorkerProcess(store_url, out, lease=2, **fast)
    try:
        async with WorkflowClient(store=store_url) as client:
            # the children end over 2.4 s: the second kill falls among their wake-ups
            parents = [await client.run_workflow(WaitingParent(i, f"{3 + i * 0.2:.1f}s"),
                                                 ExecutionMode.ASYNC, queue=QUEUE)
                       for i in range(count)]

            async def all_let_go() -> bool:
                records = [await p.describe() for p in parents]
                children = await client.list_executions(workflow_name="napping_child",
                                                        limit=None)
                return all(let_go(r) for r in records) and len(children) == count

            await until("every parent is let go", all_let_go, 30)
            worker.kill()
            worker = WorkerProcess(store_url, out, lease=2, **fast)

            async def one_completed() -> bool:
                done = await client.list_executions(
                    workflow_name="waiting_parent", statuses=[ExecutionStatus.COMPLETED])
                return bool(done)

            await until("a parent completed", one_completed, 60)
            worker.kill()
            worker = WorkerProcess(store_url, out, lease=2, **fast)
            results = await asyncio.wait_for(
                asyncio.gather(*(p.get_result() for p in parents)), 60)
            assert results == [{"n": i, "child": i * 10} for i in range(count)]
            for p in parents:
                children = await client.list_executions(parent_id=p.id)
                assert len(children) == 1, children
                events = await types(client, p.id)
                assert events["child_workflow_started"] == 1, events
                assert events["child_workflow_completed"] == 1, events
                child_events = await types(client, children[0].id)
                assert child_events["timer_started"] == 1, child_events
                assert child_events["workflow_completed"] == 1, child_events
        worker.stop()
    finally:
        worker.ensure_dead()


async def test_a_crash_between_a_childs_end_and_its_parents_wake_up_costs_a_check_back(
        store_url: str, tmp_path: Path) -> None:
    """The worker dies right after the child's end is durable, before it wakes the parent
    (``FLOW_TEST_KILL_AT=child.ended``): the next worker claims the parent when its
    check-back is due, and it completes from the child's recorded end."""
    out = tmp_path / "worker.out"
    check_back = {"FLOW_CHILD_CHECK_BACK": "4"}
    worker = WorkerProcess(store_url, out, FLOW_TEST_KILL_AT="child.ended", **check_back)
    try:
        async with WorkflowClient(store=store_url) as client:
            parent = await client.run_workflow(WaitingParent(3, "1s"), ExecutionMode.ASYNC,
                                               queue=QUEUE)
            assert worker.proc.wait(timeout=30) == -signal.SIGKILL
            asleep = await parent.describe()
            [child] = await client.list_executions(parent_id=parent.id)
            assert child.status is ExecutionStatus.COMPLETED
            assert let_go(asleep) and asleep.wake_at is not None
            assert asleep.wake_at > time.time()  # never woken: its check-back is to come
            worker.ensure_dead()
            worker = WorkerProcess(store_url, out, **check_back)
            assert await asyncio.wait_for(parent.get_result(), 30) == {"n": 3, "child": 30}
            ended = await parent.describe()
            assert ended.finished_at is not None and ended.finished_at >= asleep.wake_at
            events = await types(client, parent.id)
            assert events["child_workflow_started"] == events["child_workflow_completed"] == 1
        worker.stop()
    finally:
        worker.ensure_dead()


async def test_cancelling_a_parent_let_go_while_it_waits_cancels_its_child(
        store_url: str, tmp_path: Path) -> None:
    """One parent waits for a child that sleeps (let go as well), one for a child busy in
    its worker slot: cancelling the parents reaches both children within seconds."""
    worker = WorkerProcess(store_url, tmp_path / "worker.out")
    try:
        async with WorkflowClient(store=store_url) as client:
            asleep = await client.run_workflow(WaitingParent(1, "60s"), ExecutionMode.ASYNC,
                                               queue=QUEUE)
            busy = await client.run_workflow(WaitingParent(2, "60s", busy=True),
                                             ExecutionMode.ASYNC, queue=QUEUE)

            async def waiting() -> bool:
                records = [await p.describe() for p in (asleep, busy)]
                children = [await client.list_executions(parent_id=p.id)
                            for p in (asleep, busy)]
                if not all(let_go(r) for r in records) or not all(children):
                    return False
                sleeper, worker_held = children[0][0], children[1][0]
                return let_go(sleeper) and worker_held.lease_owner is not None

            await until("both parents are let go, their children running", waiting, 30)
            started = time.monotonic()
            assert await asleep.cancel() and await busy.cancel()
            executions = [asleep, busy]
            executions += [client.get_execution(c.id) for p in (asleep, busy)
                           for c in await client.list_executions(parent_id=p.id)]

            async def all_cancelled() -> bool:
                statuses = {await e.status() for e in executions}
                return statuses == {ExecutionStatus.CANCELLED}

            await until("parents and children are cancelled", all_cancelled, 20)
            took = time.monotonic() - started
        worker.stop()
    finally:
        worker.ensure_dead()
    assert took < 10, took  # not their check-back, nor the sleeper's timer


# the store operation ------------------------------------------------------------------------
async def test_wake_makes_a_suspended_execution_due_now_and_nothing_else(
        store: EventStore) -> None:
    async def new(eid: str) -> None:
        await store.create_execution(NewExecution(id=eid, workflow_name="w"),
                                     ExecutionStarted(workflow_name="w"))

    for eid in ("asleep", "running", "ended"):
        await new(eid)
    later = time.time() + 3600
    await store.append("asleep", 2, [], wake_at=later)
    await store.append("ended", 2, [], wake_at=later)
    await store.append("ended", 2, [], status=ExecutionStatus.COMPLETED)

    assert await store.next_wake() == pytest.approx(later)
    assert [r.id for r in await store.claim("w1", lease_seconds=30, limit=10)] == ["running"]
    before = time.time()
    assert await store.wake("asleep") is True
    record = await store.get_execution("asleep")
    assert record is not None and record.wake_at is not None
    assert before - 1 <= record.wake_at <= time.time() + 1
    assert await store.wake("asleep") is False  # due already
    assert await store.wake("running") is False  # no wake-up time: it runs, not suspended
    assert await store.wake("ended") is False
    assert await store.wake("nobody") is False
    assert await store.next_wake() is None
    assert [r.id for r in await store.claim("w2", lease_seconds=30, limit=10)] == ["asleep"]
