"""One row per step instance of a history: what ``flow history`` and ``flow status`` show,
and what a server returns as an execution's per-step summary.

Computed from the events alone (no workflow code needed), so it works for any execution a
store holds, finished or not, and for a prefix of a history (``flow replay --until``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agentainer_flow.engine import values
from agentainer_flow.store.base import StoredEvent
from agentainer_flow.store.events import (
    AgentCompleted,
    AgentDeployRequested,
    AgentFailed,
    AgentStarted,
    ChildWorkflowStarted,
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    StateSet,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
)

__all__ = ["AgentSummary", "StepSummary", "state_at", "step_summaries"]

@dataclass(frozen=True, kw_only=True)
class AgentSummary:
    """An agent a step deployed: its name, image and how it ended so far.

    ``status``: ``requested`` (recorded, not reported running yet), ``running``,
    ``completed`` or ``failed``."""

    name: str
    image: str
    agent_id: str
    attempt: int
    index: int
    status: str = "requested"
    exit_code: int | None = None
    error: str | None = None
    command: tuple[str, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "image": self.image, "agent_id": self.agent_id,
                "attempt": self.attempt, "index": self.index, "status": self.status,
                "exit_code": self.exit_code, "error": self.error,
                "command": list(self.command) if self.command is not None else None,
                "env": dict(self.env)}


@dataclass(frozen=True, kw_only=True)
class StepSummary:
    """One step instance as its events tell it.

    ``status`` is one of ``running``, ``retrying`` (failed, another attempt scheduled),
    ``completed``, ``failed``, ``skipped`` (``when`` was false or an upstream step was
    skipped), ``cancelled`` or ``interrupted`` (the execution ended while it ran).
    ``result`` is the decoded value of a completed instance; ``error`` the last failure.
    ``started_at``/``finished_at`` are unix times; ``duration`` spans every attempt.
    ``note`` says more where the status alone does not (a skip's reason, "no items").
    """

    step: str
    instance: int
    status: str
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: str | None = None
    error_type: str | None = None
    retry_at: float | None = None
    agents: tuple[AgentSummary, ...] = ()
    children: tuple[str, ...] = ()
    note: str = ""
    first_seq: int = 0
    last_seq: int = 0

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``result`` is left as a Python value for the caller to encode)."""
        return {"step": self.step, "instance": self.instance, "status": self.status,
                "attempts": self.attempts, "started_at": self.started_at,
                "finished_at": self.finished_at, "duration": self.duration,
                "result": self.result, "error": self.error, "error_type": self.error_type,
                "retry_at": self.retry_at, "agents": [a.to_dict() for a in self.agents],
                "children": list(self.children), "note": self.note,
                "first_seq": self.first_seq, "last_seq": self.last_seq}


def _events(history: Iterable[StoredEvent | Event]) -> list[tuple[int, Event]]:
    """(seq, event) pairs; bare events are numbered from 1 in order."""
    found: list[tuple[int, Event]] = []
    for n, item in enumerate(history, 1):
        if isinstance(item, StoredEvent):
            found.append((item.seq, item.event))
        else:
            found.append((n, item))
    return found


def step_summaries(history: Iterable[StoredEvent | Event]) -> list[StepSummary]:
    """One summary per step instance the history mentions, in the order they first appear.

    ``history`` is an execution's events (``StoredEvent`` as a store loads them, or bare
    events in order), whole or cut at any point.
    """
    rows: dict[tuple[str, int], StepSummary] = {}
    agents: dict[str, tuple[tuple[str, int], AgentSummary]] = {}
    ended: Event | None = None

    def put(key: tuple[str, int], seq: int, **changes: Any) -> None:
        row = rows.get(key)
        if row is None:
            rows[key] = StepSummary(step=key[0], instance=key[1], first_seq=seq, last_seq=seq,
                                    **changes)
        else:
            rows[key] = replace(row, last_seq=seq, **changes)

    def add_agent(key: tuple[str, int], seq: int, agent: AgentSummary) -> None:
        row = rows.get(key)
        if row is None:
            return
        listed = tuple(a for a in row.agents if a.agent_id != agent.agent_id)
        put(key, seq, agents=(*listed, agent))
        agents[agent.agent_id] = (key, agent)

    for seq, ev in _events(history):
        if isinstance(ev, StepStarted):
            key = (ev.step, ev.instance)
            if ev.total == 0:
                put(key, seq, status="completed", started_at=ev.ts, finished_at=ev.ts,
                    note="no items")
                continue
            row = rows.get(key)
            put(key, seq, status="running", attempts=max(ev.attempt, row.attempts if row else 0),
                started_at=row.started_at if row and row.started_at is not None else ev.ts,
                retry_at=None)
        elif isinstance(ev, StepCompleted):
            put((ev.step, ev.instance), seq, status="completed", finished_at=ev.ts,
                result=values.load(ev.result), error=None, error_type=None)
        elif isinstance(ev, StepFailed):
            put((ev.step, ev.instance), seq, status="failed" if ev.final else "retrying",
                finished_at=ev.ts if ev.final else None, error=ev.error,
                error_type=ev.error_type)
        elif isinstance(ev, StepRetryScheduled):
            put((ev.step, ev.instance), seq, status="retrying", retry_at=ev.retry_at)
        elif isinstance(ev, StepSkipped):
            put((ev.step, 0), seq, status="skipped", started_at=None, finished_at=ev.ts,
                note=ev.reason)
        elif isinstance(ev, AgentDeployRequested):
            add_agent((ev.step, ev.instance), seq, AgentSummary(
                name=ev.name, image=ev.image, agent_id=ev.agent_id, attempt=ev.attempt,
                index=ev.index, command=tuple(ev.command) if ev.command is not None else None,
                env=dict(ev.env)))
        elif isinstance(ev, AgentStarted | AgentCompleted | AgentFailed):
            known = agents.get(ev.agent_id)
            if known is None:
                continue
            key, agent = known
            if isinstance(ev, AgentStarted):
                agent = replace(agent, status="running")
            elif isinstance(ev, AgentCompleted):
                agent = replace(agent, status="completed", exit_code=ev.exit_code)
            else:
                agent = replace(agent, status="failed", exit_code=ev.exit_code, error=ev.error)
            add_agent(key, seq, agent)
        elif isinstance(ev, ChildWorkflowStarted):
            key = (ev.step, ev.instance)
            if key in rows and ev.child_id not in rows[key].children:
                put(key, seq, children=(*rows[key].children, ev.child_id))
        elif isinstance(ev, ExecutionCompleted | ExecutionFailed | ExecutionCancelled):
            ended = ev
    if ended is not None:  # what still ran when the execution ended did not finish
        stopped = "cancelled" if isinstance(ended, ExecutionCancelled) else "interrupted"
        for key, row in rows.items():
            if row.status in ("running", "retrying"):
                rows[key] = replace(row, status=stopped, finished_at=ended.ts)
    return list(rows.values())


def state_at(history: Iterable[StoredEvent | Event]) -> dict[str, Any]:
    """The workflow state (``ctx.state``) after the given events: every write folded in."""
    state: dict[str, Any] = {}
    for _, ev in _events(history):
        if isinstance(ev, StateSet):
            if ev.deleted:
                state.pop(ev.key, None)
            else:
                state[ev.key] = ev.value
    return {k: values.load(v) for k, v in state.items()}
