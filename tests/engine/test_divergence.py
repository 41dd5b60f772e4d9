"""Replay misses nothing: a history is checked against changed code in every way the code
can change, each difference reported as a ``NonDeterminismError`` naming the step, what the
history has, what the code does and the seq of the event where they part; unchanged code
(and values that only look different after a trip through the store) replays OK. A resume
of a diverged execution fails the same way and leaves the history as it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import (
    Context,
    NonDeterminismError,
    RetryPolicy,
    WorkflowClient,
    WorkflowFailedError,
    step,
    workflow,
)
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.replayer import ReplayReport, replay_history
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store import ExecutionRecord, NewExecution, StoredEvent, create_store
from agentainer_flow.store.events import (
    AgentDeployRequested,
    ChildWorkflowStarted,
    Event,
    ExecutionStarted,
    StateSet,
    StepStarted,
    TimerFired,
    TimerStarted,
)
from agentainer_flow.testing import mock_agent

NAME = "divergence_flow"
SECRET = "sk-live-0123456789"


@workflow(name="divergence_child")
class Child:
    @step()
    async def double(self, ctx: Context) -> int:
        return int(ctx.input["n"]) * 2


@dataclass(frozen=True)
class Code:
    """One version of the workflow: the base, or the base with one thing changed."""

    audit: bool = False  # a step between work and summarize
    count: int = 3
    summarize_deps: tuple[str, ...] = ("work",)
    agent: str = "fetcher"
    image: str = "fetch:1"
    command: tuple[str, ...] = ("fetch", "--all")
    env: dict[str, str] = field(default_factory=lambda: {"MODE": "full"})
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 0.5, "memory": "1g"})
    child_n: int = 1
    state_first: bool = True  # the state write before the agent, or after (reordered)
    source: tuple[str, ...] = ("s3://in", "v1")  # a tuple: stored as one, read back as one
    sleep: str = "5m"


def build(code: Code) -> type:
    @workflow(name=NAME)
    class Flow:
        @step()
        async def fetch(self, ctx: Context) -> str:
            if code.state_first:
                ctx.state["source"] = code.source
            env = {**code.env, "TOKEN": ctx.secrets["token"]}
            agent = await ctx.deploy_agent(code.agent, code.image, env=env,
                                           command=code.command, resources=code.resources)
            if not code.state_first:
                ctx.state["source"] = code.source
            return str((await agent.wait_for_completion())["path"])

        @step(depends_on=["fetch"], parallel=True, count=code.count)
        async def work(self, ctx: Context, i: int) -> int:
            await ctx.sleep(code.sleep)
            return i * 10

        if code.audit:
            @step(depends_on=["work"])
            async def audit(self, ctx: Context) -> str:
                return "audited"

        @step(depends_on=list(code.summarize_deps))
        async def summarize(self, ctx: Context) -> int:
            doubled = await ctx.run_workflow(Child(), input={"n": code.child_n})
            return int(doubled)

    return Flow


def registry() -> MockRegistry:
    reg = MockRegistry()
    mock_agent("*", registry=reg).returns({"path": "/data"})
    return reg


async def run(url: str, code: Code) -> tuple[ExecutionRecord, list[StoredEvent]]:
    """Run ``code`` to its end on the store at ``url``; its record and history as stored."""
    async with WorkflowClient(store=url, runtime=MockRuntime(registry()),
                              clock=VirtualClock()) as client:
        ex = await client.run_workflow(build(code)(), secrets={"token": SECRET})
        await ex.get_result()
        return await client.describe(ex.id), await client.store.load(ex.id)


async def replay(code: Code, record: ExecutionRecord, history: list[StoredEvent],
                 ) -> ReplayReport:
    cls = build(code)
    return await replay_history(get_workflow_spec(cls), cls(), record, history)


def seq_of(history: list[StoredEvent], match: Callable[[Event], bool]) -> int:
    return next(s.seq for s in history if match(s.event))


@pytest.fixture
async def base(sqlite_url: str) -> tuple[ExecutionRecord, list[StoredEvent]]:
    return await run(sqlite_url, Code())


async def test_unchanged_code_replays_ok(base: tuple[ExecutionRecord, list[StoredEvent]],
                                         ) -> None:
    record, history = base
    report = await replay(Code(), record, history)
    assert report.ok, report.error
    assert report.attempts_checked == 5 and report.in_flight == []
    # values that differ only in form compare equal in their recorded form: a list for a
    # tuple, a dict in another key order
    same = Code(command=("fetch", "--all"), env={"MODE": "full"},
                resources={"memory": "1g", "cpu": 0.5})
    report = await replay(replace(same, command=["fetch", "--all"]),  # type: ignore[arg-type]
                          record, history)
    assert report.ok, report.error
    # a secret is recorded as a reference and compared as one: replay has no value for it
    assert SECRET not in str([s.event for s in history])


@dataclass(frozen=True)
class Case:
    change: Code
    step: str
    recorded: tuple[str, ...]  # in error.recorded
    actual: tuple[str, ...]  # in error.actual
    at: Callable[[Event], bool]  # the event where the code diverges
    index: int | None = 0


def _deploy(ev: Event) -> bool:
    return isinstance(ev, AgentDeployRequested) and ev.step == "fetch"


CASES = {
    "add a step in the middle": Case(
        Code(audit=True, summarize_deps=("work", "audit")), "summarize",
        ("'summarize' started", "'audit' had not run"), ("'audit'",),
        lambda ev: isinstance(ev, StepStarted) and ev.step == "summarize", None),
    "change a parallel count": Case(
        Code(count=2), "work", ("3 instances", "instance 2"), ("2 instances", "count=2"),
        lambda ev: isinstance(ev, StepStarted) and ev.step == "work" and ev.instance == 2,
        None),
    "change dependencies": Case(
        Code(summarize_deps=("work", "fetch")), "summarize", ("depends_on=['work']",),
        ("depends_on=['work', 'fetch']",),
        lambda ev: isinstance(ev, StepStarted) and ev.step == "summarize", None),
    "change an agent's command": Case(
        Code(command=("fetch", "--some")), "fetch", ("command=['fetch', '--all']",),
        ("command=['fetch', '--some']",), _deploy, 1),
    "change an agent's env": Case(
        Code(env={"MODE": "partial"}), "fetch", ("'MODE': 'full'", "[secret:token]"),
        ("'MODE': 'partial'", "[secret:token]"), _deploy, 1),
    "change an agent's image": Case(
        Code(image="fetch:2"), "fetch", ("image='fetch:1'",), ("image='fetch:2'",), _deploy, 1),
    "change an agent's name": Case(
        Code(agent="fetcher-v2"), "fetch", ("name='fetcher'",), ("name='fetcher-v2'",),
        _deploy, 1),
    "change an agent's resources": Case(
        Code(resources={"cpu": 2, "memory": "1g"}), "fetch", ("'cpu': 0.5",), ("'cpu': 2",),
        _deploy, 1),
    "change a child workflow's input": Case(
        Code(child_n=2), "summarize", ("run_workflow", "{'n': 1}"), ("{'n': 2}",),
        lambda ev: isinstance(ev, ChildWorkflowStarted)),
    "reorder commands": Case(
        Code(state_first=False), "fetch", ("state['source']",), ("deploy_agent",),
        lambda ev: isinstance(ev, StateSet) and ev.step == "fetch"),
    "change a sleep's duration": Case(
        Code(sleep="10m"), "work", ("duration=300s",), ("duration=600s",),
        lambda ev: isinstance(ev, TimerStarted) and ev.step == "work"),
    "change a state write": Case(
        Code(source=("s3://other", "v1")), "fetch", ("('s3://in', 'v1')",),
        ("('s3://other', 'v1')",),
        lambda ev: isinstance(ev, StateSet) and ev.step == "fetch"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_changed_code_is_reported(name: str,
                                        base: tuple[ExecutionRecord, list[StoredEvent]],
                                        ) -> None:
    case = CASES[name]
    record, history = base
    report = await replay(case.change, record, history)
    err = report.error
    assert err is not None, f"{name}: replay said OK"
    assert isinstance(err, NonDeterminismError) and err.code == "non_determinism"
    assert err.execution_id == record.id and err.step == case.step
    assert err.seq == seq_of(history, case.at), (name, str(err))
    assert err.index == case.index
    for text in case.recorded:
        assert text in err.recorded, (name, err.recorded)
    for text in case.actual:
        assert text in err.actual, (name, err.actual)
    message = str(err)
    assert f"step {case.step!r}" in message and f"at event seq {err.seq}" in message
    assert err.recorded in message and err.actual in message and "Hint:" in message
    assert err.hint and SECRET not in message


async def test_removed_step_is_reported(sqlite_url: str) -> None:
    record, history = await run(sqlite_url, Code(audit=True, summarize_deps=("work", "audit")))
    report = await replay(Code(), record, history)
    err = report.error
    assert err is not None and err.step == "audit"
    assert err.recorded == "step 'audit'" and "no step of that name" in err.actual
    assert err.seq == seq_of(history, lambda ev: isinstance(ev, StepStarted)
                             and ev.step == "audit")


async def test_a_history_older_than_the_recorded_arguments_still_replays(
        base: tuple[ExecutionRecord, list[StoredEvent]]) -> None:
    """Histories from before durations, child inputs and dependencies were recorded have
    nothing to compare them with: those arguments are not held against the code."""
    record, history = base
    old = []
    for s in history:
        ev = s.event
        if isinstance(ev, TimerStarted):
            ev = replace_event(ev, duration=None)
        elif isinstance(ev, ChildWorkflowStarted):
            ev = replace_event(ev, input=_unset())
        elif isinstance(ev, StepStarted):
            ev = replace_event(ev, depends_on=None)
        old.append(StoredEvent(s.execution_id, s.seq, ev))
    assert (await replay(Code(sleep="10m", child_n=3), record, old)).ok
    # what they did record is still compared
    report = await replay(Code(command=("other",)), record, old)
    assert report.error is not None and report.error.step == "fetch"


def replace_event(ev: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(ev, **changes)


def _unset() -> Any:
    import msgspec

    return msgspec.UNSET


async def copy_prefix(url: str, record: ExecutionRecord, history: list[StoredEvent],
                      k: int) -> None:
    """A store at ``url`` holding the first ``k`` events of ``history``: the execution as
    a crash after event ``k`` left it."""
    async with create_store(url) as store:
        first = history[0].event
        assert isinstance(first, ExecutionStarted)
        await store.create_execution(
            NewExecution(id=record.id, workflow_name=record.workflow_name,
                         workflow_version=record.workflow_version, tags=record.tags), first)
        await store.append(record.id, 2, [s.event for s in history[1:k]])


@pytest.mark.parametrize("change", [
    pytest.param(Code(sleep="10m"), id="command in an attempt in flight"),
    pytest.param(Code(count=2), id="shape of the DAG"),
])
async def test_resume_of_diverged_execution_fails_and_leaves_history(
        base: tuple[ExecutionRecord, list[StoredEvent]], tmp_path: Path, change: Code,
) -> None:
    record, history = base
    # cut while every work instance sleeps (the last timer has not fired)
    k = seq_of(history, lambda ev: isinstance(ev, TimerFired)) - 1
    url = f"sqlite:///{tmp_path / 'resume.db'}"
    await copy_prefix(url, record, history, k)
    build(change)  # the changed code is the one registered under the name now
    runtime = MockRuntime(registry())
    async with WorkflowClient(store=url, runtime=runtime, clock=VirtualClock()) as client:
        before = [s.event for s in await client.store.load(record.id)]
        with pytest.raises(NonDeterminismError) as info:
            await client.resume(record.id, secrets={"token": SECRET})
        assert info.value.step == "work" and info.value.execution_id == record.id
        assert [s.event for s in await client.store.load(record.id)] == before
        assert runtime.launches == []  # nothing was launched for the diverged code
    # the code it was started with finishes it
    build(Code())
    async with WorkflowClient(store=url, runtime=MockRuntime(registry()),
                              clock=VirtualClock()) as client:
        ex = await client.resume(record.id, secrets={"token": SECRET})
        assert await ex.get_result() == 2


async def test_resume_checks_in_flight_attempts_before_recording_anything(
        tmp_path: Path) -> None:
    """Two instances in flight: one diverges in a command it re-runs, the other would go
    on to launch an agent. Nothing of the new run may be recorded, nor launched."""

    def define(second: str) -> type:
        @workflow(name="divergence_two_in_flight")
        class Two:
            @step(parallel=True, count=2)
            async def work(self, ctx: Context, i: int) -> str:
                await ctx.sleep("1h" if i == 0 else second)
                agent = await ctx.deploy_agent(f"w{i}", "w:1")
                return str((await agent.wait_for_completion())["path"])

        return Two

    v1 = define("1h")
    url = f"sqlite:///{tmp_path / 'two.db'}"
    async with WorkflowClient(store=url, runtime=MockRuntime(registry()),
                              clock=VirtualClock()) as client:
        ex = await client.run_workflow(v1())
        await ex.get_result()
        record, history = await client.describe(ex.id), await client.store.load(ex.id)
    k = seq_of(history, lambda ev: isinstance(ev, TimerFired)) - 1
    url2 = f"sqlite:///{tmp_path / 'two-cut.db'}"
    await copy_prefix(url2, record, history, k)
    define("2h")  # instance 1 now sleeps for another time; instance 0 is unchanged
    runtime = MockRuntime(registry())
    async with WorkflowClient(store=url2, runtime=runtime, clock=VirtualClock()) as client:
        with pytest.raises(NonDeterminismError) as info:
            await client.resume(record.id)
        assert info.value.instance == 1 and "duration=3600s" in info.value.recorded
        assert len(await client.store.load(record.id)) == k
    assert runtime.launches == []


def define_gated(run_notify: bool, run_archive: bool) -> type:
    @workflow(name="divergence_when")
    class Gated:
        @step()
        async def check(self, ctx: Context) -> int:
            return 7

        @step(depends_on=["check"], when=lambda n: run_notify and n > 5)
        async def notify(self, ctx: Context) -> str:
            return "sent"

        @step(depends_on=["check"], when=lambda n: run_archive)
        async def archive(self, ctx: Context) -> str:
            return "kept"

    return Gated


@pytest.mark.parametrize(("run_notify", "run_archive", "diverging", "recorded", "actual"), [
    (True, True, "notify", "skipped (when= condition was false)",
     "running (its when= condition is true)"),
    (False, False, "archive", "started", "skipped (its when= condition is false)"),
])
async def test_changed_when_decision_is_reported(
        sqlite_url: str, run_notify: bool, run_archive: bool, diverging: str, recorded: str,
        actual: str) -> None:
    original = define_gated(False, True)  # notify skipped, archive ran
    async with WorkflowClient(store=sqlite_url, runtime=MockRuntime(MockRegistry()),
                              clock=VirtualClock()) as client:
        ex = await client.run_workflow(original())
        assert await ex.get_result() == {"notify": None, "archive": "kept"}
        record, history = await client.describe(ex.id), await client.store.load(ex.id)
    assert (await replay_history(get_workflow_spec(original), original(), record,
                                 history)).ok
    changed = define_gated(run_notify, run_archive)
    report = await replay_history(get_workflow_spec(changed), changed(), record, history)
    err = report.error
    assert err is not None and err.step == diverging and err.index is None
    assert recorded in err.recorded and actual in err.actual
    assert err.seq == seq_of(history, lambda ev: getattr(ev, "step", None) == diverging)


@pytest.mark.parametrize(("secrets", "fallback"), [
    pytest.param({"token": SECRET}, None, id="the same secret"),
    pytest.param({"token": "sk-live-rotated-999"}, None, id="a rotated secret"),
    pytest.param({}, "placeholder-token", id="a placeholder from the fallback"),
])
async def test_secrets_compare_by_reference_on_resume(
        base: tuple[ExecutionRecord, list[StoredEvent]], tmp_path: Path,
        secrets: dict[str, str], fallback: str | None) -> None:
    record, history = base
    # cut while fetch's agent runs: the resume re-runs its deploy_agent, env and all
    k = seq_of(history, lambda ev: isinstance(ev, AgentDeployRequested))
    url = f"sqlite:///{tmp_path / 'secrets.db'}"
    await copy_prefix(url, record, history, k)
    build(Code())
    async with WorkflowClient(store=url, runtime=MockRuntime(registry()), clock=VirtualClock(),
                              secret_fallback=(lambda _n: fallback) if fallback else None,
                              ) as client:
        ex = await client.resume(record.id, secrets=secrets)
        assert await ex.get_result() == 2
        resumed = await client.store.load(record.id)
    assert [s.event for s in resumed[:k]] == [s.event for s in history[:k]]


@workflow(name="divergence_refused")
class Refused:
    """A step whose results the store refuses: each attempt fails (retried, then the
    execution fails); replaying the same code must find it fails the same way."""

    def __init__(self, value: str = "object") -> None:
        self.value = value

    @step(retry_policy=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay="1s"))
    async def bad(self, ctx: Context) -> dict:
        return {"v": object() if self.value == "object" else "cut \ud83d"}


@pytest.mark.parametrize("value", ["object", "surrogate"])
async def test_a_refused_result_replays_as_the_failure_it_was(value: str) -> None:
    async with WorkflowClient(store="memory://", runtime="mock", clock=VirtualClock()) as client:
        ex = await client.run_workflow(Refused(value))
        with pytest.raises(WorkflowFailedError):
            await ex.get_result()
        record, history = await client.describe(ex.id), await client.store.load(ex.id)
    failed = [s.event for s in history if type(s.event).__name__ == "StepFailed"]
    assert [f.error_type for f in failed] == ["SerializationError"] * 2
    report = await replay_history(get_workflow_spec(Refused), Refused(value), record, history)
    assert report.ok, report.error
    assert report.attempts_checked == 2
