"""Versioning executions in flight with ``ctx.patched``/``ctx.deprecate_patch``.

An execution started on version 1 of a workflow stops while a step is in flight; the code
gains ``if ctx.patched(...)`` branches, in that step and in one the execution had not
reached. The old execution resumes and completes on the old branches, everywhere; a new
execution takes the new ones. Both histories replay against the new code.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from agentainer_flow import (
    Context,
    ExecutionMode,
    NonDeterminismError,
    WorkflowClient,
    WorkflowDefinitionError,
    WorkflowFailedError,
    step,
    workflow,
)
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.commands import declared_patches
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store import StoredEvent
from agentainer_flow.store.events import PatchesDeclared, StateSet, TimerStarted
from agentainer_flow.testing import mock_agent

NAME = "patched_flow"
PATCH = "audit-step"
BODY_RUNS: list[str] = []


def define_v1() -> type:
    @workflow(name=NAME)
    class V1:
        @step()
        async def prepare(self, ctx: Context) -> int:
            ctx.state["base"] = 2
            return 2

        @step(depends_on=["prepare"])
        async def process(self, ctx: Context, prepare_result: int) -> int:
            agent = await ctx.deploy_agent("processor", "proc:1", env={"N": "2"})
            value = int((await agent.wait_for_completion())["value"])
            await ctx.sleep("1h")  # the execution stops here, in this step
            return value + prepare_result

        @step(depends_on=["process"])
        async def finish(self, ctx: Context, process_result: int) -> dict[str, Any]:
            BODY_RUNS.append("finish")
            return {"branch": "old", "total": process_result}

    return V1


def define_v2() -> type:
    @workflow(name=NAME)
    class V2:
        @step()
        async def prepare(self, ctx: Context) -> int:
            ctx.state["base"] = 2
            return 2

        @step(depends_on=["prepare"])
        async def process(self, ctx: Context, prepare_result: int) -> int:
            agent = await ctx.deploy_agent("processor", "proc:1", env={"N": "2"})
            value = int((await agent.wait_for_completion())["value"])
            if ctx.patched(PATCH):  # new: a command the old history does not have
                ctx.state["audited"] = True
            await ctx.sleep("1h")
            return value + prepare_result

        @step(depends_on=["process"])
        async def finish(self, ctx: Context, process_result: int) -> dict[str, Any]:
            BODY_RUNS.append("finish")
            if ctx.patched(PATCH):  # a step the old execution had not reached
                return {"branch": "new", "total": process_result,
                        "audited": ctx.state["audited"]}
            return {"branch": "old", "total": process_result}

    return V2


def define_v3() -> type:
    """The old branch removed: only executions started with the patch can run this."""

    @workflow(name=NAME)
    class V3:
        @step()
        async def prepare(self, ctx: Context) -> int:
            ctx.state["base"] = 2
            return 2

        @step(depends_on=["prepare"])
        async def process(self, ctx: Context, prepare_result: int) -> int:
            ctx.deprecate_patch(PATCH)
            agent = await ctx.deploy_agent("processor", "proc:1", env={"N": "2"})
            value = int((await agent.wait_for_completion())["value"])
            ctx.state["audited"] = True
            await ctx.sleep("1h")
            return value + prepare_result

        @step(depends_on=["process"])
        async def finish(self, ctx: Context, process_result: int) -> dict[str, Any]:
            ctx.deprecate_patch(PATCH)
            return {"branch": "new", "total": process_result,
                    "audited": ctx.state["audited"]}

    return V3


def registry() -> MockRegistry:
    reg = MockRegistry()
    mock_agent("processor", registry=reg).returns({"value": 40})
    return reg


async def start_v1_and_stop(url: str, runtime: MockRuntime) -> str:
    """Run a v1 execution on a real clock until it sleeps durably in ``process``, then stop
    the client (as a deploy does): the execution stays in flight."""
    v1 = define_v1()
    async with WorkflowClient(store=url, runtime=runtime) as client:
        execution = await client.run_workflow(v1(), ExecutionMode.ASYNC)
        deadline = time.monotonic() + 30
        while True:
            history = await client.store.load(execution.id)
            if any(isinstance(s.event, TimerStarted) for s in history):
                break
            assert time.monotonic() < deadline, "v1 never reached its sleep"
            await asyncio.sleep(0.02)
    return execution.id


async def load(url: str, execution_id: str) -> list[StoredEvent]:
    async with WorkflowClient(store=url, runtime=MockRuntime(MockRegistry())) as client:
        return await client.store.load(execution_id)


async def replay(cls: type, url: str, execution_id: str) -> Any:
    async with WorkflowClient(store=url, runtime=MockRuntime(MockRegistry())) as client:
        record = await client.describe(execution_id)
        history = await client.store.load(execution_id)
    return await replay_history(get_workflow_spec(cls), cls(), record, history)


async def test_old_execution_resumes_on_old_branch_new_one_takes_new(sqlite_url: str) -> None:
    runtime = MockRuntime(registry())  # outlives the stopped client, like a real runtime
    old_id = await start_v1_and_stop(sqlite_url, runtime)
    before = await load(sqlite_url, old_id)
    assert not any(isinstance(s.event, PatchesDeclared) for s in before)

    v2 = define_v2()  # the code changes under the execution in flight
    assert declared_patches(v2) == {PATCH}
    BODY_RUNS.clear()
    async with WorkflowClient(store=sqlite_url, runtime=runtime,
                              clock=VirtualClock(start=time.time())) as client:
        resumed = await client.resume(old_id)
        assert await resumed.get_result() == {"branch": "old", "total": 42}
        fresh = await client.run_workflow(v2())
        assert await fresh.get_result() == {"branch": "new", "total": 42, "audited": True}
        new_id = fresh.id
    assert BODY_RUNS == ["finish", "finish"]

    old_history = await load(sqlite_url, old_id)
    new_history = await load(sqlite_url, new_id)
    # the resumed execution kept the old branch in the step it was in, too
    assert not any(isinstance(s.event, StateSet) and s.event.key == "audited"
                   for s in old_history)
    assert not any(isinstance(s.event, PatchesDeclared) for s in old_history)
    declared = [s.event for s in new_history if isinstance(s.event, PatchesDeclared)]
    assert declared == [PatchesDeclared(ts=declared[0].ts, patches=[PATCH])]
    assert new_history[1].event == declared[0]  # declared before anything else it did

    # both histories replay against the new code; the new one not against the old code
    assert (await replay(v2, sqlite_url, old_id)).ok
    assert (await replay(v2, sqlite_url, new_id)).ok
    report = await replay(define_v1(), sqlite_url, new_id)
    assert not report.ok and report.error is not None
    assert report.error.step == "process" and "audited" in report.error.recorded


async def test_deprecate_patch_refuses_executions_started_before_it(sqlite_url: str) -> None:
    runtime = MockRuntime(registry())
    old_id = await start_v1_and_stop(sqlite_url, runtime)
    v2 = define_v2()
    async with WorkflowClient(store=sqlite_url, runtime=runtime,
                              clock=VirtualClock(start=time.time())) as client:
        new_id = (await client.run_workflow(v2())).id
    before = await load(sqlite_url, old_id)

    v3 = define_v3()
    async with WorkflowClient(store=sqlite_url, runtime=runtime,
                              clock=VirtualClock(start=time.time())) as client:
        with pytest.raises(NonDeterminismError) as info:
            await client.resume(old_id)
        err = info.value
        assert err.step == "process" and err.execution_id == old_id
        assert f"started before patch {PATCH!r}" in str(err)
        assert "deprecate_patch" in err.actual and "restore" in err.hint
        # a new execution of the code without the old branch runs: deprecate is a no-op
        again = await client.run_workflow(v3())
        assert await again.get_result() == {"branch": "new", "total": 42, "audited": True}
        assert (await client.describe(old_id)).status.value in ("pending", "running")
    assert [s.event for s in await load(sqlite_url, old_id)] == [s.event for s in before]

    assert (await replay(v3, sqlite_url, new_id)).ok  # started with the patch
    report = await replay(v3, sqlite_url, old_id)
    assert report.error is not None and "deprecate_patch" in report.error.actual

    # the code that still has the old branch finishes the old execution
    define_v2()
    async with WorkflowClient(store=sqlite_url, runtime=runtime,
                              clock=VirtualClock(start=time.time())) as client:
        resumed = await client.resume(old_id)
        assert await resumed.get_result() == {"branch": "old", "total": 42}


async def test_patch_ids_must_be_findable_in_the_code() -> None:
    suffix = "step"

    @workflow(name="patched_dynamic_id")
    class Dynamic:
        @step()
        async def only(self, ctx: Context) -> bool:
            return ctx.patched(f"audit-{suffix}")

    assert declared_patches(Dynamic) == frozenset()
    async with WorkflowClient(store="memory://", runtime=MockRuntime(MockRegistry()),
                              clock=VirtualClock()) as client:
        ex = await client.run_workflow(Dynamic())
        with pytest.raises(WorkflowFailedError) as info:
            await ex.get_result()
    # not retried: a definition error fails the execution at once
    assert info.value.error_type == WorkflowDefinitionError.__name__
    assert "ctx.patched('audit-step')" in str(info.value) and "literal" in str(info.value)


CONSTANT_PATCH = "from-a-constant"


async def _helper(ctx: Context) -> bool:
    return ctx.patched("in-a-helper")


def test_patch_ids_are_found_in_constants_attributes_helpers_and_lambdas() -> None:
    @workflow(name="patched_scan")
    class Scanned:
        ATTR = "from-an-attribute"

        @step()
        async def a(self, ctx: Context) -> list[bool]:
            check = lambda: ctx.patched("in-a-lambda")  # noqa: E731
            return [ctx.patched(CONSTANT_PATCH), ctx.patched(self.ATTR), check(),
                    await _helper(ctx), ctx.patched(patch_id="as-keyword")]

        def not_a_step(self, ctx: Context) -> None:
            ctx.deprecate_patch("deprecated-one")

    assert declared_patches(Scanned) == {
        CONSTANT_PATCH, "from-an-attribute", "in-a-lambda", "in-a-helper", "as-keyword",
        "deprecated-one"}


async def test_new_executions_see_every_declared_patch_as_true() -> None:
    @workflow(name="patched_all_true")
    class AllTrue:
        ATTR = "from-an-attribute"

        @step()
        async def a(self, ctx: Context) -> list[bool]:
            return [ctx.patched(CONSTANT_PATCH), ctx.patched(self.ATTR),
                    await _helper(ctx)]

    async with WorkflowClient(store="memory://", runtime=MockRuntime(MockRegistry()),
                              clock=VirtualClock()) as client:
        ex = await client.run_workflow(AllTrue())
        assert await ex.get_result() == [True, True, True]
        history = await client.store.load(ex.id)
    declared = [s.event for s in history if isinstance(s.event, PatchesDeclared)]
    assert len(declared) == 1
    assert set(declared[0].patches) == {CONSTANT_PATCH, "from-an-attribute", "in-a-helper"}
