"""Replay: a crash at every event index resumes to the same result and history, with
every agent launched once; code that diverges from its history is caught."""

from __future__ import annotations

import pydantic
import pytest

from agentainer_flow import (
    Context,
    NonDeterminismError,
    RetryPolicy,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.testing import mock_agent

from .helpers import by_instance, client_for, normalise, store_with_prefix

BODY_RUNS: dict[str, int] = {}


class Summary(pydantic.BaseModel):
    total: int
    names: list[str]


@workflow(name="replay_pipeline", max_retries=1)
class Pipeline:
    def __init__(self, n: int) -> None:
        self.n = n

    @step()
    async def fetch(self, ctx: Context) -> dict:
        agent = await ctx.deploy_agent("fetcher", "fetch:1", env={"N": str(self.n)})
        out = (await agent.wait_for_completion()).output
        ctx.state["source"] = out["source"]
        await ctx.log(f"fetched {out['source']}")
        return out

    @step(depends_on=["fetch"], parallel=True, count=3)
    async def work(self, ctx: Context, i: int) -> int:
        await ctx.sleep("5m")
        agent = await ctx.deploy_agent(f"worker-{i}", "work:1",
                                       env={"SRC": ctx.state["source"]})
        res = await agent.wait_for_completion()
        ctx.state[f"w{i}"] = res["value"]
        return int(res["value"]) + ctx.parallel_context.total

    @step(depends_on=["work"], reduce=True)
    async def summarise(self, ctx: Context, work_results: list[int]) -> Summary:
        ctx.state["chunks"] = len(work_results)
        return Summary(total=sum(work_results), names=[str(x) for x in work_results])


def registry() -> MockRegistry:
    reg = MockRegistry()
    mock_agent("fetcher", registry=reg).returns({"source": "s3://bucket/in"})
    mock_agent("worker-*", registry=reg).returns(
        lambda call: {"value": int(call.name.split("-")[1]) * 10})
    return reg


async def run_clean() -> tuple[object, list, object]:
    runtime = MockRuntime(registry())
    async with client_for(__import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore(),
                          runtime) as client:
        ex = await client.run_workflow(Pipeline(2))
        result = await ex.get_result()
        record = await client.describe(ex.id)
        history = await client.store.load(ex.id)
    return result, history, record


async def test_clean_run_types_and_state():
    result, _, _ = await run_clean()
    assert isinstance(result, Summary)
    assert result == Summary(total=39, names=["3", "13", "23"])


async def test_crash_at_every_event_index_resumes_identically():
    expected, history, record = await run_clean()
    clean = by_instance([s.event for s in history])
    assert len(history) > 30
    for k in range(1, len(history) + 1):
        # the runtime outlives the crashed engine: agents launched before the crash exist
        runtime = MockRuntime(registry())
        prefix_agents = {
            s.event.agent_id for s in history[:k]
            if type(s.event).__name__ in ("AgentStarted",)
        }
        for s in history:
            if type(s.event).__name__ == "AgentDeployRequested" and \
                    s.event.agent_id in prefix_agents:
                from agentainer_flow.engine.runtimes.base import AgentSpec

                await runtime.launch(AgentSpec(agent_id=s.event.agent_id, name=s.event.name,
                                               image=s.event.image, env=dict(s.event.env)))
        store = await store_with_prefix(record, history, k)
        async with client_for(store, runtime) as client:
            ex = await client.resume(record.id)
            assert await ex.get_result() == expected, f"crash after event {k}"
            resumed = await client.store.load(record.id)
        assert by_instance([s.event for s in resumed]) == clean, f"crash after event {k}"
        launched = [spec.agent_id for spec in runtime.launches]
        assert len(launched) == len(set(launched)), f"an agent launched twice (k={k})"
        assert set(launched) == {
            s.event.agent_id for s in history if type(s.event).__name__ == "AgentStarted"
        }


async def test_changed_agent_name_is_non_determinism():
    @workflow(name="nd_flow")
    class V1:
        @step()
        async def only(self, ctx: Context) -> str:
            a = await ctx.deploy_agent("summariser", "sum:1")
            await ctx.sleep("1h")
            return (await a.wait_for_completion())["text"]

    reg = MockRegistry()
    mock_agent("summariser", registry=reg).returns({"text": "hi"})
    mock_agent("summariser-v2", registry=reg).returns({"text": "hi"})
    store = __import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore()
    runtime = MockRuntime(reg)
    async with client_for(store, runtime) as client:
        ex = await client.run_workflow(V1())
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)
    # crash while sleeping: cut before the timer fired
    cut = next(i for i, s in enumerate(history) if type(s.event).__name__ == "TimerFired")

    @workflow(name="nd_flow")
    class V2:
        @step()
        async def only(self, ctx: Context) -> str:
            a = await ctx.deploy_agent("summariser-v2", "sum:1")
            await ctx.sleep("1h")
            return (await a.wait_for_completion())["text"]

    store2 = await store_with_prefix(record, history, cut)
    async with client_for(store2, runtime) as client:
        with pytest.raises(NonDeterminismError) as info:
            await client.resume(record.id)
        err = info.value
        assert "summariser" in str(err) and "summariser-v2" in str(err)
        assert err.step == "only" and err.index == 0
        # nothing was recorded for the diverged run, the execution can still be resumed
        assert len(await client.store.load(record.id)) == cut
        assert (await client.describe(record.id)).status.value in ("pending", "running")


