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
