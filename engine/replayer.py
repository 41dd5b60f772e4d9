"""Check a stored history against the current code, with no side effects.

Every recorded step attempt is run again in strict replay: each ``ctx`` command must match
the recorded one, and the attempt must end the way it was recorded. Nothing is launched,
appended or slept: a command past the recorded ones ends the check of that attempt (it was
in flight when the history ended). Used by ``flow replay`` and by golden-history tests.
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

from .clock import Clock
from .commands import StepRuntime
from .engine import Engine
from .errors import EngineSignal, NonDeterminismError
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
    """What a replay found: ``ok``, the attempts checked, and the first divergence."""

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
    for name in dict.fromkeys(getattr(s.event, "step", None) for s in history):
        if name is not None and name not in spec.steps:
            report.error = NonDeterminismError(
                execution_id=record.id, step=name, instance=0, attempt=0, index=0,
                recorded=f"step {name!r}",
                actual=f"no step of that name (steps now: {', '.join(spec.order)})")
            return report
    runner = _ReplayRunner(engine, record, spec, workflow, history, {})
    outcomes: dict[tuple[str, int, int], Event] = {}
    for stored in history:
        ev = stored.event
        if isinstance(ev, StepCompleted | StepFailed):
            outcomes[(ev.step, ev.instance, ev.attempt)] = ev
    state: dict[str, Any] = {}
    for stored in history:
        ev = stored.event
        if isinstance(ev, StateSet) and not ev.deleted:
            state[ev.key] = ev.value
        elif isinstance(ev, StateSet):
            state.pop(ev.key, None)
        if not isinstance(ev, StepStarted) or ev.total == 0:
            continue
        key = (ev.step, ev.instance, ev.attempt)
        found = await _check_attempt(runner, spec, ev, dict(state), outcomes.get(key))
        report.attempts_checked += 1
        if found == "in_flight":
            report.in_flight.append(f"{ev.step}[{ev.instance}]#{ev.attempt}")
        elif isinstance(found, NonDeterminismError):
            report.error = found
            return report
    return report


async def _check_attempt(
    runner: Runner, spec: WorkflowSpec, ev: StepStarted, snapshot: dict[str, Any],
    outcome: Event | None,
) -> NonDeterminismError | str | None:
    step = spec.steps[ev.step]
    kwargs, item = runner.arguments(step, ev.instance)
    rt = StepRuntime(runner, step, ev.instance, ev.total, ev.attempt, item, snapshot)
    ctx = runner.engine.context_factory(rt)
    outcome_now = "completed"
    detail = ""
    try:
        await step.fn(runner.workflow, ctx, **kwargs)
        rt.check_finished()
    except _ReplayEnd:
        return "in_flight"
    except NonDeterminismError as exc:
        return exc
    except Exception as exc:
        outcome_now, detail = "failed", f"{type(exc).__name__}: {exc}"
    if runner._fatal is not None and isinstance(runner._fatal, NonDeterminismError):
        return runner._fatal
    if outcome is None:
        return "in_flight"
    recorded = "completed" if isinstance(outcome, StepCompleted) else "failed"
    if recorded != outcome_now:
        return NonDeterminismError(
            execution_id=runner.execution_id, step=ev.step, instance=ev.instance,
            attempt=ev.attempt, index=rt._index,
            recorded=f"the step {recorded}"
            + (f" ({outcome.error_type}: {outcome.error})" if isinstance(outcome, StepFailed)
               else ""),
            actual=f"the step {outcome_now}" + (f" ({detail})" if detail else ""))
    return None
