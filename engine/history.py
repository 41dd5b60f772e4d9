"""The fold of an execution's events into the state the scheduler works from.

The same ``apply`` runs when a history is loaded and when the engine emits a new event, so
what a resumed execution knows is, by construction, what the original run knew. It also
refuses events that cannot follow the ones before them (a second outcome for a finished
instance, an event of an attempt that never started, anything after the end) with
``HistoryCorruptedError``: such a history was damaged, and replaying it would redo work.

The fold also keeps what a history fixes about the shape of the DAG (when each step was
decided, with what dependencies, how many instances, skipped or not), and
``shape_divergence`` compares that with the code: a resumed execution and ``flow replay``
both refuse a history the code could not have produced.
"""

from __future__ import annotations

from collections.abc import Callable
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
    PatchesDeclared,
    StateSet,
    StepCompleted,
    StepEvent,
    StepFailed,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
)

from . import values
from .errors import NonDeterminismError
from .spec import ErrorHandler, StepSpec, WorkflowSpec

__all__ = [
    "Decision",
    "ExecutionState",
    "InstanceState",
    "StepState",
    "effective_deps",
    "shape_divergence",
]

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


@dataclass(slots=True)
class Decision:
    """How a history decided a step: its first ``StepStarted`` or its ``StepSkipped``."""

    seq: int
    started: bool  # False: skipped
    total: int = 1
    reason: str = ""  # why it was skipped
    instance: int = 0
    attempt: int = 1
    depends_on: list[str] | None = None  # as recorded (None: not recorded)
    #: the encoded results of the code's dependencies then, kept for steps whose decision
    #: reads them (``when=``, ``dynamic=True``)
    upstream: dict[str, Any] | None = None


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
        # what the history fixes, for the divergence checks (seqs say where)
        #: how each step was decided, by step name
        self.decisions: dict[str, Decision] = {}
        #: the seq at which each resolved step was resolved
        self.resolved_at: dict[str, int] = {}
        #: the seq of the first event of each step name (known or not)
        self.step_seqs: dict[str, int] = {}
        #: the seq of the first start of each step instance
        self.instance_seqs: dict[tuple[str, int], int] = {}
        #: the seq of the first event of each command, per attempt and index
        self.command_seqs: dict[CommandKey, dict[int, int]] = {}
        #: the seq from which no ordinary step may start (cancel requested, or failed)
        self.stopping_at: int | None = None
        #: the patch ids of ``PatchesDeclared`` (``None``: none declared)
        self.patches: frozenset[str] | None = None
        #: whether anything happened past the start (a step was decided, a command ran)
        self.progressed = False

    def apply(self, seq: int, ev: Event) -> None:
        """Fold one event in; raises ``HistoryCorruptedError`` if it cannot follow the
        events before it."""
        if self.started is None or self.terminal is not None:
            self._check_ends(seq, ev)
        self.last_seq = seq
        if isinstance(ev, StepEvent | StepSkipped):
            self.progressed = True
            self.step_seqs.setdefault(ev.step, seq)
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
                self.command_seqs.setdefault(key, {})[ev.index] = seq
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
            if step.status == "pending":
                self._decided(seq, ev.step, Decision(
                    seq, True, ev.total, instance=ev.instance, attempt=ev.attempt,
                    depends_on=ev.depends_on))
            self.instance_seqs.setdefault((ev.step, ev.instance), seq)
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
                    self._stopping(seq)
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
            if step.status == "pending":
                self._decided(seq, ev.step, Decision(seq, False, 0, ev.reason,
                                                     depends_on=ev.depends_on))
            step.skip_reason = ev.reason
            self._resolve(ev.step, step, "skipped")
        elif isinstance(ev, ExecutionStarted):
            if self.started is not None:
                self._corrupt(seq, "a second ExecutionStarted")
            self.started = ev
        elif isinstance(ev, CancelRequested):
            self.cancel_requested = True
            self.cancel_reason = ev.reason
            self._stopping(seq)
        elif isinstance(ev, PatchesDeclared):
            if self.patches is None:  # the first declaration is the execution's
                self.patches = frozenset(ev.patches)
        elif isinstance(ev, ExecutionCompleted | ExecutionFailed | ExecutionCancelled):
            self.terminal = ev

    def _stopping(self, seq: int) -> None:
        if self.stopping_at is None:
            self.stopping_at = seq

    def _decided(self, seq: int, name: str, decision: Decision) -> None:
        """Note how the step was decided, with what its decision read from upstream."""
        spec = self.spec.steps[name]
        if spec.when is not None or spec.dynamic:
            decision.upstream = {d: self.step_result_tree(d) for d in spec.depends_on}
        self.decisions[name] = decision

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
        self.resolved_at.setdefault(name, self.last_seq)
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


