"""Check a stored history against the current code, with no side effects.

First the shape of the DAG the history fixes is compared with the code's
(``shape_divergence``: steps, dependencies, instance counts, ``when=`` decisions). Then every
recorded step attempt is run again in strict replay: each ``ctx`` command must match the
recorded one, every argument compared, and the attempt must end the way it was recorded.
Nothing is launched, appended or slept: a command past the recorded ones ends the check of
that attempt (it was in flight when the history ended). The first difference in history
order is reported, with the seq of its event. Used by ``flow replay`` and by golden-history
tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from agentainer_flow.store.base import ExecutionRecord, StoredEvent
from agentainer_flow.store.events import (
    Event,
    ExecutionStarted,
    StateSet,
    StepCompleted,
    StepFailed,
    StepStarted,
)

from . import values
from .clock import Clock
from .commands import StepRuntime
from .engine import Engine
from .errors import EngineSignal, NonDeterminismError
from .history import shape_divergence
from .runner import Runner
from .runtimes.base import AgentOutcome, AgentRuntime, AgentSpec, AgentStatus
from .spec import WorkflowSpec

__all__ = ["ReplayReport", "replay_history"]


class _ReplayEnd(EngineSignal):
    """The code went past what the history recorded."""


def _stop(*_: Any) -> NoReturn:
    raise _ReplayEnd()


class _NoRuntime(AgentRuntime):
    """A runtime that refuses everything: replay must not touch the world."""

    name = "replay"

    async def launch(self, spec: AgentSpec) -> None:
        _stop()

    async def lookup(self, agent_id: str) -> AgentStatus:
        _stop()

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        _stop()

    async def stop(self, agent_id: str) -> None:
        _stop()

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        return ""

    async def remove(self, agent_id: str) -> None:
        return None


class _ReplayClock(Clock):
    """Time stands still: a timer that has not fired in the history ends the check."""

    async def sleep_until(self, deadline: float) -> None:
        _stop()


class _ReplayRunner(Runner):
    def emit(self, event: Event) -> Any:
        _stop()

    async def flush(self, **_: Any) -> None:
        _stop()


@dataclass
class ReplayReport:
    """What a replay found: ``ok``, the attempts checked (``in_flight``: those the history
    ended in the middle of, as ``step[instance]#attempt``), and the first divergence
    (``error``, whose ``seq`` is the event where the code diverged)."""

    execution_id: str
    workflow_name: str
    attempts_checked: int = 0
    in_flight: list[str] = field(default_factory=list)
    error: NonDeterminismError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def replay_history(
    spec: WorkflowSpec,
    workflow: object,
    record: ExecutionRecord,
    history: list[StoredEvent],
    *,
    context_factory: Any = None,
) -> ReplayReport:
    """Re-run every recorded step attempt of ``history`` against ``spec``'s code."""
    from agentainer_flow.store.memory import MemoryEventStore

    engine = Engine(MemoryEventStore(), _NoRuntime(), clock=_ReplayClock(),
                    context_factory=context_factory, secret_fallback=lambda n: f"[secret:{n}]")
    report = ReplayReport(record.id, spec.name)
    started = history[0].event
    assert isinstance(started, ExecutionStarted)
    runner = _ReplayRunner(engine, record, spec, workflow, history, {})
    # a difference in the DAG comes first if it is earlier in the history: the attempts
    # after it may not even be runnable by the new code (an instance it does not have)
    shape = shape_divergence(runner.h)
    if runner.h.unknown_steps:  # a step the code lacks: nothing else is worth comparing
        report.error = shape
        return report
    outcomes: dict[tuple[str, int, int], StoredEvent] = {}
    for stored in history:
        ev = stored.event
        if isinstance(ev, StepCompleted | StepFailed):
            outcomes[(ev.step, ev.instance, ev.attempt)] = stored
    state: dict[str, Any] = {}
    found = shape
    found_at = shape.seq if shape is not None and shape.seq is not None else None
    for stored in history:
        ev = stored.event
        if found_at is not None and stored.seq >= found_at:
            break  # what starts after the first difference found cannot come before it
        if isinstance(ev, StateSet) and not ev.deleted:
            state[ev.key] = ev.value
        elif isinstance(ev, StateSet):
            state.pop(ev.key, None)
        if not isinstance(ev, StepStarted) or ev.total == 0:
            continue
        key = (ev.step, ev.instance, ev.attempt)
        result = await _check_attempt(runner, spec, ev, dict(state), outcomes.get(key))
        report.attempts_checked += 1
        if result == "in_flight":
            report.in_flight.append(f"{ev.step}[{ev.instance}]#{ev.attempt}")
        elif isinstance(result, NonDeterminismError):
            runner._fatal = None  # the attempts that started before it are checked still
            # concurrent attempts interleave: one that started later may diverge earlier
            at = result.seq if result.seq is not None else stored.seq
            if found_at is None or at < found_at:
                found, found_at = result, at
    report.error = found
    return report


async def _check_attempt(
    runner: Runner, spec: WorkflowSpec, ev: StepStarted, snapshot: dict[str, Any],
    stored_outcome: StoredEvent | None,
) -> NonDeterminismError | str | None:
    step = spec.steps[ev.step]
    kwargs, item = runner.arguments(step, ev.instance)
    rt = StepRuntime(runner, step, ev.instance, ev.total, ev.attempt, item, snapshot)
    ctx = runner.engine.context_factory(rt)
    outcome_now = "completed"
    detail = ""
    try:
        result = await step.fn(runner.workflow, ctx, **kwargs)
        rt.check_finished()
        # as the runner does: a result that cannot be stored failed the attempt
        values.dump(result, where=f"result of step {step.name!r}",
                    secrets=runner.redactor.scanner)
    except _ReplayEnd:
        return "in_flight"
    except NonDeterminismError as exc:
        return exc
    except Exception as exc:
        outcome_now, detail = "failed", f"{type(exc).__name__}: {exc}"
    if runner._fatal is not None and isinstance(runner._fatal, NonDeterminismError):
        return runner._fatal
    if stored_outcome is None:
        return "in_flight"
    outcome = stored_outcome.event
    recorded = "completed" if isinstance(outcome, StepCompleted) else "failed"
    if recorded != outcome_now:
        return NonDeterminismError(
            execution_id=runner.execution_id, step=ev.step, instance=ev.instance,
            attempt=ev.attempt, index=None, seq=stored_outcome.seq,
            recorded=f"the step {recorded}"
            + (f" ({outcome.error_type}: {outcome.error})" if isinstance(outcome, StepFailed)
               else ""),
            actual=f"the step {outcome_now}" + (f" ({detail})" if detail else ""))
    return None
