"""Fork: a new execution that reuses the recorded results of every step not depending on
the step it is forked from, and runs that step and what follows with the current code.

The workflow is ``a -> b -> c`` plus an independent ``d``; ``a`` deploys an agent. Bodies
are counted, and ``c``'s result changes between the original and the fork, as a fix
deployed after a run would.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from agentainer_flow import (
    Context,
    ErrorHandler,
    ExecutionMode,
    ExecutionNotFoundError,
    ExecutionStatus,
    ForkOrigin,
    StepNotFoundError,
    Worker,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow.engine.engine import FORKED_FROM_STEP_TAG, FORKED_FROM_TAG, Engine
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.runtimes.base import AgentSpec
from agentainer_flow.engine.runtimes.mock import MockAgent, MockRegistry, MockRuntime
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store.events import (
    AgentDeployRequested,
    StepCompleted,
    StepEvent,
    encode_event,
)

COUNTS: Counter[str] = Counter()
SETTINGS: dict[str, Any] = {"c_label": "c-1", "fail_b": False}
SECRET = "sk-fork-0a1b2c3d4e5f"


@workflow(name="fork_pipeline")
class Pipeline:
    """a -> b -> c, and d on its own."""

    def __init__(self, base: int) -> None:
        self.base = base

    @step()
    async def a(self, ctx: Context) -> int:
        COUNTS["a"] += 1
        agent = await ctx.deploy_agent("fork-fetcher", "fetch:1")
        n: int = (await agent.wait_for_completion())["n"]
        ctx.state["a"] = n
        return self.base + n

    @step(depends_on="a")
    async def b(self, ctx: Context, a_result: int) -> int:
        COUNTS["b"] += 1
        if SETTINGS["fail_b"]:
            raise RuntimeError("b is broken in this deployment")
        ctx.state["b"] = a_result * 2
        return a_result * 2

    @step(depends_on="b")
    async def c(self, ctx: Context, b_result: int) -> str:
        COUNTS["c"] += 1
        suffix = f"+{ctx.input}" if ctx.input is not None else ""
        if "token" in ctx.secrets:
            suffix += " (token ok)" if ctx.secrets["token"] == SECRET else " (token wrong)"
        return f"{SETTINGS['c_label']}:{b_result}{suffix}"

    @step()
    async def d(self, ctx: Context) -> str:
        COUNTS["d"] += 1
        ctx.state["d"] = "independent"
        return "d-done"


class RecordingRuntime(MockRuntime):
    """The mock runtime, noting every agent it launches, stops or removes."""

    def __init__(self) -> None:
        registry = MockRegistry()
        MockAgent("fork-fetcher", registry).returns({"n": 5})
        super().__init__(registry)
        self.touched: list[tuple[str, str]] = []

    async def launch(self, spec: AgentSpec) -> None:
        self.touched.append(("launch", spec.agent_id))
        await super().launch(spec)

    async def stop(self, agent_id: str) -> None:
        self.touched.append(("stop", agent_id))
        await super().stop(agent_id)

    async def remove(self, agent_id: str) -> None:
        self.touched.append(("remove", agent_id))
        await super().remove(agent_id)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    COUNTS.clear()
    monkeypatch.setitem(SETTINGS, "c_label", "c-1")
    monkeypatch.setitem(SETTINGS, "fail_b", False)
    monkeypatch.delenv("FLOW_SECRETS_KEY", raising=False)


def encoded(history: list[Any]) -> list[tuple[int, bytes]]:
    return [(s.seq, encode_event(s.event)) for s in history]


async def test_fork_from_b_reuses_a_and_d_and_runs_b_and_c_with_the_current_code(
        store_url: str) -> None:
    runtime = RecordingRuntime()
    async with WorkflowClient(store=store_url, runtime=runtime) as client:
        original = await client.run_workflow(Pipeline(10))
        assert await original.get_result() == {"c": "c-1:30", "d": "d-done"}
        assert COUNTS == Counter(a=1, b=1, c=1, d=1)
        before = await client.store.load(original.id)
        old_agents = [e.event.agent_id for e in before
                      if isinstance(e.event, AgentDeployRequested)]

        SETTINGS["c_label"] = "c-2"  # the fix deployed after the run
        runtime.touched.clear()
        fork = await client.fork(original.id, from_step="b")

        assert await fork.get_result() == {"c": "c-2:30", "d": "d-done"}
        assert COUNTS == Counter(a=1, b=2, c=2, d=1)  # a's and d's bodies did not run again
        assert runtime.touched == []  # a's agent: not relaunched, not stopped, not removed
        assert await fork.state() == {"a": 5, "b": 30, "d": "independent"}

        history = await client.store.load(fork.id)
        completed = [e.event.step for e in history if isinstance(e.event, StepCompleted)]
        assert sorted(completed) == ["a", "b", "c", "d"]
        agents = [e.event.agent_id for e in history if isinstance(e.event, AgentDeployRequested)]
        assert agents == old_agents  # recorded in the original, and still its own
        record = await fork.describe()
        COUNTS.clear()  # replay re-runs every recorded attempt, with no side effect
        report = await replay_history(get_workflow_spec(Pipeline), Pipeline(10), record,
                                      history)
        assert report.ok, report.error
        assert report.attempts_checked == 4

        # the link, both ways
        assert await client.forked_from(fork.id) == ForkOrigin(execution_id=original.id,
                                                               step="b")
        assert await client.forked_from(original.id) is None
        assert [r.id for r in await client.forks_of(original.id)] == [fork.id]
        assert await client.forks_of(fork.id) == []
        assert record.tags[FORKED_FROM_TAG] == original.id
        assert record.tags[FORKED_FROM_STEP_TAG] == "b"
        # the original is not changed by being forked
        assert encoded(await client.store.load(original.id)) == encoded(before)

    # a process that did not create the fork reads the same result, running nothing
    COUNTS.clear()
    async with WorkflowClient(store=store_url, runtime=RecordingRuntime()) as client:
        assert await (await client.resume(fork.id)).get_result() == {"c": "c-2:30",
                                                                      "d": "d-done"}
    assert COUNTS == Counter()


async def test_fork_from_a_step_the_original_never_reached(sqlite_url: str) -> None:
    SETTINGS["fail_b"] = True
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Pipeline(1))
        assert await original.status() is ExecutionStatus.FAILED
        assert COUNTS == Counter(a=1, b=1, d=1)  # c never ran

        SETTINGS["fail_b"] = False
        fork = await client.fork(original.id, from_step="c", input="again",
                                 mode=ExecutionMode.ASYNC)
        assert await asyncio.wait_for(fork.get_result(), 30) == {"c": "c-1:12+again",
                                                                  "d": "d-done"}
    # what completed is reused; b had failed, so it runs again too
    assert COUNTS == Counter(a=1, b=2, c=1, d=1)


async def test_fork_of_an_unknown_step_or_execution_is_refused(sqlite_url: str) -> None:
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Pipeline(1))
        with pytest.raises(StepNotFoundError) as caught:
            await client.fork(original.id, from_step="bb")
        message = str(caught.value)
        assert "workflow 'fork_pipeline' has no step 'bb' (steps: a, b, c, d)" in message
        assert "did you mean 'b'?" in message
        assert isinstance(caught.value, ValueError)
        with pytest.raises(ExecutionNotFoundError):
            await client.fork("no-such-execution", from_step="b")
        assert [r.id for r in await client.list_executions()] == [original.id]


@pytest.mark.parametrize("how", ["given again", "encrypted at rest"])
async def test_a_fork_gets_the_secrets_of_the_original_without_storing_them(
        sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "encrypted at rest":
        monkeypatch.setenv("FLOW_SECRETS_KEY", Fernet.generate_key().decode())
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Pipeline(0), secrets={"token": SECRET})
        assert (await original.get_result())["c"] == "c-1:10 (token ok)"
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        again = {"token": SECRET} if how == "given again" else None
        fork = await client.fork(original.id, from_step="c", secrets=again)
        assert (await fork.get_result())["c"] == "c-1:10 (token ok)"
        assert SECRET not in repr([e.to_dict() for e in await fork.history()])
    assert not files_containing(tmp_path, SECRET.encode())


def files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [f for f in folder.glob("flow.db*") if needle in f.read_bytes()]


async def test_a_fork_left_without_its_reused_steps_gets_them_when_it_runs(
        store_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork's creator stopped between recording the fork and copying the reused
    steps' events: whoever runs it copies them first, so a and d still do not run."""
    async with WorkflowClient(store=store_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Pipeline(2))
        await original.get_result()

        async def dies(*_: Any, **__: Any) -> Any:
            raise RuntimeError("killed between the fork's two appends")

        monkeypatch.setattr(Engine, "_copy_reused", dies)
        with pytest.raises(RuntimeError, match="killed"):
            await client.fork(original.id, from_step="b")
        monkeypatch.undo()
        [left] = await client.forks_of(original.id)
        assert left.last_seq == 1  # only its ExecutionStarted was recorded
        assert left.lease_owner is None  # let go at once, for whoever runs it

    SETTINGS["c_label"] = "c-fixed"
    async with WorkflowClient(store=store_url, runtime=RecordingRuntime()) as client:
        resumed = await client.resume(left.id)
        assert await resumed.get_result() == {"c": "c-fixed:14", "d": "d-done"}
        history = await client.store.load(left.id)
    assert COUNTS == Counter(a=1, b=2, c=2, d=1)
    reused = [e.event.step for e in history if isinstance(e.event, StepEvent)
              and e.event.step in ("a", "d")]
    assert "a" in reused and "d" in reused