def effective_deps(spec: WorkflowSpec) -> dict[str, tuple[str, ...]]:
    """What each step waits for, as the scheduler runs it: its ``depends_on``, and for an
    ``always_run`` step without dependencies (a cleanup step) every ordinary step."""
    ordinary = tuple(n for n in spec.order if not spec.steps[n].always_run)
    out: dict[str, tuple[str, ...]] = {}
    for name in spec.order:
        step = spec.steps[name]
        deps = step.depends_on
        if not deps and step.always_run:
            deps = ordinary
        out[name] = deps
    return out


#: what to do about a difference in the shape of the DAG (``ctx.patched`` cannot version it)
DAG_HINT = (
    "restore the previous steps and dependencies to finish this execution; to change the "
    "DAG under executions in flight, declare the new code as a new version "
    "(@workflow(version=...)) and keep the old class loaded until they have finished"
)


def shape_divergence(h: ExecutionState) -> NonDeterminismError | None:
    """The first place (by seq) where the history ``h`` folded cannot have been produced by
    the DAG of ``h.spec``: a recorded step the code lacks, a step decided before one of the
    code's dependencies had finished or with other recorded ``depends_on``, a skip where
    the code runs the step (or the other way round), another instance count. ``None`` if
    the shape matches.

    Only ``when=`` predicates run (on the recorded upstream results); no step body does.
    """
    spec = h.spec
    found: list[NonDeterminismError] = []

    def diverged(name: str, seq: int, recorded: str, actual: str, *, instance: int = 0,
                 attempt: int = 0, hint: str = DAG_HINT) -> None:
        found.append(NonDeterminismError(
            execution_id=h.execution_id, step=name, instance=instance, attempt=attempt,
            index=None, seq=seq, recorded=recorded, actual=actual, hint=hint))

    if h.unknown_steps:  # reported first, wherever they are in the history
        name = h.unknown_steps[0]
        return NonDeterminismError(
            execution_id=h.execution_id, step=name, instance=0, attempt=0, index=None,
            seq=h.step_seqs.get(name), recorded=f"step {name!r}",
            actual=f"no step of that name (steps now: {', '.join(spec.order)})",
            hint=DAG_HINT)
    deps_of = effective_deps(spec)
    for name, d in sorted(h.decisions.items(), key=lambda kv: kv[1].seq):
        if found and min(e.seq or 0 for e in found) < d.seq:
            break  # an earlier difference is the one to report
        problem = _decision_problem(h, spec.steps[name], deps_of[name], d)
        if problem is not None:
            recorded, actual, seq, instance, attempt = problem
            diverged(name, seq, recorded, actual, instance=instance, attempt=attempt)
    return min(found, key=lambda e: e.seq or 0) if found else None