async def test_user_code_cannot_swallow_non_determinism():
    @workflow(name="nd_swallow")
    class V1:
        @step()
        async def only(self, ctx: Context) -> str:
            ctx.state["a"] = 1
            await ctx.sleep("1m")
            return "done"

    store = __import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore()
    runtime = MockRuntime(MockRegistry())
    async with client_for(store, runtime) as client:
        ex = await client.run_workflow(V1())
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)

    @workflow(name="nd_swallow")
    class V2:
        @step()
        async def only(self, ctx: Context) -> str:
            try:
                ctx.state["b"] = 1
            except Exception:
                pass
            await ctx.sleep("1m")
            return "done"

    cut = next(i for i, s in enumerate(history) if type(s.event).__name__ == "TimerFired")
    store2 = await store_with_prefix(record, history, cut)
    async with client_for(store2, runtime) as client:
        with pytest.raises(NonDeterminismError, match="state"):
            await client.resume(record.id)


async def test_retry_backoff_is_durable_across_resume():
    attempts: list[int] = []

    @workflow(name="durable_backoff")
    class Flaky:
        @step(retry_policy=RetryPolicy(max_attempts=3, initial_delay="10m", backoff="fixed",
                                         max_delay="1h"))
        async def flaky(self, ctx: Context) -> int:
            attempts.append(ctx.attempt)
            if ctx.attempt < 3:
                raise ConnectionError("upstream down")
            return ctx.attempt

    clock = VirtualClock(start=1_000_000.0)
    store = __import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore()
    async with client_for(store, MockRuntime(MockRegistry()), clock) as client:
        ex = await client.run_workflow(Flaky())
        assert await ex.get_result() == 3
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)
    assert attempts == [1, 2, 3]
    assert clock.now() >= 1_000_000.0 + 20 * 60  # two 10-minute backoffs, virtual time
    # crash right after the first retry was scheduled: the resume waits for the recorded
    # deadline, it does not start the wait again
    cut = next(i for i, s in enumerate(history)
               if type(s.event).__name__ == "StepRetryScheduled") + 1
    retry_at = history[cut - 1].event.retry_at
    clock2 = VirtualClock(start=retry_at - 60)  # resumed one minute before the retry is due
    store2 = await store_with_prefix(record, history, cut)
    attempts.clear()
    async with client_for(store2, MockRuntime(MockRegistry()), clock2) as client:
        ex = await client.resume(record.id)
        assert await ex.get_result() == 3
    assert attempts == [2, 3]
    assert retry_at <= clock2.now() < retry_at + 10 * 60 + 1


async def test_completed_steps_do_not_run_again_on_resume():
    runs: list[str] = []

    @workflow(name="no_rerun")
    class Two:
        @step()
        async def first(self, ctx: Context) -> int:
            runs.append("first")
            return 1

        @step(depends_on=["first"])
        async def second(self, ctx: Context, first_result: int) -> int:
            runs.append("second")
            await ctx.sleep("1h")
            return first_result + 1

    store = __import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore()
    async with client_for(store, MockRuntime(MockRegistry())) as client:
        ex = await client.run_workflow(Two())
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)
    cut = next(i for i, s in enumerate(history) if type(s.event).__name__ == "TimerFired")
    runs.clear()
    async with client_for(await store_with_prefix(record, history, cut),
                          MockRuntime(MockRegistry())) as client:
        ex = await client.resume(record.id)
        assert await ex.get_result() == 2
    assert runs == ["second"]
    assert normalise([s.event for s in history])[-1]["type"] == "ExecutionCompleted"


async def test_side_effects_replay_their_recorded_values():
    seen: list[tuple[str, float]] = []

    @workflow(name="side_effects")
    class SE:
        @step()
        async def only(self, ctx: Context) -> str:
            u, r = ctx.uuid4(), ctx.random()
            seen.append((str(u), r))
            await ctx.sleep("1h")
            return f"{u}/{r}"

    store = __import__("agentainer_flow.store", fromlist=["x"]).MemoryEventStore()
    async with client_for(store, MockRuntime(MockRegistry())) as client:
        ex = await client.run_workflow(SE())
        first = await ex.get_result()
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)
    cut = next(i for i, s in enumerate(history) if type(s.event).__name__ == "TimerFired")
    async with client_for(await store_with_prefix(record, history, cut),
                          MockRuntime(MockRegistry())) as client:
        ex = await client.resume(record.id)
        assert await ex.get_result() == first
    assert seen[0] == seen[1]


def test_client_defaults_to_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOW_STORE", raising=False)
    client = WorkflowClient(runtime="mock")
    assert client.store.url.startswith("sqlite")


@pytest.mark.parametrize("writer", ["inline", "thread"])
async def test_a_step_runs_only_after_its_upstream_result_is_durable(sqlite_url, writer):
    from agentainer_flow.store import create_store

    store = create_store(f"{sqlite_url}?writer={writer}")
    seen: list[list[str]] = []

    @workflow(name="durable_before_dependants")
    class Chain:
        @step()
        async def a(self, ctx: Context) -> int:
            return 1

        @step(depends_on=["a"])
        async def b(self, ctx: Context, a_result: int) -> int:
            history = await store.load(ctx.execution_id)
            seen.append([type(s.event).__name__ + ":" + getattr(s.event, "step", "")
                         for s in history])
            return a_result + 1

    async with WorkflowClient(store=store, runtime=MockRuntime(MockRegistry())) as client:
        assert await (await client.run_workflow(Chain())).get_result() == 2
    assert "StepCompleted:a" in seen[0]
