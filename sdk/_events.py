"""``ExecutionEvent``: a stored event as people and scripts read it."""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec

from agentainer_flow.store.base import StoredEvent
from agentainer_flow.store.events import (
    AgentCompleted,
    AgentDeployRequested,
    AgentFailed,
    AgentOutput,
    AgentStarted,
    CancelRequested,
    ChildWorkflowCompleted,
    ChildWorkflowStarted,
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    LogRecorded,
    MetricRecorded,
    SideEffectRecorded,
    StateSet,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
    TimerFired,
    TimerStarted,
)

__all__ = ["ExecutionEvent", "event_type"]

_RENAMES = {
    "ExecutionStarted": "workflow_started",
    "ExecutionCompleted": "workflow_completed",
    "ExecutionFailed": "workflow_failed",
    "ExecutionCancelled": "workflow_cancelled",
}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def event_type(ev: Event | type[Event]) -> str:
    """The snake_case type of an event: ``step_started``, ``workflow_failed``..."""
    name = (ev if isinstance(ev, type) else type(ev)).__name__
    return _RENAMES.get(name) or _CAMEL.sub("_", name).lower()


@dataclass(frozen=True)
class ExecutionEvent:
    """One event of an execution, with a readable ``message``."""

    execution_id: str
    seq: int
    type: str
    timestamp: dt.datetime
    message: str
    step: str | None = None
    instance: int | None = None
    attempt: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stored(cls, stored: StoredEvent) -> ExecutionEvent:
        ev = stored.event
        details = msgspec.to_builtins(ev)
        details.pop("type", None)
        details.pop("ts", None)
        return cls(
            execution_id=stored.execution_id,
            seq=stored.seq,
            type=event_type(ev),
            timestamp=dt.datetime.fromtimestamp(ev.ts, dt.UTC),
            message=_message(ev),
            step=getattr(ev, "step", None),
            instance=getattr(ev, "instance", None),
            attempt=getattr(ev, "attempt", None),
            details=details,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "execution_id": self.execution_id, "seq": self.seq, "type": self.type,
            "timestamp": self.timestamp.isoformat(), "step": self.step,
            "instance": self.instance, "attempt": self.attempt, "message": self.message,
            "details": self.details,
        }


def _where(ev: Any) -> str:
    return f"{ev.step}[{ev.instance}]" + (f" attempt {ev.attempt}" if ev.attempt > 1 else "")


def _message(ev: Event) -> str:
    if isinstance(ev, ExecutionStarted):
        return f"workflow {ev.workflow_name!r} (version {ev.workflow_version}) started"
    if isinstance(ev, StepStarted):
        return f"step {_where(ev)} started" if ev.total else f"step {ev.step} has no items"
    if isinstance(ev, StepCompleted):
        return f"step {_where(ev)} completed"
    if isinstance(ev, StepFailed):
        end = "failed" if ev.final else "failed, will retry"
        return f"step {_where(ev)} {end}: {ev.error_type}: {ev.error}"
    if isinstance(ev, StepRetryScheduled):
        at = dt.datetime.fromtimestamp(ev.retry_at, dt.UTC).isoformat(timespec="seconds")
        return f"step {_where(ev)} retry scheduled at {at}"
    if isinstance(ev, StepSkipped):
        return f"step {ev.step} skipped: {ev.reason}"
    if isinstance(ev, AgentDeployRequested):
        return f"deploying agent {ev.name!r} (image {ev.image}) as {ev.agent_id}"
    if isinstance(ev, AgentStarted):
        return f"agent {ev.agent_id} {'adopted' if ev.adopted else 'started'}"
    if isinstance(ev, AgentCompleted):
        return f"agent {ev.agent_id} completed"
    if isinstance(ev, AgentFailed):
        return f"agent {ev.agent_id} failed: {ev.error}"
    if isinstance(ev, AgentOutput):
        return ev.text.rstrip("\n")
    if isinstance(ev, StateSet):
        return f"state[{ev.key!r}] {'deleted' if ev.deleted else 'set'}"
    if isinstance(ev, TimerStarted):
        at = dt.datetime.fromtimestamp(ev.fire_at, dt.UTC).isoformat(timespec="seconds")
        return f"timer set for {at}"
    if isinstance(ev, TimerFired):
        return "timer fired"
    if isinstance(ev, SideEffectRecorded):
        return f"recorded {ev.kind}()"
    if isinstance(ev, ChildWorkflowStarted):
        return f"child workflow {ev.workflow_name!r} started as {ev.child_id}"
    if isinstance(ev, ChildWorkflowCompleted):
        return f"child workflow {ev.child_id} {ev.status}"
    if isinstance(ev, LogRecorded):
        return ev.message
    if isinstance(ev, MetricRecorded):
        return f"metric {ev.name}={ev.value:g}"
    if isinstance(ev, CancelRequested):
        return "cancel requested" + (f": {ev.reason}" if ev.reason else "")
    if isinstance(ev, ExecutionCompleted):
        return "workflow completed"
    if isinstance(ev, ExecutionFailed):
        return f"workflow failed: {ev.error}"
    if isinstance(ev, ExecutionCancelled):
        return "workflow cancelled"
    return type(ev).__name__