def _decision_problem(h: ExecutionState, step: StepSpec, deps: tuple[str, ...],
                      d: Decision) -> tuple[str, str, int, int, int] | None:
    """How the recorded decision ``d`` of ``step`` differs from what the code decides:
    (recorded, actual, seq, instance, attempt), or ``None``."""
    name = step.name
    did = "started" if d.started else f"skipped ({d.reason})" if d.reason else "skipped"
    declared = list(step.depends_on)
    at_decision = (d.seq, d.instance, d.attempt)
    for dep in deps:
        at = h.resolved_at.get(dep)
        if at is None or at > d.seq:
            then = ("had not run" if dep not in h.step_seqs
                    else "had not finished" if at is None
                    else f"had not finished (it did at seq {at})")
            return (f"step {name!r} {did} while step {dep!r} {then}",
                    f"step {name!r} waiting for {dep!r} (depends_on={declared})",
                    *at_decision)
    if d.depends_on is not None and sorted(d.depends_on) != sorted(declared):
        return (f"step {name!r} {did} with depends_on={d.depends_on}",
                f"step {name!r} with depends_on={declared}", *at_decision)
    if not d.started and d.reason.startswith("execution "):
        # skipped because the execution was stopping (cancelled, failed, timed out): that
        # is the execution's fate, not this step's decision, unless the step always runs
        if step.always_run:
            return (f"step {name!r} {did}", f"step {name!r} running (always_run=True)",
                    *at_decision)
        return None
    stopping = h.stopping_at is not None and h.stopping_at < d.seq
    kind, total, why = _code_decision(h, step, deps, d, stopping)
    if d.started and kind == "skip":
        return f"step {name!r} started", f"step {name!r} skipped ({why})", *at_decision
    if not d.started and kind != "skip":
        because = ("its when= condition is true" if step.when is not None
                   else "it has no when= condition")
        return f"step {name!r} {did}", f"step {name!r} running ({because})", *at_decision
    if kind == "start" and d.started and d.total != total:
        recorded = f"step {name!r} with {_instances(d.total)}"
        if total < d.total and (name, total) in h.instance_seqs:
            # where the history has an instance the code does not
            recorded += f", instance {total} among them"
            at_decision = (h.instance_seqs[(name, total)], total, 1)
        return recorded, f"step {name!r} with {_instances(total)} ({why})", *at_decision
    return None


def _instances(n: int) -> str:
    return f"{n} instance{'' if n == 1 else 's'}"


def _code_decision(h: ExecutionState, step: StepSpec, deps: tuple[str, ...], d: Decision,
                   stopping: bool) -> tuple[str, int, str]:
    """What the code decides for ``step`` given the history before ``d``: ("skip", 0,
    why), ("start", instances, how many why) or ("fail", 1, why) (its inputs unusable: it
    fails without running, whatever the instance count)."""
    if stopping and not step.always_run:
        return "skip", 0, "the execution was stopping by then"
    if not step.always_run:
        for dep in deps:
            if h.steps[dep].status == "skipped":
                return "skip", 0, f"upstream step {dep!r} was skipped"
    upstream = d.upstream or {}

    def load(dep: str) -> Any:
        return values.load(upstream.get(dep))

    if step.when is not None:
        when: Callable[..., Any] = step.when
        try:
            if not step.when_arity:
                ok = when()
            elif len(step.depends_on) == 1:
                ok = when(load(step.depends_on[0]))
            else:
                ok = when({dep: load(dep) for dep in step.depends_on})
        except Exception as exc:
            return "fail", 1, f"its when= condition raises {exc!r}"
        if not ok:
            return "skip", 0, "its when= condition is false"
    why = "its when= condition is true" if step.when is not None else ""
    if step.dynamic:
        source = next((b.dep for b in step.bindings if b.source == "item"), None)
        items = load(source) if source is not None else None
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list):
            return "fail", 1, f"step {source!r} did not return a list"
        return "start", len(items), f"one per item of step {source!r}'s result"
    if step.parallel:
        how = (f"count={step.count}" if step.count is not None
               else f"max_workers={step.max_workers}")
        return "start", step.static_instances, how if not why else f"{why}, {how}"
    return "start", 1, why or "not parallel"
