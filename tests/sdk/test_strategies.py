"""The public hypothesis strategies (``agentainer_flow.testing.strategies``) draw what they
promise, and ``check_determinism`` names the step that reads a random number or the clock
directly, and why."""

from __future__ import annotations

import asyncio
import datetime
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from agentainer_flow import (
    AgentFailedError,
    Context,
    SerializationError,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow.engine import values
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.testing import (
    CrashPoints,
    DeterminismReport,
    MockRegistry,
    MockRuntime,
    WorkflowTestCase,
    check_determinism,
    mock_agent,
    reset_mocks,
)
from agentainer_flow.testing.strategies import (
    MAX_DEPTH,
    STEP_KINDS,
    AgentFailure,
    GeneratedWorkflow,
    agent_failures,
    agent_results,
    crash_points,
    json_values,
    workflow_dags,
)

SLOW = settings(max_examples=15, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def _forget_mocks() -> Iterator[None]:
    yield
    reset_mocks()


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


# imports ------------------------------------------------------------------------------------
def test_testing_does_not_need_hypothesis() -> None:
    proc = _python("import sys\nsys.modules['hypothesis'] = None  # as if not installed\n"
                   "import agentainer_flow.testing as t\nprint(t.check_determinism.__name__)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "check_determinism"


def test_strategies_without_hypothesis_say_how_to_install_it() -> None:
    proc = _python("import sys\nsys.modules['hypothesis'] = None\n"
                   "from agentainer_flow.testing import strategies")
    assert proc.returncode == 1
    assert "needs hypothesis: pip install 'agentainer-flow[testing]'" in proc.stderr


def test_strategies_is_a_submodule() -> None:
    from agentainer_flow import testing
    from agentainer_flow.testing import strategies

    assert strategies.__name__ == "agentainer_flow.testing.strategies"
    assert testing.strategies is strategies
    assert set(strategies.__all__) >= {"crash_points", "agent_results", "agent_failures",
                                       "workflow_dags"}
    for name in strategies.__all__:
        assert getattr(strategies, name).__doc__, f"{name} has no docstring"


# crash points -------------------------------------------------------------------------------
@given(points=crash_points(), events=st.integers(1, 500))
def test_crash_points_resolve_inside_any_history(points: CrashPoints, events: int) -> None:
    resolved = points.resolve(events)
    assert resolved, points
    assert resolved == sorted(set(resolved))
    assert all(1 <= k <= events for k in resolved)


@given(data=st.data(), events=st.integers(1, 60))
def test_crash_points_for_a_known_history(data: st.DataObject, events: int) -> None:
    points = data.draw(crash_points(events=events, max_points=4))
    assert all(1 <= k <= events for k in points.at)
    assert 1 <= len(points.resolve(events)) <= max(4, events)


def test_crash_points_mean_what_they_say() -> None:
    assert CrashPoints(every=3, start=2).resolve(10) == [2, 5, 8]
    assert CrashPoints(fractions=(0.0, 1.0, 0.5)).resolve(11) == [1, 6, 11]
    assert CrashPoints(at=(3, 99)).resolve(7) == [3, 7]
    assert CrashPoints(every=5).resolve(3) == [1]
    with pytest.raises(ValueError, match="start at 1"):
        CrashPoints(at=(0,))
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        CrashPoints(fractions=(1.5,))
    with pytest.raises(ValueError, match="every must be at least 1"):
        CrashPoints(every=0)
    with pytest.raises(ValueError, match="at least 1 event"):
        crash_points(events=0)


# agent results ------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=agent_results(max_depth=MAX_DEPTH))
def test_agent_results_are_stored_and_read_back_exactly(output: dict[str, Any]) -> None:
    assert isinstance(output, dict)
    json.dumps(output)  # JSON, as an agent prints it
    tree = values.dump(output, where="agent output")
    again = values.load(json.loads(json.dumps(tree)))
    assert again == output and type(again) is dict


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=agent_results(refused=True))
def test_refused_agent_results_are_refused(output: dict[str, Any]) -> None:
    json.dumps(output)
    with pytest.raises(SerializationError, match=r"lone surrogate|nested more than"):
        values.dump(output, where="agent output")


@given(value=json_values(max_depth=3))
def test_json_values_respect_their_depth(value: Any) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max(map(depth, v.values()), default=0)
        if isinstance(v, list):
            return 1 + max(map(depth, v), default=0)
        return 0

    assert depth(value) <= 3


def test_agent_results_reach_the_engines_limit() -> None:
    deepest = 0

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(output=agent_results(max_depth=MAX_DEPTH))
    def measure(output: dict[str, Any]) -> None:
        nonlocal deepest
        depth, value = 0, output
        while isinstance(value, dict | list) and value:
            depth += 1
            value = next(iter(value.values())) if isinstance(value, dict) else value[0]
        deepest = max(deepest, depth)

    measure()
    assert deepest > MAX_DEPTH // 2


@workflow(name="strategies_echo")
class Echo:
    @step()
    async def call(self, ctx: Context) -> Any:
        agent = await ctx.deploy_agent("echo", "echo:1")
        try:
            return (await agent.wait_for_completion()).output
        except SerializationError as exc:
            return f"refused: {exc}"
        except AgentFailedError as exc:
            return {"exit_code": exc.exit_code, "tail": exc.log_tail}


async def _run_on_sqlite(url: str, registry: MockRegistry) -> tuple[Any, int]:
    """Run ``Echo`` on the SQLite file at ``url``; read its result back in a new client."""
    async with WorkflowClient(store=url, runtime=MockRuntime(registry),
                              clock=VirtualClock()) as client:
        execution = await client.run_workflow(Echo())
        await execution.get_result()
    async with WorkflowClient(store=url, runtime=MockRuntime(registry)) as client:
        outcome = await client.engine.wait_outcome(execution.id)
        history = await client.store.load(execution.id)
    return values.load(outcome.result_tree), len(history)


@pytest.mark.parametrize("output", [{"a": {"__flow__": None}}, {"big": 2**70}],
                         ids=["flow-key", "big-int"])
def test_enveloped_agent_results_reach_the_step_as_sent(output: dict[str, Any]) -> None:
    """Outputs the engine stores in an envelope come back to the step as sent."""
    registry = MockRegistry()
    mock_agent("echo", registry=registry).returns(output)
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = asyncio.run(_run_on_sqlite(f"sqlite:///{tmp}/flow.db", registry))
    assert result == output


@SLOW
@given(output=agent_results())
def test_hostile_agent_results_survive_a_real_store(output: dict[str, Any]) -> None:
    registry = MockRegistry()
    mock_agent("echo", registry=registry).returns(output)
    with tempfile.TemporaryDirectory() as tmp:
        result, events = asyncio.run(_run_on_sqlite(f"sqlite:///{tmp}/flow.db", registry))
    assert result == output and events > 3


@SLOW
@given(output=agent_results(refused=True))
def test_refused_agent_results_fail_the_agent_not_the_store(output: dict[str, Any]) -> None:
    registry = MockRegistry()
    mock_agent("echo", registry=registry).returns(output)
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = asyncio.run(_run_on_sqlite(f"sqlite:///{tmp}/flow.db", registry))
    assert result.startswith("refused: cannot store the output of agent 'echo'")


# agent failures -----------------------------------------------------------------------------
@SLOW
@given(failure=agent_failures())
def test_agent_failures_reach_the_step(failure: AgentFailure) -> None:
    assert failure.exit_code != 0
    registry = MockRegistry()
    failure.apply(mock_agent("echo", registry=registry))
    with tempfile.TemporaryDirectory() as tmp:
        result, _ = asyncio.run(_run_on_sqlite(f"sqlite:///{tmp}/flow.db", registry))
    assert result["exit_code"] == failure.exit_code
    assert result["tail"] == values.safe_text(failure.error)  # cleaned, never refused


def test_agent_failures_draw_hostile_text() -> None:
    @settings(max_examples=300, database=None)
    @given(failure=agent_failures())
    def look(failure: AgentFailure) -> None:
        if values.safe_text(failure.error) != failure.error:
            raise _Found

    with pytest.raises(_Found):
        look()


class _Found(Exception):
    pass


# generated workflows ------------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=workflow_dags())
def test_generated_workflows_have_the_shape_they_describe(
        dag: type[GeneratedWorkflow]) -> None:
    assert isinstance(dag, type) and issubclass(dag, GeneratedWorkflow)
    spec = get_workflow_spec(dag)
    assert spec.name == dag.__name__
    assert list(spec.steps) == [s.name for s in dag.dag_steps]
    names: list[str] = []
    for s in dag.dag_steps:
        built = spec.steps[s.name]
        assert set(s.depends_on) <= set(names)  # only earlier steps: a DAG
        assert built.depends_on == s.depends_on
        assert built.count == s.count and built.dynamic == s.dynamic
        assert built.parallel == bool(s.count or s.dynamic)
        assert (built.when is not None) == (s.kind in ("skipped", "conditional"))
        assert s.kind in STEP_KINDS and (s.failure is not None) == (s.kind == "failing")
        if s.dynamic:
            first = next(t for t in dag.dag_steps if t.name == s.depends_on[0])
            assert first.count and first.kind != "failing"
        names.append(s.name)
    assert repr(dag).startswith(f"<generated workflow {dag.__name__}: s0 ")


_SKIPPED = object()


def _integers(value: Any) -> int:
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return sum(map(_integers, value.values()))
    if isinstance(value, list):
        return sum(map(_integers, value))
    return 0


def _expected_result(dag: type[GeneratedWorkflow]) -> Any:
    """What the engine must compute for ``dag``, from the documented step kinds alone."""
    results: dict[str, Any] = {}
    for s in dag.dag_steps:
        deps = [results[d] for d in s.depends_on]
        if s.kind == "skipped" or any(r is _SKIPPED for r in deps):
            results[s.name] = _SKIPPED
            continue
        upstream = deps[0] if len(deps) == 1 else dict(zip(s.depends_on, deps, strict=True))
        if s.kind == "conditional" and _integers(upstream) % 2:
            results[s.name] = _SKIPPED
            continue
        base = _integers(deps)
        items = deps[0] if s.dynamic else range(s.count or 1)
        if s.kind == "failing":  # ErrorHandler.CONTINUE: None for each instance
            result: Any = [None for _ in items]
        elif s.dynamic:
            result = [s.value + i + base + _integers(x) for i, x in enumerate(items)]
        else:
            result = [s.value + i + base for i in items]
        results[s.name] = result if s.count or s.dynamic else result[0]
    steps = dag.dag_steps
    sinks = [s.name for s in steps if not any(s.name in t.depends_on for t in steps)]
    out = {k: None if results[k] is _SKIPPED else results[k] for k in sinks}
    return out[sinks[0]] if len(sinks) == 1 else out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=workflow_dags(max_steps=7, hostile_outputs=False))
def test_generated_workflows_compute_what_their_shape_says(
        dag: type[GeneratedWorkflow]) -> None:
    async def run() -> Any:
        async with WorkflowClient(store="memory://", runtime=MockRuntime(dag.registry()),
                                  clock=VirtualClock()) as client:
            return await (await client.run_workflow(dag())).get_result()

    assert asyncio.run(run()) == _expected_result(dag)


def test_workflow_dags_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="kinds must be among"):
        workflow_dags(kinds=["plain", "exploding"])
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        workflow_dags(min_steps=4, max_steps=2)
    with pytest.raises(ValueError, match=r"max_depth must be in 1\.\.100"):
        agent_results(max_depth=MAX_DEPTH + 1)


