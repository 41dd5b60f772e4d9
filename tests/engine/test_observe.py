"""The engine's observer seam: it hears of live work once, never of what a replayed history
holds, whatever point a run was cut at, and spans built on it nest and hold no secret.

The invariant proven at every crash point: what the observer hears from the run that
resumes a history equals what that run appends (each step attempt started, each outcome,
each agent launched), so a counter summed over every process that ran the execution
counts each piece of work once; and ``flow replay`` hears nothing at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from agentainer_flow import (
    ConfigurationError,
    Context,
    ExecutionMode,
    RetryPolicy,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow._metrics import FlowMetrics
from agentainer_flow._otel import TracingObserver, tracing_enabled, tracing_from_env
from agentainer_flow.engine import observe
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.observe import NOOP, AttemptRef, Observer, combine
from agentainer_flow.engine.runtimes.base import AgentSpec
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.store import MemoryEventStore, StoredEvent, create_store
from agentainer_flow.store.base import ExecutionRecord, NewExecution
from agentainer_flow.testing import mock_agent

from .helpers import by_instance, client_for, store_with_prefix

SECRET = "s3cr3t-Value-9f2c"
RESULT_MARK = "RESULT-MARK-41"
INPUT_MARK = "INPUT-MARK-77"


@workflow(name="observed_pipeline")
class Pipeline:
    @step()
    async def fetch(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent("fetcher", "fetch:1",
                                       env={"KEY": ctx.secrets["api_key"]})
        out = (await agent.wait_for_completion()).output
        ctx.state["source"] = out["source"]
        await ctx.log(f"fetched with {ctx.secrets['api_key']}")
        return out

    @step(depends_on=["fetch"], parallel=True, count=3)
    async def work(self, ctx: Context, i: int) -> int:
        await ctx.sleep("5m")
        agent = await ctx.deploy_agent(f"worker-{i}", "work:1",
                                       env={"SRC": ctx.state["source"]})
        return int((await agent.wait_for_completion())["value"])

    @step(depends_on=["work"], reduce=True)
    async def total(self, ctx: Context, work_results: list[int]) -> str:
        return f"{RESULT_MARK}:{sum(work_results)}"


FLAKY_RUNS: list[int] = []


@workflow(name="observed_flaky")
class Flaky:
    @step(retry_policy=RetryPolicy(max_attempts=2, initial_delay="1s", backoff="fixed"))
    async def flaky(self, ctx: Context) -> int:
        FLAKY_RUNS.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("upstream down")
        return ctx.attempt


@workflow(name="observed_sleeper")
class Sleeper:
    @step()
    async def nap(self, ctx: Context) -> str:
        await ctx.sleep("1h")
        return "rested"


def registry() -> MockRegistry:
    reg = MockRegistry()
    mock_agent("fetcher", registry=reg).returns({"source": "s3://bucket/in"})
    mock_agent("worker-*", registry=reg).returns(
        lambda call: {"value": int(call.name.split("-")[1]) * 10})
    return reg


class Recorder(Observer):
    """Remembers every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def of(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [kw for n, kw in self.calls if n == name
                and all(kw.get(k) == v for k, v in match.items())]

    def execution_started(self, execution_id: str, workflow: str, *, queue: str) -> None:
        self.calls.append(("execution_started", {"id": execution_id, "workflow": workflow,
                                                 "queue": queue}))

    def run_started(self, execution_id: str, workflow: str, *, resumed: bool) -> None:
        self.calls.append(("run_started", {"id": execution_id, "resumed": resumed}))

    def run_finished(self, execution_id: str, workflow: str, *, outcome: str,
                     duration: float | None) -> None:
        self.calls.append(("run_finished", {"id": execution_id, "outcome": outcome,
                                            "duration": duration}))

    def step_attempt_started(self, attempt: AttemptRef, *, resumed: bool) -> None:
        self.calls.append(("step_attempt_started", {"attempt": attempt, "resumed": resumed}))

    def step_attempt_finished(self, attempt: AttemptRef, *, outcome: str, seconds: float,
                              error_type: str | None = None) -> None:
        self.calls.append(("step_attempt_finished", {"attempt": attempt, "outcome": outcome,
                                                     "seconds": seconds,
                                                     "error_type": error_type}))

    def agent_launched(self, attempt: AttemptRef, *, agent: str, image: str,
                       agent_id: str) -> None:
        self.calls.append(("agent_launched", {"attempt": attempt, "agent_id": agent_id}))

    def agent_finished(self, attempt: AttemptRef, *, agent: str, image: str, agent_id: str,
                       outcome: str, exit_code: int | None, started_at: float | None,
                       finished_at: float | None) -> None:
        self.calls.append(("agent_finished", {"attempt": attempt, "agent_id": agent_id,
                                              "outcome": outcome}))

    def lease_taken_over(self, execution_id: str, workflow: str, *,
                         previous_holder: str) -> None:
        self.calls.append(("lease_taken_over", {"id": execution_id,
                                                "previous_holder": previous_holder}))

    def store_call(self, op: str, seconds: float, *, ok: bool) -> None:
        self.calls.append(("store_call", {"op": op, "ok": ok}))


def tracer() -> tuple[TracingObserver, InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return TracingObserver(provider), exporter, provider


def kinds(events: list[StoredEvent] | list[Any]) -> Counter[str]:
    return Counter(type(getattr(e, "event", e)).__name__ for e in events)


async def run_clean(*observers: Observer) -> tuple[Any, list[StoredEvent], ExecutionRecord]:
    runtime = MockRuntime(registry())
    async with WorkflowClient(store=MemoryEventStore(), runtime=runtime, clock=VirtualClock(),
                              observer=combine(*observers)) as client:
        ex = await client.run_workflow(Pipeline(), input=INPUT_MARK,
                                       secrets={"api_key": SECRET})
        result = await ex.get_result()
        record = await client.describe(ex.id)
        history = await client.store.load(ex.id)
    return result, history, record


def assert_heard_what_was_appended(rec: Recorder, appended: list[Any], in_flight: int) -> None:
    """What a run told its observer equals what it appended (``appended``: events)."""
    counts = kinds(appended)
    fresh = rec.of("step_attempt_started", resumed=False)
    resumed = rec.of("step_attempt_started", resumed=True)
    assert len(fresh) == counts["StepStarted"]
    assert len(resumed) == in_flight
    finished = Counter(c["outcome"] for c in rec.of("step_attempt_finished"))
    assert finished == Counter({k: v for k, v in {
        "completed": counts["StepCompleted"], "failed": counts["StepFailed"]}.items() if v})
    launched = [e.agent_id for e in appended
                if type(e).__name__ == "AgentStarted" and not e.adopted]
    assert [c["agent_id"] for c in rec.of("agent_launched")] == launched
    assert len(rec.of("agent_finished")) == counts["AgentCompleted"] + counts["AgentFailed"]


# live work, once --------------------------------------------------------------------------
async def test_a_clean_run_is_heard_once_per_piece_of_work() -> None:
    rec = Recorder()
    result, history, record = await run_clean(rec)
    assert result == f"{RESULT_MARK}:30"
    events = kinds(history)
    assert rec.of("execution_started") == [{"id": record.id, "workflow": "observed_pipeline",
                                            "queue": "default"}]
    assert rec.of("run_started") == [{"id": record.id, "resumed": False}]
    [finished] = rec.of("run_finished")
    assert finished["outcome"] == "completed" and finished["duration"] >= 0
    assert_heard_what_was_appended(rec, [s.event for s in history], in_flight=0)
    assert events["StepStarted"] == 5 and events["AgentStarted"] == 4
    # each attempt: started before it finished, in its own order
    for started in rec.of("step_attempt_started"):
        attempt = started["attempt"]
        names = [n for n, kw in rec.calls if kw.get("attempt") == attempt]
        assert names[0] == "step_attempt_started" and names[-1] == "step_attempt_finished"
    ops = Counter(c["op"] for c in rec.of("store_call"))
    assert ops["append"] >= 3 and all(c["ok"] for c in rec.of("store_call"))


async def test_a_resume_at_every_crash_point_hears_only_the_work_it_does() -> None:
    _, history, record = await run_clean()
    clean = by_instance([s.event for s in history])
    n = len(history)
    assert n > 30
    # (k, adopt): the engine died after event k; with ``adopt``, k is an agent's intent and
    # the agent was launched before the death (its start not recorded): it is adopted
    points = [(k, False) for k in range(1, n + 1)] + [
        (k, True) for k in range(1, n + 1)
        if type(history[k - 1].event).__name__ == "AgentDeployRequested"]
    assert sum(adopt for _, adopt in points) == 4
    for k, adopt in points:
        where = f"crash after event {k}" + (" (agent launched)" if adopt else "")
        # the runtime outlives the crashed engine: agents launched before the crash exist
        runtime = MockRuntime(registry())
        started = {s.event.agent_id for s in history[:k]
                   if type(s.event).__name__ == "AgentStarted"}
        if adopt:
            started.add(history[k - 1].event.agent_id)
        for s in history:
            if type(s.event).__name__ == "AgentDeployRequested" and s.event.agent_id in started:
                await runtime.launch(AgentSpec(agent_id=s.event.agent_id, name=s.event.name,
                                               image=s.event.image, env=dict(s.event.env)))
        rec = Recorder()
        tracing, exporter, _ = tracer()
        store = await store_with_prefix(record, history, k)
        async with WorkflowClient(store=store, runtime=runtime, clock=VirtualClock(),
                                  observer=combine(rec, tracing)) as client:
            ex = await client.resume(record.id, secrets={"api_key": SECRET})
            assert await ex.get_result() == f"{RESULT_MARK}:30", where
            resumed = await client.store.load(record.id)
        if not adopt:
            assert by_instance([s.event for s in resumed]) == clean, where
        assert len({s.agent_id for s in runtime.launches}) == len(runtime.launches), where
        spans = exporter.get_finished_spans()
        if k == n:  # already ended: nothing runs, nothing is heard
            assert [c for c in rec.calls if c[0] != "store_call"] == [] and not spans
            continue
        outcomes = {(e.step, e.instance, e.attempt) for e in (s.event for s in history[:k])
                    if type(e).__name__ in ("StepCompleted", "StepFailed")}
        in_flight = sum(1 for s in history[:k] if type(s.event).__name__ == "StepStarted"
                        and (s.event.step, s.event.instance, s.event.attempt) not in outcomes)
        assert_heard_what_was_appended(rec, [s.event for s in resumed[k:]], in_flight)
        assert not rec.of("execution_started"), where  # a resume records no new execution
        assert rec.of("run_started") == [{"id": record.id, "resumed": k > 1}], where
        assert [c["outcome"] for c in rec.of("run_finished")] == ["completed"], where
        by_kind = Counter(s.name.split()[0] for s in spans)
        assert by_kind == Counter({k_: v for k_, v in {
            "execution": 1, "step": len(rec.of("step_attempt_started")),
            "agent": len(rec.of("agent_finished"))}.items() if v}), where


async def test_replaying_a_history_is_heard_by_no_observer(tmp_path: Path) -> None:
    """``flow replay`` (``replay_history``, the CLI's engine) runs every recorded attempt
    again and tells nobody: not a default observer, not a tracer."""
    from agentainer_flow.engine.replayer import replay_history
    from agentainer_flow.engine.spec import get_workflow_spec

    _, history, record = await run_clean()
    spec = get_workflow_spec("observed_pipeline")
    rec = Recorder()
    tracing, exporter, _ = tracer()
    with observe.default_observer_as(combine(rec, tracing)):
        for k in (len(history), len(history) // 2, 4):  # ended, and cut mid-way
            report = await replay_history(spec, Pipeline(), record, history[:k],
                                          context_factory=Context)
            assert report.ok and report.attempts_checked > 0
    assert rec.calls == [] and exporter.get_finished_spans() == ()


def test_flow_replay_emits_no_metric_and_no_span(tmp_path: Path) -> None:
    """The ``flow replay`` command, in this process, with every engine it makes observed:
    a finished and an unfinished history replay without one call to the observer."""
    from agentainer_flow._cli import main

    url = f"sqlite:///{tmp_path / 'flow.db'}"
    _, history, record = asyncio.run(run_clean())
    cut = next(i for i, s in enumerate(history) if type(s.event).__name__ == "AgentStarted")

    async def store_both() -> None:
        async with create_store(url) as store:
            for eid, events in ((record.id, history), ("cut-" + record.id, history[:cut + 1])):
                await store.create_execution(NewExecution(
                    id=eid, workflow_name=record.workflow_name,
                    workflow_version=record.workflow_version), events[0].event)
                await store.append(eid, 2, [s.event for s in events[1:]])

    asyncio.run(store_both())
    rec = Recorder()
    tracing, exporter, _ = tracer()
    metrics = FlowMetrics()
    with observe.default_observer_as(combine(rec, tracing, metrics)):
        for eid in (record.id, "cut-" + record.id):
            with pytest.raises(SystemExit) as done:
                main(["replay", eid, "--store", url, "--json"])
            assert done.value.code == 0
    assert rec.calls == [] and exporter.get_finished_spans() == ()
    rendered = metrics.registry.render().splitlines()
    assert rendered and all(line.startswith("# ") for line in rendered)  # not one sample


# outcomes ---------------------------------------------------------------------------------
async def test_a_retried_attempt_and_a_failed_one_are_told_apart() -> None:
    FLAKY_RUNS.clear()
    rec = Recorder()
    async with client_for(MemoryEventStore(), MockRuntime(MockRegistry()),
                          VirtualClock()) as client:
        client.engine.observer = rec
        ex = await client.run_workflow(Flaky())
        assert await ex.get_result() == 2
    assert FLAKY_RUNS == [1, 2]
    assert [(c["attempt"].attempt, c["outcome"], c["error_type"])
            for c in rec.of("step_attempt_finished")] == [
        (1, "failed", "ConnectionError"), (2, "completed", None)]
    assert [c["resumed"] for c in rec.of("step_attempt_started")] == [False, False]


async def test_a_suspended_run_and_its_resume_count_the_attempt_once() -> None:
    rec = Recorder()
    metrics = FlowMetrics()
    store = MemoryEventStore()
    async with client_for(store, MockRuntime(MockRegistry()), VirtualClock()) as client:
        client.engine.observer = combine(rec, metrics)
        client.engine.suspend_after = 60.0  # a worker's engine lets long sleepers go
        ex = await client.run_workflow(Sleeper())
        assert [c["outcome"] for c in rec.of("run_finished")] == ["suspended"]
        assert [c["outcome"] for c in rec.of("step_attempt_finished")] == ["interrupted"]
        client.engine.suspend_after = None
        await client.resume(ex.id)
        assert await ex.get_result() == "rested"
    assert [c["resumed"] for c in rec.of("run_started")] == [False, True]
    assert [c["resumed"] for c in rec.of("step_attempt_started")] == [False, True]
    assert [c["outcome"] for c in rec.of("step_attempt_finished")] == ["interrupted",
                                                                       "completed"]
    assert metrics.attempts_started.value("observed_sleeper", "nap") == 1
    assert metrics.attempts_finished.value("observed_sleeper", "nap", "completed") == 1
    assert metrics.attempts_interrupted.value("observed_sleeper", "nap", "interrupted") == 1
    assert metrics.runs_stopped.value("observed_sleeper", "suspended") == 1
    assert metrics.executions_finished.value("observed_sleeper", "completed") == 1
    assert metrics.runs_active.value("observed_sleeper") == 0


@workflow(name="observed_lease")
class LeaseFlow:
    @step()
    async def slow(self, ctx: Context) -> int:
        agent = await ctx.deploy_agent("slow-agent", "slow:1")
        return int((await agent.wait_for_completion())["n"])

    @step(depends_on=["slow"])
    async def after(self, ctx: Context, slow_result: int) -> int:
        agent = await ctx.deploy_agent("quick-agent", "quick:1")
        return slow_result + int((await agent.wait_for_completion())["n"])


async def test_a_takeover_is_heard_by_the_process_that_takes_over(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    reg = MockRegistry()
    mock_agent("slow-agent", registry=reg).returns({"n": 41}, delay=1.0)
    mock_agent("quick-agent", registry=reg).returns({"n": 1})
    shared = MockRuntime(reg)  # one machine's runtime: both engines see the same agents
    a_heard, b_heard = Recorder(), Recorder()
    async with WorkflowClient(store=url, runtime=shared, owner_id="host:1:1:-:a",
                              observer=a_heard) as a, \
            WorkflowClient(store=url, runtime=shared, owner_id="host:1:1:-:b",
                           observer=b_heard) as b:
        first = await a.run_workflow(LeaseFlow(), mode=ExecutionMode.ASYNC)
        while not shared.launches:  # noqa: ASYNC110 - polling a test double
            await asyncio.sleep(0.01)
        taken = await b.resume(first.id, wait=False, takeover=True)
        assert await taken.get_result() == 42
        with contextlib.suppress(Exception):
            await asyncio.wait_for(first.get_result(), 10)
    assert b_heard.of("lease_taken_over") == [{"id": first.id,
                                               "previous_holder": "host:1:1:-:a"}]
    assert not a_heard.of("lease_taken_over")
    # the slow agent was launched once, by a; b adopted it, and launched the next one
    slow, quick = (s.agent_id for s in shared.launches)
    assert [c["agent_id"] for c in a_heard.of("agent_launched")] == [slow]
    assert [c["agent_id"] for c in b_heard.of("agent_launched")] == [quick]
    assert [c["outcome"] for c in a_heard.of("run_finished")] == ["lease_lost"]
    assert [c["outcome"] for c in b_heard.of("run_finished")] == ["completed"]
    # b resumed the attempt a had started: a counted its start, b did not
    assert [(c["attempt"].step, c["resumed"]) for c in a_heard.of("step_attempt_started")
            ] == [("slow", False)]
    assert [(c["attempt"].step, c["resumed"]) for c in b_heard.of("step_attempt_started")
            ] == [("slow", True), ("after", False)]


async def test_an_observer_that_raises_never_breaks_an_execution() -> None:
    class Broken(Observer):
        def __getattribute__(self, name: str) -> Any:
            if name in ("time_store", "__class__"):
                return object.__getattribute__(self, name)

            def boom(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError(f"{name} is broken")

            return boom

    rec = Recorder()
    with structlog.testing.capture_logs() as logs:
        _, history, _ = await run_clean(Broken(), rec)
    assert kinds(history)["ExecutionCompleted"] == 1
    assert len(rec.of("run_finished")) == 1  # the one after the broken one still hears
    failed = [e for e in logs if e["event"] == "observer_failed"]
    assert failed and {e["observer"] for e in failed} == {"Broken"}


def test_combine_flattens_and_drops_nothing_observers() -> None:
    a, b = Recorder(), Recorder()
    assert combine() is NOOP and combine(None, NOOP) is NOOP
    group = combine(combine(a), None, combine(b, a))
    group.run_started("x", "wf", resumed=False)
    assert len(a.calls) == len(b.calls) == 1
    with observe.default_observer_as(a):
        assert observe.default_observer() is not NOOP
    assert observe.default_observer() is NOOP


# spans ------------------------------------------------------------------------------------
def _all_text(span: ReadableSpan) -> str:
    parts = [span.name, *(f"{k}={v}" for k, v in (span.attributes or {}).items())]
    for event in span.events:
        parts += [event.name, *(f"{k}={v}" for k, v in (event.attributes or {}).items())]
    if span.status.description:
        parts.append(span.status.description)
    return "\n".join(parts)


async def test_spans_nest_execution_step_agent_and_hold_no_secret_input_or_result() -> None:
    tracing, exporter, _ = tracer()
    _, _, record = await run_clean(tracing)
    spans = exporter.get_finished_spans()
    [run] = [s for s in spans if s.name == "execution observed_pipeline"]
    steps = [s for s in spans if s.name.startswith("step ")]
    agents = [s for s in spans if s.name.startswith("agent ")]
    assert sorted(s.name for s in steps) == ["step fetch", "step total", *["step work"] * 3]
    assert sorted(s.name for s in agents) == ["agent fetcher", "agent worker-0",
                                              "agent worker-1", "agent worker-2"]
    assert run.parent is None and run.attributes is not None
    assert run.attributes["flow.execution.id"] == record.id
    assert run.attributes["flow.outcome"] == "completed"
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in steps)
    by_id = {s.context.span_id: s for s in steps}
    for agent in agents:
        assert agent.parent is not None
        parent = by_id[agent.parent.span_id]
        assert parent.attributes is not None and agent.attributes is not None
        assert parent.name == f"step {agent.attributes['flow.step']}"
        assert agent.attributes["flow.agent.image"] in ("fetch:1", "work:1")
        assert agent.start_time is not None and agent.end_time is not None
        assert agent.start_time <= agent.end_time
    launched = [e for s in steps for e in s.events if e.name == "agent launched"]
    assert len(launched) == 4
    text = "\n".join(_all_text(s) for s in spans)
    for leak in (SECRET, RESULT_MARK, INPUT_MARK, "s3://bucket/in"):
        assert leak not in text


async def test_a_failed_step_marks_its_spans_as_errors_by_type_only() -> None:
    @workflow(name="observed_failing")
    class Failing:
        @step()
        async def breaks(self, ctx: Context) -> None:
            raise ValueError(f"bad value {SECRET}")

    tracing, exporter, _ = tracer()
    async with client_for(MemoryEventStore(), MockRuntime(MockRegistry()),
                          VirtualClock()) as client:
        client.engine.observer = tracing
        ex = await client.run_workflow(Failing(), secrets={"k": SECRET})
        with pytest.raises(Exception, match="bad value"):
            await ex.get_result()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    step_span, run = spans["step breaks"], spans["execution observed_failing"]
    assert step_span.status.status_code is StatusCode.ERROR
    assert run.status.status_code is StatusCode.ERROR
    assert step_span.attributes is not None
    assert step_span.attributes["flow.error.type"] == "ValueError"
    assert all(SECRET not in _all_text(s) and "bad value" not in _all_text(s)
               for s in spans.values())


async def test_what_a_step_body_traces_is_inside_its_span_and_a_run_inside_the_callers(
) -> None:
    tracing, exporter, provider = tracer()
    user_tracer = provider.get_tracer("user code")

    @workflow(name="observed_child")
    class Child:
        @step()
        async def only(self, ctx: Context) -> int:
            return 1

    @workflow(name="observed_parent")
    class Parent:
        @step()
        async def call(self, ctx: Context) -> int:
            with user_tracer.start_as_current_span("user work"):
                await asyncio.sleep(0)
            return int(await ctx.run_workflow(Child()))

    async with client_for(MemoryEventStore(), MockRuntime(MockRegistry()),
                          VirtualClock()) as client:
        client.engine.observer = tracing
        with user_tracer.start_as_current_span("request"):
            ex = await client.run_workflow(Parent())
        assert await ex.get_result() == 1
    spans = {s.name: s for s in exporter.get_finished_spans()}

    def parent_of(name: str) -> str:
        parent = spans[name].parent
        assert parent is not None
        return next(n for n, s in spans.items() if s.context.span_id == parent.span_id)

    assert parent_of("execution observed_parent") == "request"
    assert parent_of("step call") == "execution observed_parent"
    assert parent_of("user work") == "step call"
    assert parent_of("execution observed_child") == "step call"
    assert parent_of("step only") == "execution observed_child"


# opting in --------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "wanted"), [
    ({}, False),
    ({"FLOW_OTEL": "1"}, True),
    ({"FLOW_OTEL": "true", "OTEL_SDK_DISABLED": "true"}, True),
    ({"FLOW_OTEL": "0", "OTEL_TRACES_EXPORTER": "otlp"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, False),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_tracing_is_opt_in(env: dict[str, str], wanted: bool) -> None:
    assert tracing_enabled(env) is wanted


def test_a_bad_flow_otel_value_says_what_to_write() -> None:
    with pytest.raises(ConfigurationError, match=r"FLOW_OTEL='maybe'.*1.*0"):
        tracing_enabled({"FLOW_OTEL": "maybe"})


@pytest.fixture
def no_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import raises ImportError
    yield


def test_asking_for_traces_without_the_extra_is_an_error_naming_it(
        no_opentelemetry: None) -> None:
    with pytest.raises(ConfigurationError, match=r"agentainer-flow\[otel\]"):
        tracing_from_env({"FLOW_OTEL": "1"})
    with pytest.raises(ConfigurationError, match=r"agentainer-flow\[otel\]"):
        TracingObserver()
    # asked only by the standard variables (perhaps meant for another program): no traces
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "console"}) is None


def test_an_unknown_exporter_or_a_missing_otlp_package_is_explained() -> None:
    import importlib.util

    from agentainer_flow._otel import _exporters

    def console() -> str:
        return "console"

    assert _exporters({"OTEL_TRACES_EXPORTER": "console"}, console) == ["console"]
    assert _exporters({"OTEL_TRACES_EXPORTER": "none"}, console) == []
    with pytest.raises(ConfigurationError, match=r"'zipkin'.*otlp, console or none"):
        _exporters({"OTEL_TRACES_EXPORTER": "console,zipkin"}, console)
    try:
        missing = importlib.util.find_spec("opentelemetry.exporter.otlp.proto.grpc") is None
    except ModuleNotFoundError:
        missing = True
    if missing:
        with pytest.raises(ConfigurationError,
                           match="pip install opentelemetry-exporter-otlp-proto-grpc"):
            _exporters({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, console)
