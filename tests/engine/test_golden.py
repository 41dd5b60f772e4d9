"""Golden histories: checked-in event logs replayed against the current code, expecting a
match, or a NonDeterminismError where the code was changed on purpose.

``replay_pipeline.jsonl`` is frozen: it was recorded before steps' ``depends_on``, sleeps'
durations and child inputs were, and proves that such histories still replay.
``replay_pipeline_recorded_args.jsonl`` is in the current format; regenerate it after an
intended change with ``FLOW_REGEN_GOLDEN=1 pytest tests/engine/test_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentainer_flow import Context, NonDeterminismError, step, workflow
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.runtimes.mock import MockRuntime
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store import ExecutionRecord, ExecutionStatus, MemoryEventStore, StoredEvent
from agentainer_flow.store.events import (
    AgentDeployRequested,
    StepStarted,
    TimerStarted,
    decode_event,
    encode_event,
)

from .helpers import client_for
from .test_replay import Pipeline, registry

GOLDEN = Path(__file__).resolve().parent / "golden"
CURRENT = "replay_pipeline_recorded_args.jsonl"


def load(name: str) -> tuple[ExecutionRecord, list[StoredEvent]]:
    lines = (GOLDEN / name).read_bytes().splitlines()
    history = [StoredEvent("golden", i + 1, decode_event(line)) for i, line in enumerate(lines)]
    record = ExecutionRecord(id="golden", workflow_name="replay_pipeline",
                             workflow_version="1", status=ExecutionStatus.COMPLETED,
                             created_at=0.0, updated_at=0.0)
    return record, history


async def regenerate() -> None:
    async with client_for(MemoryEventStore(), MockRuntime(registry())) as client:
        ex = await client.run_workflow(Pipeline(2))
        await ex.get_result()
        history = await client.store.load(ex.id)
    (GOLDEN / CURRENT).write_bytes(
        b"\n".join(encode_event(s.event) for s in history) + b"\n")


async def test_golden_history_matches_current_code() -> None:
    if os.environ.get("FLOW_REGEN_GOLDEN"):
        await regenerate()
    for name in ("replay_pipeline.jsonl", CURRENT):
        record, history = load(name)
        report = await replay_history(get_workflow_spec(Pipeline), Pipeline(2), record,
                                      history)
        assert report.ok, (name, report.error)
        assert report.attempts_checked == 5 and report.in_flight == []


async def test_golden_history_catches_changed_sleep_env_and_dependencies() -> None:
    @workflow(name="replay_pipeline_longer_sleep")
    class LongerSleep(Pipeline):
        @step(depends_on=["fetch"], parallel=True, count=3)
        async def work(self, ctx: Context, i: int) -> int:
            await ctx.sleep("6m")
            agent = await ctx.deploy_agent(f"worker-{i}", "work:1",
                                           env={"SRC": ctx.state["source"]})
            res = await agent.wait_for_completion()
            ctx.state[f"w{i}"] = res["value"]
            return int(res["value"]) + ctx.parallel_context.total

    @workflow(name="replay_pipeline_other_env")
    class OtherEnv(Pipeline):
        @step()
        async def fetch(self, ctx: Context) -> dict:
            agent = await ctx.deploy_agent("fetcher", "fetch:1", env={"N": str(self.n + 1)})
            out = (await agent.wait_for_completion()).output
            ctx.state["source"] = out["source"]
            await ctx.log(f"fetched {out['source']}")
            return out

    @workflow(name="replay_pipeline_more_deps")
    class MoreDeps(Pipeline):
        @step(depends_on=["work", "fetch"], reduce=True)
        async def summarise(self, ctx: Context, work_results: list[int]) -> object:
            return await Pipeline.summarise(self, ctx, work_results)

    record, history = load(CURRENT)
    found: dict[str, NonDeterminismError] = {}
    for cls in (LongerSleep, OtherEnv, MoreDeps):
        report = await replay_history(get_workflow_spec(cls), cls(2), record, history)
        assert report.error is not None, cls
        found[cls.__name__] = report.error
    assert "duration=300s" in found["LongerSleep"].recorded
    assert "duration=360s" in found["LongerSleep"].actual
    assert "'N': '2'" in found["OtherEnv"].recorded and "'N': '3'" in found["OtherEnv"].actual
    assert found["MoreDeps"].step == "summarise"
    assert "depends_on=['work', 'fetch']" in found["MoreDeps"].actual
    # each names the event of the history where the code parts from it
    at = {name: history[err.seq - 1].event for name, err in found.items() if err.seq}
    assert isinstance(at["LongerSleep"], TimerStarted) and at["LongerSleep"].step == "work"
    assert isinstance(at["OtherEnv"], AgentDeployRequested) and at["OtherEnv"].name == "fetcher"
    assert isinstance(at["MoreDeps"], StepStarted) and at["MoreDeps"].step == "summarise"


async def test_golden_history_catches_renamed_agent() -> None:
    @workflow(name="replay_pipeline_v2")
    class Changed(Pipeline):
        @step(depends_on=["fetch"], parallel=True, count=3)
        async def work(self, ctx: Context, i: int) -> int:
            await ctx.sleep("5m")
            agent = await ctx.deploy_agent(f"gpu-worker-{i}", "work:1",
                                           env={"SRC": ctx.state["source"]})
            res = await agent.wait_for_completion()
            return int(res["value"])

    record, history = load("replay_pipeline.jsonl")
    report = await replay_history(get_workflow_spec(Changed), Changed(2), record, history)
    assert not report.ok
    assert report.error is not None
    text = str(report.error)
    assert "'worker-0'" in text and "'gpu-worker-0'" in text and "'work'" in text


async def test_golden_history_catches_removed_step() -> None:
    @workflow(name="replay_pipeline_v3")
    class NoSummary:
        def __init__(self, n: int) -> None:
            self.n = n

        @step()
        async def fetch(self, ctx: Context) -> dict:
            return {}

    record, history = load("replay_pipeline.jsonl")
    report = await replay_history(get_workflow_spec(NoSummary), NoSummary(2), record, history)
    assert report.error is not None and "no step of that name" in str(report.error)