class TestGeneratedInATestCase(WorkflowTestCase):
    async def test_a_drawn_workflow_runs_as_is(self) -> None:
        dag = find(workflow_dags(min_steps=3, max_steps=3, kinds=["plain"]),
                   lambda d: d.dag_steps[1].count is not None, settings=settings(database=None))
        # drawing it registered its rules in the default registry, which the test case uses
        assert await self.run_workflow(dag()) is not None
        report = await self.assert_deterministic(dag, crash_points=CrashPoints(every=2))
        assert report.crash_points == CrashPoints(every=2).resolve(report.events)

    async def test_its_rules_count_the_calls(self) -> None:
        dag = find(workflow_dags(min_steps=2, max_steps=2, kinds=["plain"]),
                   lambda d: d.dag_steps[0].count == 3, settings=settings(database=None))
        rules = dag.mock_agents()  # the latest rules registered answer
        await self.run_workflow(dag())
        assert [r.call_count for r in rules] == [s.count or 1 for s in dag.dag_steps]
        assert rules[0].calls[2].name == dag.agent_name("s0", 2)


# the determinism check ----------------------------------------------------------------------
def _shared_helper() -> float:
    return random.random()


@workflow(name="strategies_roll")
class Roll:
    @step()
    async def plan(self, ctx: Context) -> int:
        return 1

    @step(depends_on=["plan"])
    async def roll(self, ctx: Context, plan_result: int) -> float:
        return plan_result + random.random()


