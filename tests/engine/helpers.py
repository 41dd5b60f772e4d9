"""Helpers for replay tests: cut a history at any point and resume from there."""

from __future__ import annotations

from agentainer_flow import WorkflowClient
from agentainer_flow._determinism import by_instance, normalise_events, store_with_prefix
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.runtimes.base import AgentRuntime
from agentainer_flow.store import MemoryEventStore

__all__ = ["by_instance", "client_for", "normalise", "store_with_prefix"]

normalise = normalise_events


def client_for(store: MemoryEventStore, runtime: AgentRuntime,
               clock: VirtualClock | None = None) -> WorkflowClient:
    return WorkflowClient(store=store, runtime=runtime, clock=clock or VirtualClock())
