"""The engine's observer seam: what it tells metrics and traces about the live work it does.

An ``Observer`` hears of new work only, never of what a history already holds: an
execution recorded, a run of one starting and ending in this process, a step attempt's
body running, an agent launched and its outcome recorded, a lease taken over from another
process, a store call. Commands that return what the history recorded (an attempt catching
up after a resume) call nothing, and neither does ``flow replay`` (``replay_history``), so
counters and spans built on these calls count each piece of live work once however often a
history is replayed.

The engine knows no metrics library and no tracer: ``agentainer_flow._metrics``
(Prometheus) and ``agentainer_flow._otel`` (OpenTelemetry) subclass ``Observer``. An engine
gets its observer at construction (``Engine(observer=...)``, else ``default_observer()``).
Observers are called synchronously on the engine's loop, so they must be quick; one that
raises is logged and skipped (see ``combine``), it never breaks an execution. What they are
given holds names, counts and times, never inputs, results, error messages or secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.errors import AppendConflictError, LeaseLostError, StoreError

from .errors import ExecutionBlockedError, ExecutionSuspended, NonDeterminismError

__all__ = [
    "NOOP",
    "RUN_ENDINGS",
    "AttemptRef",
    "Observer",
    "attempt_outcome",
    "combine",
    "default_observer",
    "default_observer_as",
    "run_stop_reason",
    "set_default_observer",
]

log = get_logger("agentainer_flow")

#: how a run ends when it ends the execution (``Observer.run_finished``)
RUN_ENDINGS = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True, slots=True)
class AttemptRef:
    """One attempt of one step instance of one execution."""

    execution_id: str
    workflow: str
    step: str
    instance: int
    attempt: int


class Observer:
    """Hears of the live work of an engine; every method does nothing here.

    Subclass it and override what you need. Outcomes are short lower-case words, listed
    with each method; times are seconds.
    """

    def execution_started(self, execution_id: str, workflow: str, *, queue: str) -> None:
        """A new execution was recorded (not one an idempotency key found again)."""

    def run_started(self, execution_id: str, workflow: str, *, resumed: bool) -> None:
        """This process starts running the execution (``resumed``: its history holds
        progress made before, here or elsewhere)."""

    def run_finished(self, execution_id: str, workflow: str, *, outcome: str,
                     duration: float | None) -> None:
        """This process stops running the execution.

        ``outcome`` is ``completed``, ``failed`` or ``cancelled`` when the run recorded the
        execution's end (``duration``: from its start to its end, as recorded); otherwise
        the run stopped and the execution goes on elsewhere or later (``duration`` is
        ``None``): ``suspended`` (asleep until a timer), ``handed_back`` (a worker
        stopping), ``blocked`` (a missing secret), ``lease_lost``, ``diverged``
        (non-determinism), ``store_error``, ``stopped`` (shut down) or ``error``.
        """

    def step_attempt_started(self, attempt: AttemptRef, *, resumed: bool) -> None:
        """An attempt's body starts running in this process. ``resumed``: the attempt
        was started by an earlier run, which stopped before its outcome; this one runs
        its body again, its recorded commands returning what they recorded."""

    def step_attempt_finished(self, attempt: AttemptRef, *, outcome: str, seconds: float,
                              error_type: str | None = None) -> None:
        """An attempt's body stopped running here, after ``seconds``.

        ``completed``, ``failed`` (``error_type`` names the exception's class) and
        ``cancelled`` are recorded as the attempt's outcome; ``blocked`` (a missing
        secret), ``interrupted`` (suspended, handed back or shut down) and ``aborted``
        (lease lost, store down, diverged) are not: the attempt runs again later.
        """

    def agent_launched(self, attempt: AttemptRef, *, agent: str, image: str,
                       agent_id: str) -> None:
        """An agent was launched (once per ``deploy_agent`` command: an agent adopted
        after a crash was launched before and is not reported again)."""

    def agent_finished(self, attempt: AttemptRef, *, agent: str, image: str, agent_id: str,
                       outcome: str, exit_code: int | None, started_at: float | None,
                       finished_at: float | None) -> None:
        """An agent's outcome was recorded: ``completed``, ``failed``, ``timed_out``,
        ``lost`` or ``launch_failed``; ``started_at``/``finished_at`` are the runtime's
        wall-clock times of the agent, when it knows them."""

    def lease_taken_over(self, execution_id: str, workflow: str, *,
                         previous_holder: str) -> None:
        """This process took the lease of an execution another process held (dead, or
        its lease expired, or ``takeover=True``)."""

    def store_call(self, op: str, seconds: float, *, ok: bool) -> None:
        """A call of the store (``append``, ``load``, ``claim``, ``renew_lease``) took
        ``seconds``; ``ok`` is False when it raised."""

    def time_store(self, op: str) -> contextlib.AbstractContextManager[None]:
        """A context manager that reports how long its body (one store call) took."""
        return _StoreTimer(self, op)


class _StoreTimer:
    __slots__ = ("_observer", "_op", "_t0")

    def __init__(self, observer: Observer, op: str) -> None:
        self._observer = observer
        self._op = op
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._observer.store_call(self._op, time.perf_counter() - self._t0,
                                  ok=kind is None)


class _Nothing(Observer):
    """The observer of an engine nobody observes: not even a clock is read."""

    def time_store(self, op: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def __repr__(self) -> str:
        return "NOOP"


#: the observer that does nothing (the default)
NOOP: Observer = _Nothing()


class _Group(Observer):
    """Several observers as one; a call that raises is logged and the others still run."""

    def __init__(self, members: tuple[Observer, ...]) -> None:
        self.members = members

    def _each(self, call: str, *args: Any, **kwargs: Any) -> None:
        for member in self.members:
            try:
                getattr(member, call)(*args, **kwargs)
            except Exception as exc:  # an observer never breaks an execution
                log.warning("observer_failed", observer=type(member).__name__, call=call,
                            error_type=type(exc).__name__, error=str(exc))

    def execution_started(self, execution_id: str, workflow: str, *, queue: str) -> None:
        self._each("execution_started", execution_id, workflow, queue=queue)

    def run_started(self, execution_id: str, workflow: str, *, resumed: bool) -> None:
        self._each("run_started", execution_id, workflow, resumed=resumed)

    def run_finished(self, execution_id: str, workflow: str, *, outcome: str,
                     duration: float | None) -> None:
        self._each("run_finished", execution_id, workflow, outcome=outcome,
                   duration=duration)

    def step_attempt_started(self, attempt: AttemptRef, *, resumed: bool) -> None:
        self._each("step_attempt_started", attempt, resumed=resumed)

    def step_attempt_finished(self, attempt: AttemptRef, *, outcome: str, seconds: float,
                              error_type: str | None = None) -> None:
        self._each("step_attempt_finished", attempt, outcome=outcome, seconds=seconds,
                   error_type=error_type)

    def agent_launched(self, attempt: AttemptRef, *, agent: str, image: str,
                       agent_id: str) -> None:
        self._each("agent_launched", attempt, agent=agent, image=image, agent_id=agent_id)

    def agent_finished(self, attempt: AttemptRef, *, agent: str, image: str, agent_id: str,
                       outcome: str, exit_code: int | None, started_at: float | None,
                       finished_at: float | None) -> None:
        self._each("agent_finished", attempt, agent=agent, image=image, agent_id=agent_id,
                   outcome=outcome, exit_code=exit_code, started_at=started_at,
                   finished_at=finished_at)

    def lease_taken_over(self, execution_id: str, workflow: str, *,
                         previous_holder: str) -> None:
        self._each("lease_taken_over", execution_id, workflow,
                   previous_holder=previous_holder)

    def store_call(self, op: str, seconds: float, *, ok: bool) -> None:
        self._each("store_call", op, seconds, ok=ok)

    def __repr__(self) -> str:
        return f"combine({', '.join(map(repr, self.members))})"


def combine(*observers: Observer | None) -> Observer:
    """One observer that calls each of ``observers`` in turn (``None`` and ``NOOP`` are
    left out; groups are flattened). A member that raises is logged
    (``observer_failed``) and the others still hear of the work."""
    members: list[Observer] = []
    for obs in observers:
        if obs is None or obs is NOOP:
            continue
        for member in obs.members if isinstance(obs, _Group) else (obs,):
            if member not in members:
                members.append(member)
    return _Group(tuple(members)) if members else NOOP


_default: Observer = NOOP


def default_observer() -> Observer:
    """The observer of engines made without one (``NOOP`` unless set)."""
    return _default


def set_default_observer(observer: Observer | None) -> None:
    """Make ``observer`` (``None``: none) the observer of every engine made from now on
    without one of its own, e.g. a ``TracingObserver`` for a whole process. Engines that
    exist keep theirs."""
    global _default
    _default = combine(observer)


@contextlib.contextmanager
def default_observer_as(observer: Observer | None) -> Iterator[None]:
    """``set_default_observer`` for the ``with`` block only (tests)."""
    before = _default
    set_default_observer(observer)
    try:
        yield
    finally:
        set_default_observer(before)


def run_stop_reason(exc: BaseException) -> str:
    """Why a run stopped without recording the execution's end (see ``run_finished``)."""
    if isinstance(exc, ExecutionSuspended):
        return "handed_back" if exc.wake_at is None else "suspended"
    if isinstance(exc, ExecutionBlockedError):
        return "blocked"
    if isinstance(exc, NonDeterminismError):
        return "diverged"
    if isinstance(exc, LeaseLostError | AppendConflictError):
        return "lease_lost"
    if isinstance(exc, StoreError):
        return "store_error"
    if isinstance(exc, asyncio.CancelledError):
        return "stopped"
    return "error"


def attempt_outcome(result: tuple[str, Any]) -> tuple[str, str | None]:
    """``(outcome, error_type)`` of an attempt body that returned the runner's
    ``("ok", tree)``, ``("error", exception)`` or ``("blocked", secret)``."""
    kind, value = result
    if kind == "ok":
        return "completed", None
    if kind == "error":
        return "failed", type(value).__name__
    return "blocked", None
