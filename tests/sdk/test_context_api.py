"""Section 4 of the seed: everything the Context API lists is there and behaves."""

from __future__ import annotations

import json

from agentainer_flow import (
    AgentResult,
    ChildWorkflowHandle,
    Context,
    ExecutionMode,
    ParallelContext,
    ResourceRequirements,
    step,
    workflow,
)
from agentainer_flow.testing import WorkflowTestCase, mock_agent

SEEN: dict[str, object] = {}


@workflow(name="child_for_context")
class Child:
    def __init__(self, n: int) -> None:
        self.n = n

    @step()
    async def double(self, ctx: Context) -> int:
        return self.n * 2


@workflow(name="context_api")
class ContextAPI:
    @step()
    async def inspect(self, ctx: Context) -> dict:
        SEEN.update(
            workflow_id=ctx.workflow_id, workflow_name=ctx.workflow_name,
            execution_id=ctx.execution_id, step_id=ctx.step_id, step_name=ctx.step_name,
            input=ctx.input, parallel_context=ctx.parallel_context,
            secret=ctx.secrets["token"],
        )
        agent = await ctx.deploy_agent(
            name="worker", image="worker:1", env={"A": "1"}, command=["run"],
            resources=ResourceRequirements(cpu=0.5, memory="256m"), timeout="5m")
        result = await agent.wait_for_completion()
        ctx.state["k"] = {"nested": [1, 2]}
        await ctx.log("inspected", level="warning")
        await ctx.metric("latency_ms", 12.5, {"region": "eu"})
        return {"agent": result, "json": ctx.json({"r": result, "t": (1, 2)})}

    @step(depends_on=["inspect"], parallel=True, count=2)
    async def fan(self, ctx: Context, i: int) -> int:
        assert ctx.parallel_context == ParallelContext(i, 2)
        handle = await ctx.run_workflow(Child(i), wait=False)
        assert isinstance(handle, ChildWorkflowHandle)
        return await handle.result() + ctx.state["k"]["nested"][1]


class TestContextAPI(WorkflowTestCase):
    async def test_everything_the_seed_lists(self) -> None:
        worker = mock_agent("worker").returns({"ok": 1})
        result = await self.run_workflow(ContextAPI(), input={"x": 1},
                                         secrets={"token": "tok-123"})
        assert result == [2, 4]  # 0*2+2, 1*2+2
        assert SEEN["workflow_id"] == SEEN["execution_id"] == self.execution.id
        assert SEEN["workflow_name"] == "context_api"
        assert SEEN["step_name"] == "inspect" and SEEN["step_id"] == "inspect[0]#1"
        assert SEEN["input"] == {"x": 1} and SEEN["parallel_context"] is None
        assert SEEN["secret"] == "tok-123"
        call = worker.calls[0]
        assert call.command == ["run"] and call.resources == {"cpu": 0.5, "memory": "256m"}
        first = next(e for e in self.events if e.type == "step_completed")
        assert first.details["result"]["agent"]["data"]["output"] == {"ok": 1}
        types = [e.type for e in self.events]
        assert "log_recorded" in types and "metric_recorded" in types
        assert self.workflow_state == {"k": {"nested": [1, 2]}}

    async def test_agent_result_reads_like_its_output(self) -> None:
        r = AgentResult(output={"a": 1}, exit_code=0, agent_name="x")
        assert r["a"] == 1 and dict(r) == {"a": 1} and r.output == {"a": 1}
        assert json.loads(Context.json(None, [r])) == [{"a": 1}]  # type: ignore[arg-type]


class TestRecover(WorkflowTestCase):
    async def test_recover_resumes_unfinished_executions(self) -> None:
        # record two executions without running them, as a crashed process would leave them
        ids = []
        for n in (1, 2):
            record, _ = await self.client.engine.start(Child(n))
            ids.append(record.id)
        assert {str(await self.client.get_workflow_status(i)) for i in ids} == {"pending"}
        resumed = await self.client.recover()
        assert sorted(e.id for e in resumed) == sorted(ids)
        assert sorted([await e.get_result() for e in resumed]) == [2, 4]

    async def test_async_mode_returns_before_the_end(self) -> None:
        execution = await self.client.run_workflow(Child(5), ExecutionMode.ASYNC)
        assert await execution.get_result() == 10