@workflow(name="strategies_clock")
class Clock:
    @step()
    async def stamp(self, ctx: Context) -> None:
        ctx.state["hour"] = int(time.time() // 3600)


@workflow(name="strategies_ids")
class Ids:
    @step()
    async def name_it(self, ctx: Context) -> str:
        agent = await ctx.deploy_agent(f"worker-{uuid.uuid4().hex[:8]}", "w:1")
        return str((await agent.wait_for_completion())["v"])


@workflow(name="strategies_wall")
class Wall:
    @step()
    async def today(self, ctx: Context) -> str:
        return datetime.datetime.now().isoformat()


@workflow(name="strategies_helper")
class Helper:
    @step()
    async def pick(self, ctx: Context) -> float:
        return _shared_helper()


@workflow(name="strategies_choice")
class Choice:
    @step()
    async def pick(self, ctx: Context) -> str:
        return str(random.choice(range(10**12)))


@pytest.mark.parametrize(("cls", "step_name", "call"), [
    (Roll, "roll", "random.random()"),
    (Clock, "stamp", "time.time()"),
    (Ids, "name_it", "uuid.uuid4()"),
    (Wall, "today", "datetime.now()"),
    (Helper, "pick", "random.random()"),
    (Choice, "pick", "random.choice()"),
])
async def test_direct_nondeterminism_is_named_with_its_step(
        cls: type, step_name: str, call: str) -> None:
    mock_agent("worker-*").returns({"v": 1})
    with pytest.raises(AssertionError) as info:
        await check_determinism(cls)
    message = str(info.value)
    assert message.startswith(f"step {step_name!r} recorded a different result on a second "
                              "run"), message
    assert f"it calls {call} at test_strategies.py:" in message
    assert "use ctx.random(), ctx.now() and ctx.uuid4() instead" in message


_COUNTER = [0]


@workflow(name="strategies_counter")
class Counter:
    @step()
    async def count(self, ctx: Context) -> int:
        _COUNTER[0] += 1  # state outside ctx, which the check cannot see being read
        return _COUNTER[0]


async def test_an_unseen_cause_is_named_as_likely() -> None:
    with pytest.raises(AssertionError) as info:
        await check_determinism(Counter)
    message = str(info.value)
    assert message.startswith("step 'count' recorded a different result on a second run")
    assert ("it probably calls random.random(), time.time(), uuid.uuid4() or reads the "
            "wall clock") in message


@workflow(name="strategies_recorded")
class Recorded:
    @step()
    async def draw(self, ctx: Context) -> str:
        return f"{ctx.random()} {ctx.uuid4()} {ctx.now().isoformat()}"

    @step(depends_on=["draw"], parallel=True, count=3)
    async def fan(self, ctx: Context, draw_result: str, index: int) -> str:
        await ctx.sleep("1m")
        return f"{draw_result} {index} {ctx.random()} {ctx.now()}"


async def test_ctx_sources_are_deterministic_at_every_crash_point() -> None:
    report = await check_determinism(Recorded)  # every event, and the second run
    assert report.reran and report.crash_points == list(range(1, report.events))
    assert report.nondeterministic_calls == []


@workflow(name="strategies_timing")
class Timing:
    @step()
    async def work(self, ctx: Context) -> str:
        started = time.monotonic()
        await ctx.log("worked", took=time.monotonic() - started)
        await ctx.metric("work_seconds", time.time() - started)
        return "done"


async def test_timing_that_is_not_recorded_passes_and_is_reported() -> None:
    report = await check_determinism(Timing)
    calls = {(c.step, c.call) for c in report.nondeterministic_calls}
    assert calls == {("work", "time.monotonic()"), ("work", "time.time()")}
    assert all(c.where.startswith("test_strategies.py:") for c in report.nondeterministic_calls)


async def test_the_check_leaves_random_and_time_as_they_were() -> None:
    originals = (random.random, random.choice, uuid.uuid4, time.time, time.monotonic)
    random.seed(1234)
    expected = random.random()
    random.seed(1234)
    with pytest.raises(AssertionError):
        await check_determinism(Roll)
    assert (random.random, random.choice, uuid.uuid4, time.time, time.monotonic) == originals
    assert random.random() == expected


async def test_checks_cannot_overlap() -> None:
    first, second = await asyncio.gather(check_determinism(Recorded),
                                         check_determinism(Recorded), return_exceptions=True)
    assert isinstance(first, DeterminismReport) and first.reran
    assert isinstance(second, RuntimeError) and "already running" in str(second)
    assert not hasattr(time.time, "__wrapped__")  # the first one cleaned up after itself


class TestAssertDeterministic(WorkflowTestCase):
    async def test_names_the_step_and_the_cause(self) -> None:
        with pytest.raises(AssertionError, match=r"step 'roll' .* it calls random\.random\(\)"):
            await self.assert_deterministic(Roll)

    async def test_passes_with_ctx_sources(self) -> None:
        report = await self.assert_deterministic(Recorded, crash_points=[3])
        assert report.crash_points == [3] and report.reran


def test_readme_property_test_example_runs(tmp_path: Path) -> None:
    """The example in the module docstring works as written."""
    from agentainer_flow.testing import strategies

    doc = strategies.__doc__ or ""
    code = doc.split("results::\n", 1)[1].split("\nAnd of the engine", 1)[0]
    script = "\n".join(line[4:] for line in code.splitlines())
    script = ("from agentainer_flow import Context, step, workflow\n"
              "@workflow(name='report')\nclass Report:\n"
              "    def __init__(self, topic): self.topic = topic\n"
              "    @step()\n    async def research(self, ctx: Context) -> dict:\n"
              "        a = await ctx.deploy_agent('researcher', 'r:1')\n"
              "        return (await a.wait_for_completion()).output\n"
              + script + "\ntest_report_survives_any_crash()\nprint('ok')\n")
    (tmp_path / "example.py").write_text(script)
    proc = subprocess.run([sys.executable, str(tmp_path / "example.py")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_readme_property_test_runs(tmp_path: Path) -> None:
    """The README's property test runs as written, on the README's quickstart workflow."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```python\n", 1)[1]
    quickstart = quickstart.split("```", 1)[0].replace("asyncio.run(main())", "")
    example = readme.split("#### Property tests with hypothesis", 1)[1]
    example = example.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "readme_property.py"
    script.write_text(quickstart + example + "\ntest_report_survives_any_crash()\nprint('ok')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
