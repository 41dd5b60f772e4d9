"""``check_determinism``: prove a workflow survives a crash at any point of its history.

The workflow runs once against the mock runtime. Then, for every crash point k (every event
index by default), a fresh engine resumes it from the first k events, with the agents that
had started by then still "running". Each resume must end with the same outcome and the same
history (per step instance, ignoring times), and must not launch any agent twice. Agents
answer from a script of the first run, so a check does not consume ``mock_agent`` answers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.runtimes.base import (
    AgentOutcome,
    AgentRuntime,
    AgentSpec,
    AgentState,
    AgentStatus,
)
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.store import (
    ExecutionRecord,
    FlowError,
    MemoryEventStore,
    NewExecution,
    StoredEvent,
)
from agentainer_flow.store.events import (
    AgentDeployRequested,
    AgentStarted,
    Event,
    ExecutionStarted,
)

from ._client import WorkflowClient

__all__ = [
    "DeterminismReport",
    "by_instance",
    "check_determinism",
    "normalise_events",
    "store_with_prefix",
]

_TIMES = ("ts", "started_at", "finished_at", "deadline", "fire_at", "retry_at")


def normalise_events(events: Iterable[Event]) -> list[dict[str, Any]]:
    """Events as dicts without what legitimately differs between runs (times, adoption)."""
    out = []
    for ev in events:
        data = msgspec.to_builtins(ev)
        for key in _TIMES:
            data.pop(key, None)
        if isinstance(ev, AgentStarted):
            data.pop("adopted", None)
        out.append(data)
    return out


def by_instance(events: Iterable[Event]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Normalised events grouped per (step, instance): concurrent instances interleave
    differently from run to run, but each instance's own sequence must not change."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for data in normalise_events(events):
        groups.setdefault((data.get("step", ""), data.get("instance", -1)), []).append(data)
    return groups


async def store_with_prefix(
    record: ExecutionRecord, history: list[StoredEvent], k: int
) -> MemoryEventStore:
    """A fresh in-memory store holding only the first ``k`` events of ``history``."""
    store = MemoryEventStore()
    first = history[0].event
    assert isinstance(first, ExecutionStarted)
    await store.create_execution(
        NewExecution(id=record.id, workflow_name=record.workflow_name,
                     workflow_version=record.workflow_version, tags=record.tags),
        first)
    if k > 1:
        await store.append(record.id, 2, [s.event for s in history[1:k]])
    return store


class _ScriptedRuntime(AgentRuntime):
    """Agents that answer what they answered in the first run, counting launches."""

    name = "mock"  # stands in for the mock runtime of the first run

    def __init__(self, outcomes: Mapping[str, AgentOutcome]) -> None:
        self.outcomes = outcomes
        self.launched: list[str] = []
        self.running: set[str] = set()

    async def launch(self, spec: AgentSpec) -> None:
        if spec.agent_id not in self.running:
            self.launched.append(spec.agent_id)
            self.running.add(spec.agent_id)

    async def lookup(self, agent_id: str) -> AgentStatus:
        if agent_id not in self.running:
            return AgentStatus(AgentState.MISSING)
        return AgentStatus(AgentState.EXITED, self.outcomes[agent_id])

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        return self.outcomes[agent_id]

    async def stop(self, agent_id: str) -> None:
        return None

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        return self.outcomes[agent_id].log_tail

    async def remove(self, agent_id: str) -> None:
        return None


@dataclass
class DeterminismReport:
    """What ``check_determinism`` did: the history length and the crash points resumed."""

    execution_id: str
    events: int
    crash_points: list[int] = field(default_factory=list)
    outcome: str = ""


def _placeholder(name: str) -> str:
    return f"test-secret-{name}"


async def check_determinism(
    make_workflow: Callable[[], object],
    *,
    input: Any = None,
    secrets: Mapping[str, str] | None = None,
    crash_points: Iterable[int] | None = None,
    registry: MockRegistry | None = None,
) -> DeterminismReport:
    """Run ``make_workflow()`` once, then resume it from a crash after each crash point.

    Agents answer from ``mock_agent`` rules (``registry``, the default one if not given).
    Raises ``AssertionError`` naming the crash point and the first difference if a resumed
    run ends differently, records a different history, or launches an agent twice.
    """
    outcomes: dict[str, AgentOutcome] = {}
    mock = MockRuntime(registry)
    async with WorkflowClient(store=MemoryEventStore(), runtime=mock, clock=VirtualClock(),
                              secret_fallback=_placeholder) as client:
        execution = await client.run_workflow(make_workflow(), input=input, secrets=secrets)
        expected = await client.engine.wait_outcome(execution.id)
        history = await client.store.load(execution.id)
        record = await client.describe(execution.id)
        for spec in mock.launches:
            status = await mock.lookup(spec.agent_id)
            assert status.outcome is not None
            outcomes[spec.agent_id] = status.outcome
    clean = by_instance(s.event for s in history)
    started_ids = [s.event.agent_id for s in history if isinstance(s.event, AgentStarted)]
    points = list(crash_points) if crash_points is not None else list(range(1, len(history)))
    report = DeterminismReport(execution.id, len(history), outcome=expected.status)
    for k in points:
        if not 1 <= k <= len(history):
            raise ValueError(f"crash point {k} is outside the history (1..{len(history)})")
        runtime = _ScriptedRuntime(outcomes)
        alive = {s.event.agent_id for s in history[:k] if isinstance(s.event, AgentStarted)}
        for s in history[:k]:  # agents started before the crash are still there
            if isinstance(s.event, AgentDeployRequested) and s.event.agent_id in alive:
                runtime.running.add(s.event.agent_id)
        store = await store_with_prefix(record, history, k)
        async with WorkflowClient(store=store, runtime=runtime, clock=VirtualClock(),
                                  secret_fallback=_placeholder) as client:
            try:
                await client.resume(execution.id, secrets=secrets)
                got = await client.engine.wait_outcome(execution.id)
            except FlowError as exc:
                raise AssertionError(
                    f"after a crash at event {k} of {len(history)}: {exc}") from exc
            resumed = await client.store.load(execution.id)
        where = f"after a crash at event {k} of {len(history)}"
        if (got.status, got.result_tree, got.error) != (
                expected.status, expected.result_tree, expected.error):
            raise AssertionError(
                f"{where}: the execution ended {got.status} ({got.result_tree!r} "
                f"{got.error or ''}) instead of {expected.status} "
                f"({expected.result_tree!r} {expected.error or ''})")
        again = by_instance(s.event for s in resumed)
        if again != clean:
            key = next(key for key in sorted(set(again) | set(clean), key=str)
                       if again.get(key) != clean.get(key))
            now, before = again.get(key, []), clean.get(key, [])
            i = next((i for i, (a, b) in enumerate(zip(now, before, strict=False)) if a != b),
                     min(len(now), len(before)))
            raise AssertionError(
                f"{where}: step {key[0]!r} instance {key[1]}, event {i} of that instance: "
                f"the resumed run recorded {now[i] if i < len(now) else 'nothing'!r}, the "
                f"uncrashed run {before[i] if i < len(before) else 'nothing'!r}")
        twice = sorted({a for a in runtime.launched if runtime.launched.count(a) > 1}
                       | {a for a in runtime.launched if a in alive})
        if twice:
            raise AssertionError(f"{where}: agents launched twice: {', '.join(twice)}")
        missing = set(started_ids) - alive - set(runtime.launched)
        if missing:
            raise AssertionError(f"{where}: agents never launched: {', '.join(sorted(missing))}")
        report.crash_points.append(k)
    return report
