"""Helpers for replay tests: cut a history at any point and resume from there."""

from __future__ import annotations

from typing import Any

import msgspec

from agentainer_flow import WorkflowClient
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.runtimes.mock import MockRuntime
from agentainer_flow.store import ExecutionRecord, MemoryEventStore, NewExecution, StoredEvent
from agentainer_flow.store.events import AgentStarted, Event, ExecutionStarted


async def store_with_prefix(
    record: ExecutionRecord, history: list[StoredEvent], k: int
) -> MemoryEventStore:
    """A fresh store holding only the first ``k`` events of ``history`` (a crash there)."""
    store = MemoryEventStore()
    first = history[0].event
    assert isinstance(first, ExecutionStarted)
    await store.create_execution(
        NewExecution(id=record.id, workflow_name=record.workflow_name,
                     workflow_version=record.workflow_version, tags=record.tags),
        first)
    rest = [s.event for s in history[1:k]]
    if rest:
        await store.append(record.id, 2, rest)
    return store


def normalise(events: list[Event]) -> list[dict[str, Any]]:
    """Events without what legitimately differs between runs (times, adoption)."""
    out = []
    for ev in events:
        data = msgspec.to_builtins(ev)
        for key in ("ts", "started_at", "finished_at", "deadline", "fire_at", "retry_at"):
            data.pop(key, None)
        if isinstance(ev, AgentStarted):
            data.pop("adopted", None)
        out.append(data)
    return out


def by_instance(events: list[Event]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Normalised events grouped per (step, instance), in order within each group."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for data in normalise(events):
        key = (data.get("step", ""), data.get("instance", -1))
        groups.setdefault(key, []).append(data)
    return groups


def client_for(store: MemoryEventStore, runtime: MockRuntime,
               clock: VirtualClock | None = None) -> WorkflowClient:
    return WorkflowClient(store=store, runtime=runtime, clock=clock or VirtualClock())
