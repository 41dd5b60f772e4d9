"""Fenced leases inside one process: a runner that is taken over stops before its next side
effect and leaves its agents to the new holder; a renewed lease keeps a long run its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.store import ExecutionStatus
from agentainer_flow.testing import mock_agent

BODIES: list[str] = []


@workflow(name="lease_flow")
class LeaseFlow:
    @step()
    async def slow(self, ctx: Context) -> int:
        BODIES.append(f"slow:{ctx.step_id}")
        agent = await ctx.deploy_agent("slow-agent", "slow:1")
        return int((await agent.wait_for_completion())["n"])

    @step(depends_on=["slow"])
    async def after(self, ctx: Context, slow_result: int) -> int:
        BODIES.append("after")
        return slow_result + 1


@workflow(name="lease_long_body")
class LongBody:
    @step()
    async def long(self, ctx: Context) -> str:
        BODIES.append("long")
        await asyncio.sleep(2.0)  # longer than the lease: renewals keep it
        return "done"


def runtime(delay: float) -> MockRuntime:
    registry = MockRegistry()
    mock_agent("slow-agent", registry=registry).returns({"n": 41}, delay=delay)
    return MockRuntime(registry)


async def test_a_takeover_fences_the_old_runner_which_leaves_the_agent_alone(
        tmp_path: Path) -> None:
    BODIES.clear()
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    shared = runtime(delay=1.5)  # one machine's runtime: both engines see the same agents
    async with WorkflowClient(store=url, runtime=shared, owner_id="host:1:1:-:a") as a, \
            WorkflowClient(store=url, runtime=shared, owner_id="host:1:1:-:b") as b:
        first = await a.run_workflow(LeaseFlow(), mode=ExecutionMode.ASYNC)
        while not shared.launches:  # noqa: ASYNC110 - polling a test double
            await asyncio.sleep(0.01)
        taken = await b.resume(first.id, wait=False, takeover=True)
        assert await taken.get_result() == 42
        # the old runner's waiter follows the new holder to the same outcome
        assert await asyncio.wait_for(first.get_result(), 10) == 42
        record = await b.describe(first.id)
    assert record.status is ExecutionStatus.COMPLETED and record.lease_token == 2
    assert len(shared.launches) == 1  # adopted, not launched again, and never stopped
    assert BODIES.count("after") == 1


async def test_renewals_keep_a_long_run_and_a_second_resume_follows_it(tmp_path: Path) -> None:
    BODIES.clear()
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url, runtime="mock", lease_seconds=0.6) as a, \
            WorkflowClient(store=url, runtime="mock", lease_seconds=0.6) as b:
        execution = await a.run_workflow(LongBody(), mode=ExecutionMode.ASYNC)
        await asyncio.sleep(0.2)
        follower = await b.resume(execution.id, wait=False)
        assert await follower.get_result() == "done"
        assert await execution.get_result() == "done"
        record = await a.describe(execution.id)
    assert BODIES == ["long"]  # the follower never ran the body
    assert record.lease_token == 1  # nobody took it over


@workflow(name="lease_waits")
class Waits:
    @step()
    async def wait(self, ctx: Context) -> str:
        await asyncio.sleep(30)  # nothing is appended meanwhile: only the row can tell
        return "waited"


@workflow(name="lease_quick")
class Quick:
    @step()
    async def one(self, ctx: Context) -> int:
        return 1


async def test_one_watcher_finds_cancels_asked_elsewhere_and_spares_short_runs(
        tmp_path: Path) -> None:
    """A cancel asked through the store (another process's ``flow cancel``) reaches runs
    that append nothing, from one watcher task for the whole engine; runs that end within
    the second never have their row read."""
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url, runtime=runtime(0.0)) as client, \
            WorkflowClient(store=url, runtime=runtime(0.0)) as other:
        reads: list[str] = []
        get_execution = client.store.get_execution

        async def counted(execution_id: str) -> object:
            reads.append(execution_id)
            return await get_execution(execution_id)

        client.store.get_execution = counted  # type: ignore[method-assign]
        quick = [await client.run_workflow(Quick()) for _ in range(20)]
        assert not [eid for eid in reads if eid in {q.id for q in quick}]
        waiting = [await client.run_workflow(Waits(), mode=ExecutionMode.ASYNC)
                   for _ in range(6)]
        await asyncio.sleep(0.3)
        for execution in waiting[:3]:
            assert await other.store.request_cancel(execution.id)
        watchers = [t for t in asyncio.all_tasks()
                    if getattr(t.get_coro(), "__qualname__", "") == "Engine._watch_runs"]
        assert len(watchers) == 1
        for execution in waiting[:3]:
            await asyncio.wait_for(execution.wait(), 5)  # noticed within about 2 s
            assert (await execution.status()) is ExecutionStatus.CANCELLED
        for execution in waiting[3:]:
            assert not (await execution.status()).is_terminal  # left alone
            await execution.cancel()
