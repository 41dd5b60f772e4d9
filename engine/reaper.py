"""Reaping agents that a crash left behind once nobody needs them.

The engine removes an agent as soon as its outcome is durable. A crash between the two
leaves it: a container (running or exited) or an agent directory. Such an agent is garbage
when its execution has ended, or when the history already holds its outcome; it is removed
(stopped first if it still runs). An agent of an execution this store does not know, or of
another store (its ``flow.store`` label), is never touched: a Docker engine may be shared.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.base import EventStore
from agentainer_flow.store.errors import FlowError
from agentainer_flow.store.events import AgentCompleted, AgentFailed

from .runtimes.base import AgentEntry, AgentRuntime, store_label

__all__ = ["Reaped", "reap_agents"]

log = get_logger("agentainer_flow.reaper")


@dataclass(frozen=True, slots=True)
class Reaped:
    """An agent the reaper removed, and why."""

    agent_id: str
    execution_id: str
    reason: str  # "execution completed" / "outcome recorded"...
    was_running: bool


async def reap_agents(store: EventStore, runtime: AgentRuntime, *,
                      dry_run: bool = False) -> list[Reaped]:
    """Remove the agents of this store that nobody needs any more; what was (or, with
    ``dry_run``, would be) removed."""
    ours = store_label(getattr(store, "url", "") or "memory://")
    by_execution: dict[str, list[AgentEntry]] = {}
    for entry in await runtime.list_agents():
        if entry.store and entry.store != ours:
            continue  # another store's agent
        by_execution.setdefault(entry.execution_id, []).append(entry)
    reaped: list[Reaped] = []
    for execution_id, entries in sorted(by_execution.items()):
        try:
            garbage = await _garbage(store, execution_id, entries)
        except FlowError as exc:  # e.g. a damaged history: leave its agents, go on
            log.warning("reap_skipped", execution_id=execution_id, error=str(exc))
            continue
        for entry in entries:
            reason = garbage.get(entry.agent_id)
            if reason is None:
                continue
            if not dry_run:
                await runtime.remove(entry.agent_id)
                log.info("agent_reaped", execution_id=execution_id, agent_id=entry.agent_id,
                         reason=reason, was_running=entry.running)
            reaped.append(Reaped(entry.agent_id, execution_id, reason, entry.running))
    return reaped


async def _garbage(store: EventStore, execution_id: str,
                   entries: list[AgentEntry]) -> dict[str, str]:
    """Which of an execution's agents are garbage, with why."""
    record = await store.get_execution(execution_id)
    if record is None:
        return {}  # not this store's (an agent from before the store label, or elsewhere)
    if record.status.is_terminal:
        return {e.agent_id: f"execution {record.status.value}" for e in entries}
    done = {stored.event.agent_id for stored in await store.load(execution_id)
            if isinstance(stored.event, AgentCompleted | AgentFailed)}
    return {e.agent_id: "outcome recorded" for e in entries if e.agent_id in done}
