"""Golden histories: checked-in event logs replayed against the current code, expecting a
match, or a NonDeterminismError where the code was changed on purpose.

Regenerate after an intended change with ``FLOW_REGEN_GOLDEN=1 pytest tests/engine/test_golden.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentainer_flow import Context, step, workflow
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.runtimes.mock import MockRuntime
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store import ExecutionRecord, ExecutionStatus, MemoryEventStore, StoredEvent
from agentainer_flow.store.events import decode_event, encode_event

from .helpers import client_for
from .test_replay import Pipeline, registry

GOLDEN = Path(__file__).resolve().parent / "golden"


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
    (GOLDEN / "replay_pipeline.jsonl").write_bytes(
        b"\n".join(encode_event(s.event) for s in history) + b"\n")


async def test_golden_history_matches_current_code() -> None:
    if os.environ.get("FLOW_REGEN_GOLDEN"):
        await regenerate()
    record, history = load("replay_pipeline.jsonl")
    report = await replay_history(get_workflow_spec(Pipeline), Pipeline(2), record, history)
    assert report.ok, report.error
    assert report.attempts_checked == 5 and report.in_flight == []


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