@workflow(name="fork_continue")
class Tolerant:
    """``flaky`` may fail without failing the execution; ``after`` then gets ``None``."""

    @step(error_handler=ErrorHandler.CONTINUE)
    async def flaky(self, ctx: Context) -> str:
        COUNTS["flaky"] += 1
        if SETTINGS["fail_b"]:
            raise RuntimeError("flaky failed")
        return "fine"

    @step(depends_on="flaky")
    async def after(self, ctx: Context, flaky_result: str | None) -> str:
        COUNTS["after"] += 1
        return f"after {flaky_result}"

    @step()
    async def other(self, ctx: Context) -> str:
        COUNTS["other"] += 1
        return "other"


async def test_a_completed_step_after_one_that_runs_again_runs_again(sqlite_url: str) -> None:
    SETTINGS["fail_b"] = True
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Tolerant())
        assert await original.get_result() == {"after": "after None", "other": "other"}
        SETTINGS["fail_b"] = False
        fork = await client.fork(original.id, from_step="other")
        # flaky failed (nothing to reuse), so after, which completed on its None, runs too
        assert await fork.get_result() == {"after": "after fine", "other": "other"}
    assert COUNTS == Counter(flaky=2, after=2, other=2)


async def test_a_fork_on_a_queue_is_run_by_a_worker(sqlite_url: str) -> None:
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as client:
        original = await client.run_workflow(Pipeline(3))
        await original.get_result()
        SETTINGS["c_label"] = "c-queued"
        fork = await client.fork(original.id, from_step="c", mode=ExecutionMode.ASYNC,
                                 queue="forks", priority=5)
        record = await fork.describe()
        assert (record.queue, record.priority, record.lease_owner) == ("forks", 5, None)
    async with WorkflowClient(store=sqlite_url, runtime=RecordingRuntime()) as service:
        assert await Worker(service, queues=["forks"], once=True, poll_interval=0.05).run() == 1
        assert await service.get_execution(fork.id).get_result() == {"c": "c-queued:16",
                                                                     "d": "d-done"}
    assert COUNTS == Counter(a=1, b=1, c=2, d=1)
