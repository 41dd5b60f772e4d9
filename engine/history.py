"""The fold of an execution's events into the state the scheduler works from.

The same ``apply`` runs when a history is loaded and when the engine emits a new event, so
what a resumed execution knows is, by construction, what the original run knew. It also
refuses events that cannot follow the ones before them (a second outcome for a finished
instance, an event of an attempt that never started, anything after the end) with
``HistoryCorruptedError``: such a history was damaged, and replaying it would redo work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from agentainer_flow.store.errors import HistoryCorruptedError
from agentainer_flow.store.events import (
    AgentOutput,
    CancelRequested,
    CommandEvent,
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    StateSet,
    StepCompleted,
    StepEvent,
    StepFailed,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
)

from .spec import ErrorHandler, WorkflowSpec

__all__ = ["ExecutionState", "InstanceState", "StepState"]

CommandKey = tuple[str, int, int]  # (step, instance, attempt)


@dataclass(slots=True)
class InstanceState:
    """One instance of a step: its latest attempt and where it stands."""

    attempt: int = 0
    status: str = "pending"  # pending|running|retrying|retry_wait|completed|failed
    deadline: float | None = None
    retry_at: float | None = None
    result: Any = None  # encoded tree
    error: str | None = None
    error_type: str | None = None


@dataclass(slots=True)
class StepState:
    """A step: decided or not, its instances, and its outcome."""

    status: str = "pending"  # pending|running|completed|failed|skipped
    total: int = 1
    started: int = 0  # instances started at least once
    instances: dict[int, InstanceState] = field(default_factory=dict)
    error: str | None = None
    error_type: str | None = None
    skip_reason: str = ""

    @property
    def resolved(self) -> bool:
        return self.status in ("completed", "failed", "skipped")


class ExecutionState:
    """Everything the events of one execution say, kept up to date event by event."""

    def __init__(self, spec: WorkflowSpec, execution_id: str = "") -> None:
        self.spec = spec
        #: named by ``HistoryCorruptedError`` when an event cannot follow the ones before
        self.execution_id = execution_id
        self.started: ExecutionStarted | None = None
        self.steps: dict[str, StepState] = {name: StepState() for name in spec.order}
        self.commands: dict[CommandKey, dict[int, list[CommandEvent]]] = {}
        self.state: dict[str, Any] = {}  # encoded trees
        self.snapshots: dict[CommandKey, dict[str, Any]] = {}
        self.cancel_requested = False
        self.cancel_reason = ""
        self.failure: tuple[str, str, str] | None = None  # (step, error, error_type)
        self.terminal: Event | None = None
        self.unknown_steps: list[str] = []
        self.newly_resolved: list[str] = []
        self.last_seq = 0
        #: per agent id, where its recorded output stops (``AgentOutput.cursor``)
        self.output_cursors: dict[str, str] = {}

    def apply(self, seq: int, ev: Event) -> None:
        """Fold one event in; raises ``HistoryCorruptedError`` if it cannot follow the
        events before it."""
        if self.started is None or self.terminal is not None:
            self._check_ends(seq, ev)
        self.last_seq = seq
        if isinstance(ev, CommandEvent):
            key = (ev.step, ev.instance, ev.attempt)
            if key not in self.snapshots:
                self._check_attempt(seq, ev)
            by_index = self.commands.get(key)
            if by_index is None:
                by_index = self.commands[key] = {}
            recorded = by_index.get(ev.index)
            if recorded is None:
                by_index[ev.index] = [ev]
            else:
                recorded.append(ev)
            if isinstance(ev, StateSet):
                if ev.deleted:
                    self.state.pop(ev.key, None)
                else:
                    self.state[ev.key] = ev.value
            return
        if isinstance(ev, AgentOutput):
            self.output_cursors[ev.agent_id] = ev.cursor
            return
        if isinstance(ev, StepStarted):
            step = self._step(ev.step)
            if step is None:
                return
            if ev.total == 0:
                step.total = 0
                self._resolve(ev.step, step, "completed")
                return
            step.status = "running"
            step.total = ev.total
            inst = step.instances.get(ev.instance)
            if inst is None:
                inst = step.instances[ev.instance] = InstanceState()
                step.started += 1
            elif inst.status in _FINISHED:
                self._corrupt(seq, f"{_what(ev)} started again after it {inst.status}")
            inst.attempt = ev.attempt
            inst.status = "running"
            inst.deadline = ev.deadline
            inst.retry_at = None
            self.snapshots[(ev.step, ev.instance, ev.attempt)] = dict(self.state)
        elif isinstance(ev, StepCompleted):
            step = self._step(ev.step)
            if step is None:
                return
            inst = self._outcome_of(seq, ev, step)
            inst.status = "completed"
            inst.result = ev.result
            self.snapshots.pop((ev.step, ev.instance, ev.attempt), None)
            self._check_done(ev.step, step)
        elif isinstance(ev, StepFailed):
            step = self._step(ev.step)
            if step is None:
                return
            inst = self._outcome_of(seq, ev, step)
            inst.error, inst.error_type = ev.error, ev.error_type
            self.snapshots.pop((ev.step, ev.instance, ev.attempt), None)
            if not ev.final:
                inst.status = "retrying"
                return
            inst.status = "failed"
            if step.error is None:
                step.error, step.error_type = ev.error, ev.error_type
            spec = self.spec.steps.get(ev.step)
            if spec is not None and spec.error_handler is ErrorHandler.FAIL:
                if self.failure is None:
                    self.failure = (ev.step, ev.error, ev.error_type)
                if not step.resolved:
                    self._resolve(ev.step, step, "failed")
            else:
                self._check_done(ev.step, step)
        elif isinstance(ev, StepRetryScheduled):
            step = self._step(ev.step)
            if step is None:
                return
            inst = self._outcome_of(seq, ev, step)
            inst.status = "retry_wait"
            inst.retry_at = ev.retry_at
        elif isinstance(ev, StepSkipped):
            step = self._step(ev.step)
            if step is None:
                return
            step.skip_reason = ev.reason
            self._resolve(ev.step, step, "skipped")
        elif isinstance(ev, ExecutionStarted):
            if self.started is not None:
                self._corrupt(seq, "a second ExecutionStarted")
            self.started = ev
        elif isinstance(ev, CancelRequested):
            self.cancel_requested = True
            self.cancel_reason = ev.reason
        elif isinstance(ev, ExecutionCompleted | ExecutionFailed | ExecutionCancelled):
            self.terminal = ev

    def _corrupt(self, seq: int, problem: str) -> NoReturn:
        raise HistoryCorruptedError(self.execution_id or "?", seq, problem)

    def _check_ends(self, seq: int, ev: Event) -> None:
        """Nothing comes before ``ExecutionStarted``, nothing after the terminal event."""
        if self.terminal is not None:
            self._corrupt(seq, f"{type(ev).__name__} after the execution ended "
                               f"({type(self.terminal).__name__})")
        if not isinstance(ev, ExecutionStarted):
            self._corrupt(seq, f"the history begins with {type(ev).__name__}, "
                               "not ExecutionStarted")

    def _check_attempt(self, seq: int, ev: StepEvent) -> None:
        """An event of a step attempt needs that attempt to have started."""
        step = self.steps.get(ev.step)
        inst = None if step is None else step.instances.get(ev.instance)
        if step is not None and (inst is None or not 1 <= ev.attempt <= inst.attempt):
            self._corrupt(seq, f"{type(ev).__name__} of {_what(ev)}, which never started")

    def _outcome_of(self, seq: int, ev: StepEvent, step: StepState) -> InstanceState:
        """The instance an outcome event is about: started, and not finished already."""
        inst = step.instances.get(ev.instance)
        if inst is None or not 1 <= ev.attempt <= inst.attempt:
            self._corrupt(seq, f"{type(ev).__name__} of {_what(ev)}, which never started")
        if inst.status in _FINISHED:
            self._corrupt(seq, f"a second outcome ({type(ev).__name__}) of {_what(ev)}, "
                               f"which already {inst.status}")
        return inst

    def _step(self, name: str) -> StepState | None:
        step = self.steps.get(name)
        if step is None and name not in self.unknown_steps:
            self.unknown_steps.append(name)
        return step

    def _check_done(self, name: str, step: StepState) -> None:
        if step.resolved or len(step.instances) < step.total:
            return
        statuses = [i.status for i in step.instances.values()]
        if all(s in ("completed", "failed") for s in statuses):
            self._resolve(name, step, "failed" if "failed" in statuses else "completed")

    def _resolve(self, name: str, step: StepState, status: str) -> None:
        step.status = status
        self.newly_resolved.append(name)

    def step_result_tree(self, name: str) -> Any:
        """The encoded result dependants see: one value, a list for parallel steps, or
        ``None`` for a failed-and-continued or skipped step."""
        step = self.steps[name]
        spec = self.spec.steps[name]
        if step.status == "skipped":
            return None
        if spec.parallel:
            return [
                step.instances[i].result if i in step.instances else None
                for i in range(step.total)
            ]
        if step.status == "failed":
            return None
        inst = step.instances.get(0)
        return inst.result if inst is not None else None


_FINISHED = ("completed", "failed")


def _what(ev: StepEvent) -> str:
    return f"step {ev.step!r} instance {ev.instance} attempt {ev.attempt}"
