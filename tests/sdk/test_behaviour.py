"""Engine behaviour through the public API: definitions, values, time, cancellation,
secrets, idempotency, observability."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from structlog.testing import capture_logs

from agentainer_flow import (
    Context,
    ErrorHandler,
    ExecutionBlockedError,
    ExecutionMode,
    ExecutionStatus,
    IdempotencyConflictError,
    SerializationError,
    StepTimeoutError,
    WorkflowCancelledError,
    WorkflowDefinitionError,
    WorkflowFailedError,
    WorkflowTimeoutError,
    step,
    workflow,
)
from agentainer_flow.testing import WorkflowTestCase, mock_agent, test_client


def test_cycle_is_reported_with_its_path():
    with pytest.raises(WorkflowDefinitionError) as info:

        @workflow(name="cyclic")
        class Cyclic:
            @step(depends_on=["c"])
            async def a(self, ctx): ...

            @step(depends_on=["a"])
            async def b(self, ctx): ...

            @step(depends_on=["b"])
            async def c(self, ctx): ...

    assert "cycle" in str(info.value)
    assert "a -> b -> c -> a" in str(info.value) or "c -> a -> b -> c" in str(info.value)


def test_every_problem_is_listed_once():
    with pytest.raises(WorkflowDefinitionError) as info:

        @workflow(name="broken")
        class Broken:
            @step()
            async def fetch(self, ctx): ...

            @step(depends_on=["fetc"])
            async def validate(self, ctx): ...

            @step(name="fetch")
            async def again(self, ctx): ...

            @step(parallel=True)
            async def fan(self, ctx, i): ...

            @step()
            def not_async(self, ctx): ...

    text = str(info.value)
    assert "4 reasons" in text
    assert "unknown step 'fetc'" in text and "did you mean 'fetch'" in text
    assert "'fetch' is used by both" in text
    assert "parallel=True needs count=N or max_workers=N" in text
    assert "must be an async method" in text


def test_unbindable_parameter_names_the_step():
    with pytest.raises(WorkflowDefinitionError, match=r"step 'b' .*cannot bind parameter 'x'"):

        @workflow(name="unbindable")
        class W:
            @step()
            async def a(self, ctx): ...

            @step()
            async def b(self, ctx, x): ...


@dataclasses.dataclass
class Point:
    x: int
    y: int


class NotStorable:
    pass


@workflow(name="values_flow")
class ValuesFlow:
    @step()
    async def make(self, ctx: Context) -> tuple:
        return (Point(1, 2), {1: "int keys"}, b"raw")

    @step(depends_on=["make"])
    async def use(self, ctx: Context, make_result: tuple) -> Point:
        point, mapping, raw = make_result
        assert isinstance(point, Point) and mapping == {1: "int keys"} and raw == b"raw"
        return Point(point.x + 1, point.y + 1)


@workflow(name="bad_result")
class BadResult:
    @step()
    async def oops(self, ctx: Context):
        return NotStorable()


class TestValues(WorkflowTestCase):
    async def test_results_keep_their_types(self):
        assert await self.run_workflow(ValuesFlow()) == Point(2, 3)

    async def test_unstorable_result_names_step_and_type(self):
        with pytest.raises(WorkflowFailedError) as info:
            await self.run_workflow(BadResult())
        assert "step 'oops'" in str(info.value) and "NotStorable" in str(info.value)


@workflow(name="slow_step")
class SlowStep:
    @step(timeout="1m")
    async def slow(self, ctx: Context):
        await ctx.sleep("2h")


@workflow(name="slow_workflow", timeout="30m")
class SlowWorkflow:
    @step()
    async def slow(self, ctx: Context):
        await ctx.sleep("2h")

    @step(always_run=True)
    async def cleanup(self, ctx: Context):
        ctx.state["cleaned"] = True


class TestTime(WorkflowTestCase):
    async def test_step_timeout(self):
        with pytest.raises(WorkflowFailedError) as info:
            await self.run_workflow(SlowStep())
        assert info.value.error_type == StepTimeoutError.__name__

    async def test_workflow_timeout_runs_cleanup(self):
        with pytest.raises(WorkflowTimeoutError):
            await self.run_workflow(SlowWorkflow())
        assert self.workflow_state == {"cleaned": True}

    async def test_sleep_takes_virtual_time(self):
        @workflow(name="sleeper")
        class Sleeper:
            @step()
            async def nap(self, ctx: Context) -> float:
                before = ctx.now()
                await ctx.sleep("3h")
                return (ctx.now() - before).total_seconds()

        assert await self.run_workflow(Sleeper()) >= 3 * 3600


@workflow(name="cancellable")
class Cancellable:
    @step()
    async def long(self, ctx: Context):
        agent = await ctx.deploy_agent("slow-agent", "slow:1")
        return await agent.wait_for_completion()

    @step(depends_on=["long"])
    async def after(self, ctx: Context):
        ctx.state["after"] = True

    @step(always_run=True)
    async def cleanup(self, ctx: Context):
        ctx.state["cleaned"] = True


class TestCancel(WorkflowTestCase):
    async def test_cancel_stops_agent_and_runs_cleanup(self):
        mock_agent("slow-agent").returns({"ok": True}, delay=30)
        execution = await self.client.run_workflow(Cancellable(), ExecutionMode.ASYNC)
        for _ in range(200):
            if any(e.type == "agent_deploy_requested" for e in await execution.history()):
                break
            await asyncio.sleep(0.01)
        assert await execution.cancel() is True
        with pytest.raises(WorkflowCancelledError):
            await execution.get_result()
        assert await execution.status() == ExecutionStatus.CANCELLED
        state = await execution.state()
        assert state == {"cleaned": True}
        types = [e.type for e in await execution.history()]
        assert "cancel_requested" in types and types[-1] == "workflow_cancelled"
        assert await execution.cancel() is False  # already finished


@workflow(name="behaviour_needs_secret")
class NeedsSecret:
    @step()
    async def use(self, ctx: Context) -> str:
        await ctx.log(f"using token {ctx.secrets['token']}")
        agent = await ctx.deploy_agent("caller", "c:1", env={"TOKEN": ctx.secrets["token"]})
        out = await agent.wait_for_completion()
        return out["echo"]


class TestSecrets(WorkflowTestCase):
    strict_secrets = True

    async def test_secret_values_never_recorded(self):
        mock_agent("caller").returns(lambda call: {"echo": call.env["TOKEN"]})
        # the agent echoes the secret back: its output is refused, not rewritten
        with pytest.raises(WorkflowFailedError, match="secret 'token'"):
            await self.run_workflow(NeedsSecret(), secrets={"token": "sk-live-abcdef"})
        dump = repr([e.to_dict() for e in self.events])
        assert "sk-live-abcdef" not in dump
        assert "using token [secret:token]" in "\n".join(await self.execution.logs())

    async def test_missing_secret_blocks_then_resumes_with_it(self):
        with pytest.raises(ExecutionBlockedError, match="needs the secret 'token'") as info:
            await self.run_workflow(NeedsSecret())
        assert info.value.secret == "token"
        assert self.execution is not None
        assert await self.execution.status() == "blocked"
        assert "step_failed" not in self.event_types()  # nothing failed: it waits
        with mock_agent("caller") as caller:
            caller.returns({"echo": "ok"})
        await self.client.resume(self.execution.id, secrets={"token": "sk-live-abcdef"})
        assert await self.execution.get_result() == "ok"
        assert await self.execution.status() == "completed"


@workflow(name="counted")
class Counted:
    @step()
    async def one(self, ctx: Context) -> int:
        await ctx.metric("items", 3, {"kind": "a"})
        await ctx.log("hello from one")
        return 1


class TestClient(WorkflowTestCase):
    async def test_idempotency_key_returns_same_execution(self):
        a = await self.client.run_workflow(Counted(), idempotency_key="order-42")
        b = await self.client.run_workflow(Counted(), idempotency_key="order-42")
        assert a.id == b.id
        assert len(await self.client.list_executions(workflow_name="counted")) == 1

    async def test_idempotency_key_reused_for_other_input_or_workflow_is_refused(self):
        first = await self.client.run_workflow(Counted(), idempotency_key="order-7",
                                               input={"n": 1})
        with pytest.raises(IdempotencyConflictError, match="other constructor arguments or "
                           "input") as info:
            await self.client.run_workflow(Counted(), idempotency_key="order-7",
                                           input={"n": 2})
        assert info.value.execution_id == first.id and info.value.key == "order-7"
        with pytest.raises(IdempotencyConflictError, match="workflow 'counted', not"):
            await self.client.run_workflow(NeedsSecret(), idempotency_key="order-7")
        again = await self.client.run_workflow(Counted(), idempotency_key="order-7",
                                               input={"n": 1})
        assert again.id == first.id and await again.get_result() == 1

    async def test_stream_events_and_logs(self):
        execution = await self.client.run_workflow(
            Counted(), ExecutionMode.ASYNC, tags={"team": "data-eng"})
        seen = [e async for e in execution.stream_events()]
        assert seen[0].type == "workflow_started" and seen[-1].type == "workflow_completed"
        assert all(e.timestamp is not None and e.message for e in seen)
        assert await execution.get_result() == 1
        logs = await self.client.get_logs(execution.id)
        assert any("hello from one" in line and "[one]" in line for line in logs)
        streamed = [line async for line in self.client.stream_logs(execution.id)]
        assert streamed == logs
        assert (await execution.describe()).tags == {"team": "data-eng"}

    async def test_metrics(self):
        await self.run_workflow(Counted())
        await self.run_workflow(Counted())
        with pytest.raises(WorkflowFailedError):
            await self.run_workflow(BadResult())
        metrics = await self.client.get_workflow_metrics(workflow_name="counted",
                                                         time_range="24h")
        assert metrics.total_executions == 2 and metrics.success_rate == 100.0
        assert metrics.avg_duration is not None and metrics.avg_duration >= 0

    async def test_stream_workflow_events_filters_types(self):
        await self.run_workflow(Counted())
        events = [
            e async for e in self.client.stream_workflow_events(
                workflow_name="counted", event_types=["step_completed", "workflow_completed"],
                follow=False)
        ]
        assert [e.type for e in events] == ["step_completed", "workflow_completed"]

    async def test_ctx_log_is_structured_and_not_repeated(self):
        with capture_logs() as logs:
            await self.run_workflow(Counted())
        mine = [entry for entry in logs if entry["event"] == "hello from one"]
        assert len(mine) == 1 and mine[0]["step"] == "one"


@workflow(name="continue_flow")
class ContinueFlow:
    @step(error_handler=ErrorHandler.CONTINUE)
    async def may_fail(self, ctx: Context) -> int:
        raise RuntimeError("nope")

    @step(depends_on=["may_fail"])
    async def after(self, ctx: Context, may_fail_result) -> str:
        return f"got {may_fail_result!r}"


class TestContinue(WorkflowTestCase):
    async def test_dependants_get_none(self):
        assert await self.run_workflow(ContinueFlow()) == "got None"


async def test_test_client_usable_outside_test_case():
    async with test_client() as client:
        ex = await client.run_workflow(Counted())
        assert await ex.get_result() == 1


_COUNTER = [0]


@workflow(name="not_deterministic")
class NotDeterministic:
    @step()
    async def pick(self, ctx: Context) -> str:
        _COUNTER[0] += 1  # state outside ctx: differs when the step runs again
        agent = await ctx.deploy_agent(f"agent-{_COUNTER[0]}", "a:1")
        return (await agent.wait_for_completion())["v"]


class TestDeterminismCheck(WorkflowTestCase):
    async def test_catches_code_that_differs_on_replay(self):
        mock_agent("agent-*").returns({"v": "x"})
        with pytest.raises(AssertionError, match=r"crash at event \d+ .*agent-"):
            await self.assert_deterministic(NotDeterministic)

    async def test_passes_for_deterministic_code(self):
        report = await self.assert_deterministic(Counted)
        assert report.events >= 5 and report.crash_points


@workflow(name="takes_config")
class TakesConfig:
    def __init__(self, config) -> None:
        self.config = config

    @step()
    async def only(self, ctx: Context) -> int:
        return 1


class TestBadInput(WorkflowTestCase):
    async def test_unserialisable_constructor_argument(self):
        with pytest.raises(SerializationError, match=r"constructor arguments of workflow "
                                                     r"'takes_config'.*NotStorable"):
            await self.client.run_workflow(TakesConfig(NotStorable()))
        assert await self.client.list_executions() == []  # nothing half-recorded

    async def test_unserialisable_input(self):
        with pytest.raises(SerializationError, match="input of workflow 'takes_config'"):
            await self.client.run_workflow(TakesConfig({}), input={"x": NotStorable()})

    async def test_class_instead_of_instance(self):
        with pytest.raises(TypeError, match=r"TakesConfig\(\.\.\.\)"):
            await self.client.run_workflow(TakesConfig)

    async def test_not_a_workflow(self):
        with pytest.raises(WorkflowDefinitionError, match="@workflow"):
            await self.client.run_workflow(NotStorable())

    async def test_bad_env_value(self):
        @workflow(name="bad_env")
        class BadEnv:
            @step()
            async def only(self, ctx: Context):
                await ctx.deploy_agent("a", "a:1", env={"N": [1, 2]})

        with pytest.raises(WorkflowFailedError, match=r"env\['N'\] must be a string"):
            await self.run_workflow(BadEnv())
