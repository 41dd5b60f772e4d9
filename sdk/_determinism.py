"""``check_determinism``: prove a workflow survives a crash at any point of its history.

The workflow runs once against the mock runtime. Then, for every crash point k (every event
index by default), a fresh engine resumes it from the first k events, with the agents that
had started by then still "running". Each resume must end with the same outcome and the same
history (per step instance, ignoring times), and must not launch any agent twice. Agents
answer from a script of the first run, so a check does not consume ``mock_agent`` answers.

Every resume runs with other random seeds and clocks than the first run: ``random.random``,
``uuid.uuid4``, ``time.time`` and friends return other values when workflow code calls them,
while ``ctx.random()``, ``ctx.now()`` and ``ctx.uuid4()`` return what the first run drew, as a
real resume would have recorded. The resume from the first event alone is a whole second run
of every step, so a step that reads a random number or the wall clock directly records a
different result there, and the check names that step and the likely cause. Calls made
straight from a step's code are also noted, with the line, in the report.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import CodeType, FrameType
from typing import Any

import msgspec

from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.commands import StepRuntime
from agentainer_flow.engine.errors import NonDeterminismError
from agentainer_flow.engine.runtimes.base import (
    AgentOutcome,
    AgentRuntime,
    AgentSpec,
    AgentState,
    AgentStatus,
)
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.engine.spec import WorkflowSpec, get_workflow_spec
from agentainer_flow.store import (
    ExecutionRecord,
    FlowError,
    MemoryEventStore,
    NewExecution,
    StoredEvent,
)
from agentainer_flow.store.events import (
    AgentDeployRequested,
    AgentStarted,
    Event,
    ExecutionStarted,
    LogRecorded,
    MetricRecorded,
    SideEffectRecorded,
)

from ._client import WorkflowClient

__all__ = [
    "CrashPoints",
    "DeterminismReport",
    "NondeterministicCall",
    "by_instance",
    "check_determinism",
    "normalise_events",
    "store_with_prefix",
]

_TIMES = ("ts", "started_at", "finished_at", "deadline", "fire_at", "retry_at")

#: What a step probably did when it records something else on a second run, and the fix.
LIKELY_CAUSE = (
    "it probably calls random.random(), time.time(), uuid.uuid4() or reads the wall clock "
    "(datetime.now()), or depends on state outside ctx; use ctx.random(), ctx.now() and "
    "ctx.uuid4() instead, which are recorded so that a resumed run gets the same values"
)


def normalise_events(events: Iterable[Event]) -> list[dict[str, Any]]:
    """Events as dicts without what legitimately differs between runs (times, adoption)."""
    out = []
    for ev in events:
        data = msgspec.to_builtins(ev)
        for key in _TIMES:
            data.pop(key, None)
        if isinstance(ev, AgentStarted):
            data.pop("adopted", None)
        out.append(data)
    return out


def by_instance(events: Iterable[Event]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Normalised events grouped per (step, instance): concurrent instances interleave
    differently from run to run, but each instance's own sequence must not change."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for data in normalise_events(events):
        groups.setdefault((data.get("step", ""), data.get("instance", -1)), []).append(data)
    return groups


def _replayed_part(events: Iterable[Event]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """``by_instance`` without what replay never compares: the text and fields of
    ``ctx.log`` and the value of ``ctx.metric`` (a duration measured with ``time.time()``
    is observability, not a divergence)."""
    groups = by_instance(events)
    for group in groups.values():
        for data in group:
            if data.get("type") == LogRecorded.__struct_config__.tag:
                data.pop("message", None)
                data.pop("fields", None)
            elif data.get("type") == MetricRecorded.__struct_config__.tag:
                data.pop("value", None)
    return groups


async def store_with_prefix(
    record: ExecutionRecord, history: list[StoredEvent], k: int
) -> MemoryEventStore:
    """A fresh in-memory store holding only the first ``k`` events of ``history``."""
    store = MemoryEventStore()
    first = history[0].event
    assert isinstance(first, ExecutionStarted)
    await store.create_execution(
        NewExecution(id=record.id, workflow_name=record.workflow_name,
                     workflow_version=record.workflow_version, tags=record.tags),
        first)
    if k > 1:
        await store.append(record.id, 2, [s.event for s in history[1:k]])
    return store


@dataclass(frozen=True)
class CrashPoints:
    """Which prefixes of a history ``check_determinism`` resumes from, before the history's
    length is known (a hypothesis strategy draws them: ``strategies.crash_points()``).

    A crash point k means "the engine died after the k-th event was stored". ``at`` gives
    points directly (clipped to the history), ``fractions`` as positions in [0, 1] of the
    history, ``every`` every ``every``-th event from ``start`` on. ``resolve(n)`` turns them
    into sorted points in 1..n.
    """

    at: tuple[int, ...] = ()
    fractions: tuple[float, ...] = ()
    every: int | None = None
    start: int = 1

    def __post_init__(self) -> None:
        if any(k < 1 for k in self.at):
            raise ValueError(f"CrashPoints.at: crash points start at 1, got {self.at}")
        if any(not 0.0 <= f <= 1.0 for f in self.fractions):
            raise ValueError(f"CrashPoints.fractions must lie in [0, 1], got {self.fractions}")
        if self.every is not None and self.every < 1:
            raise ValueError(f"CrashPoints.every must be at least 1, got {self.every}")
        if self.start < 1:
            raise ValueError(f"CrashPoints.start must be at least 1, got {self.start}")

    def resolve(self, events: int) -> list[int]:
        """The crash points in a history of ``events`` events (1..events, sorted)."""
        if events < 1:
            return []
        points = {min(k, events) for k in self.at}
        points.update(1 + round(f * (events - 1)) for f in self.fractions)
        if self.every is not None:
            points.update(range(min(self.start, events), events + 1, self.every))
        return sorted(points)


@dataclass(frozen=True)
class NondeterministicCall:
    """A call from workflow code to a source of values that differ from run to run."""

    step: str | None  #: the step whose code made it (None: outside any step, e.g. when=)
    call: str  #: e.g. ``"random.random()"``
    where: str  #: ``file.py:line`` of the call

    def __str__(self) -> str:
        owner = f"step {self.step!r}" if self.step else "workflow code"
        return f"{owner} calls {self.call} at {self.where}"


@dataclass
class DeterminismReport:
    """What ``check_determinism`` did: the history length, the crash points resumed, and
    the calls of workflow code to ``random``/``time``/``uuid`` it saw (harmless while what
    they return is not recorded, the likely cause when a step records something else)."""

    execution_id: str
    events: int
    crash_points: list[int] = field(default_factory=list)
    outcome: str = ""
    #: whether every step ran a second time (resumed from the first event, other seeds)
    reran: bool = False
    nondeterministic_calls: list[NondeterministicCall] = field(default_factory=list)


class _ScriptedRuntime(AgentRuntime):
    """Agents that answer what they answered in the first run, counting launches."""

    name = "mock"  # stands in for the mock runtime of the first run

    def __init__(self, outcomes: Mapping[str, AgentOutcome]) -> None:
        self.outcomes = outcomes
        self.launched: list[str] = []
        self.running: set[str] = set()

    def _outcome(self, agent_id: str) -> AgentOutcome:
        outcome = self.outcomes.get(agent_id)
        if outcome is None:  # the resumed code deployed an agent the first run did not
            return AgentOutcome(exit_code=127, log_tail=f"agent {agent_id} was not deployed "
                                "by the first run, so check_determinism has no answer for it")
        return outcome

    async def launch(self, spec: AgentSpec) -> None:
        if spec.agent_id not in self.running:
            self.launched.append(spec.agent_id)
            self.running.add(spec.agent_id)

    async def lookup(self, agent_id: str) -> AgentStatus:
        if agent_id not in self.running:
            return AgentStatus(AgentState.MISSING)
        return AgentStatus(AgentState.EXITED, self._outcome(agent_id))

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        return self._outcome(agent_id)

    async def stop(self, agent_id: str) -> None:
        return None

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        return self._outcome(agent_id).log_tail

    async def remove(self, agent_id: str) -> None:
        return None


# sources of values that differ between runs -------------------------------------------------
_SIDE_EFFECT_CODE: CodeType = StepRuntime._side_effect.__code__
_SHIFT = 3 * 86400 + 0.123457  # how far the clocks of workflow code move in a resumed run
_SideEffectKey = tuple[str, int, int, int, str]  # step, instance, attempt, command, kind
_active = False
#: module functions of ``random`` that draw from its shared generator (noted when called)
_WALL_CLOCK_METHODS = ("now", "utcnow", "today")
_RANDOM_FUNCTIONS = ("randint", "randrange", "choice", "choices", "shuffle", "sample",
                     "uniform", "gauss", "getrandbits", "randbytes")


def _is_library(frame: FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith("agentainer_flow.")


class _Sources:
    """Patches ``random.random``, ``uuid.uuid4`` and the ``time`` clocks for one check.

    Each patched function looks at who calls it:

    - ``ctx.random()``/``ctx.uuid4()`` (the engine's side-effect command): the value the
      first run recorded for that command, in a resumed run (a real resume would have found
      it in the history unless the crash came first: the check must not fail for that);
    - the workflow's own code (the files of its step functions): the real value in the first
      run, another one in a resumed run (the random streams reseeded, the clocks shifted by
      three days), and the call is noted with its step and line;
    - the library itself: the real value;
    - anything else (other modules a step calls): another value in a resumed run, except for
      the monotonic clocks, which the event loop and libraries measure timeouts with.
    """

    def __init__(self, spec: WorkflowSpec) -> None:
        self.step_codes: dict[CodeType, str] = {}
        for step in spec.steps.values():
            code = getattr(inspect.unwrap(step.fn), "__code__", None)
            if isinstance(code, CodeType):
                self.step_codes[code] = step.name
        self.user_files = {code.co_filename for code in self.step_codes}
        with contextlib.suppress(TypeError, OSError):
            self.user_files.add(inspect.getfile(spec.cls))
        self.recorded: dict[_SideEffectKey, Any] = {}
        self.perturb = False
        self.rng = random.Random()
        self.notes: dict[tuple[str | None, str, str], NondeterministicCall] = {}
        self._undo: list[tuple[Any, str, Any]] = []
        self._random_state: Any = None

    # which call is this ----------------------------------------------------------------
    def ctx_key(self, frame: FrameType | None, kind: str) -> _SideEffectKey | None:
        """The command key when ``frame`` (or one of its two callers) is the engine's
        side-effect command of ``kind``, else None."""
        for _ in range(3):
            if frame is None:
                return None
            if frame.f_code is _SIDE_EFFECT_CODE:
                local = frame.f_locals
                try:
                    rt, idx, what = local["self"], local["idx"], local["kind"]
                except KeyError as exc:  # the engine's command changed shape: say so
                    raise RuntimeError(
                        f"check_determinism cannot read {exc} in StepRuntime._side_effect; "
                        "update agentainer_flow._determinism to the engine's command code"
                    ) from None
                if what != kind:
                    return None
                return (rt.step.name, rt.instance, rt.attempt, idx, what)
            frame = frame.f_back
        return None

    def replayed(self, key: _SideEffectKey) -> Any:
        """What the first run recorded for ``key`` (in a resumed run), else ``None``."""
        return self.recorded.get(key) if self.perturb else None

    def note_user_call(self, frame: FrameType, call: str) -> bool:
        """Note ``call`` if ``frame`` is the workflow's own code; whether it is."""
        if frame.f_code.co_filename not in self.user_files:
            return False
        step: str | None = None
        up: FrameType | None = frame
        while up is not None:
            step = self.step_codes.get(up.f_code)
            if step is not None:
                break
            up = up.f_back
        where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        self.notes.setdefault((step, call, where), NondeterministicCall(step, call, where))
        return True

    # patching --------------------------------------------------------------------------
    def _wrap(self, module: Any, attr: str, call: str, *, ctx_kind: str | None = None,
              shifted: Callable[..., Any] | None = None, others: bool = True) -> None:
        """Replace ``module.attr``; ``shifted(real, *args)`` gives the other value of a
        resumed run (None: the real function, whose state ``start_resumed_run`` moved)."""
        real = getattr(module, attr)
        sources = self

        def patched(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            if ctx_kind is not None:
                key = sources.ctx_key(frame, ctx_kind)
                if key is not None:
                    value = sources.replayed(key)
                    if value is None:
                        return real(*args, **kwargs)
                    return uuid.UUID(value) if ctx_kind == "uuid4" else value
            mine = sources.note_user_call(frame, call)
            if shifted is not None and sources.perturb and (
                    mine or (others and not _is_library(frame))):
                return shifted(real, *args, **kwargs)
            return real(*args, **kwargs)

        patched.__wrapped__ = real  # type: ignore[attr-defined]
        self._undo.append((module, attr, real))
        setattr(module, attr, patched)

    def __enter__(self) -> _Sources:
        global _active
        if _active:
            raise RuntimeError("check_determinism is already running in this process: run "
                               "the checks one after the other, not concurrently")
        _active = True
        self._random_state = random.getstate()
        rng = self.rng
        self._wrap(random, "random", "random.random()", ctx_kind="random",
                   shifted=lambda _real: rng.random())
        for name in _RANDOM_FUNCTIONS:  # their state is reseeded for a resumed run
            self._wrap(random, name, f"random.{name}()")
        self._wrap(uuid, "uuid4", "uuid.uuid4()", ctx_kind="uuid4",
                   shifted=lambda _real: uuid.UUID(int=rng.getrandbits(128), version=4))
        self._wrap(uuid, "uuid1", "uuid.uuid1()",
                   shifted=lambda _real, *a, **kw: uuid.UUID(int=rng.getrandbits(128),
                                                             version=1))
        self._wrap(time, "time", "time.time()", shifted=lambda real: real() + _SHIFT)
        self._wrap(time, "time_ns", "time.time_ns()",
                   shifted=lambda real: real() + int(_SHIFT * 1e9))
        # the event loop and libraries time their timeouts with these: only the
        # workflow's own calls move
        for name in ("monotonic", "perf_counter"):
            self._wrap(time, name, f"time.{name}()", shifted=lambda real: real() + _SHIFT,
                       others=False)
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        for module, attr, real in reversed(self._undo):
            setattr(module, attr, real)
        self._undo.clear()
        random.setstate(self._random_state)
        _active = False

    @contextlib.contextmanager
    def watching_the_wall_clock(self) -> Iterator[None]:
        """Note the workflow code's calls to ``datetime.now()`` and friends meanwhile.

        They are C methods that cannot be patched, so a profile hook of this thread sees
        them (only during the first run, where it costs least; not if a profiler is on)."""
        if sys.getprofile() is not None:
            yield
            return
        files = self.user_files

        def profile(frame: FrameType, event: str, arg: Any) -> None:
            if (event == "c_call" and frame.f_code.co_filename in files
                    and getattr(arg, "__name__", "") in _WALL_CLOCK_METHODS
                    and getattr(arg, "__self__", None) in (dt.datetime, dt.date)):
                owner = "date" if arg.__self__ is dt.date else "datetime"
                self.note_user_call(frame, f"{owner}.{arg.__name__}()")

        sys.setprofile(profile)
        try:
            yield
        finally:
            sys.setprofile(None)

    def start_resumed_run(self) -> None:
        """From here on, workflow code gets other random values and shifted clocks."""
        self.perturb = True
        seed = os.urandom(16)
        self.rng.seed(seed)
        random.seed(seed[::-1])  # random.randint, random.choice... of workflow code

    def calls_of(self, step: str) -> list[NondeterministicCall]:
        return [call for call in self.notes.values() if call.step == step]


class _CheckClock(VirtualClock):
    """Virtual time whose ``ctx.now()`` gives a resumed run what the first run recorded."""

    def __init__(self, sources: _Sources) -> None:
        super().__init__()
        self._sources = sources

    def now(self) -> float:
        key = self._sources.ctx_key(sys._getframe(1), "now")
        if key is not None:
            value = self._sources.replayed(key)
            if value is not None:
                return float(value)
        return super().now()


def _placeholder(name: str) -> str:
    return f"test-secret-{name}"


def _first_difference(
    again: Mapping[tuple[str, int], list[dict[str, Any]]],
    clean: Mapping[tuple[str, int], list[dict[str, Any]]],
) -> tuple[tuple[str, int], int, Any, Any] | None:
    """The first (step, instance) whose events differ, the index of the first differing
    event of that instance, and both events (``"nothing"`` where one run has fewer).

    Steps come in the order they first appear in the first run, the execution's own events
    last: the step that went another way is the news, the execution's result follows."""
    if again == clean:
        return None
    keys = list(dict.fromkeys([*clean, *again]))
    keys.sort(key=lambda key: key[0] == "")  # stable: keeps the order of first appearance
    key = next(key for key in keys if again.get(key) != clean.get(key))
    now, before = again.get(key, []), clean.get(key, [])
    i = next((i for i, (a, b) in enumerate(zip(now, before, strict=False)) if a != b),
             min(len(now), len(before)))
    return (key, i, now[i] if i < len(now) else "nothing",
            before[i] if i < len(before) else "nothing")


def _cause(sources: _Sources, step: str) -> str:
    calls = sources.calls_of(step)
    if calls:
        seen = ", ".join(f"{c.call} at {c.where}" for c in calls)
        return (f"it calls {seen}, which returns something else on every run; use "
                "ctx.random(), ctx.now() and ctx.uuid4() instead, which are recorded so that "
                "a resumed run gets the same values")
    return LIKELY_CAUSE


async def check_determinism(
    make_workflow: Callable[[], object],
    *,
    input: Any = None,
    secrets: Mapping[str, str] | None = None,
    crash_points: Iterable[int] | CrashPoints | None = None,
    registry: MockRegistry | None = None,
) -> DeterminismReport:
    """Run ``make_workflow()`` once, then resume it from a crash after each crash point.

    ``crash_points`` are event counts in 1..len(history) (default: every event but the
    last), or a ``CrashPoints`` resolved against the history. Whatever they are, the check
    also resumes from the first event alone: a second run of every step, with other random
    seeds and clocks (see the module). Agents answer from ``mock_agent`` rules
    (``registry``, the default one if not given).

    Raises ``AssertionError`` naming the crash point, the step and the first difference if a
    resumed run ends differently, records a different history, or launches an agent twice.
    When a step records something else on the second run, the message names the step and
    the likely cause: a direct call to ``random.random()``, ``time.time()``,
    ``uuid.uuid4()`` or the wall clock instead of ``ctx.random()``, ``ctx.now()``,
    ``ctx.uuid4()``.
    """
    instance = make_workflow()
    outcomes: dict[str, AgentOutcome] = {}
    mock = MockRuntime(registry)
    with _Sources(get_workflow_spec(instance)) as sources:
        async with WorkflowClient(store=MemoryEventStore(), runtime=mock,
                                  clock=_CheckClock(sources),
                                  secret_fallback=_placeholder) as client:
            with sources.watching_the_wall_clock():
                execution = await client.run_workflow(instance, input=input, secrets=secrets)
                expected = await client.engine.wait_outcome(execution.id)
            history = await client.store.load(execution.id)
            record = await client.describe(execution.id)
            for spec in mock.launches:
                status = await mock.lookup(spec.agent_id)
                assert status.outcome is not None
                outcomes[spec.agent_id] = status.outcome
        for s in history:
            ev = s.event
            if isinstance(ev, SideEffectRecorded):
                sources.recorded[(ev.step, ev.instance, ev.attempt, ev.index, ev.kind)] = (
                    ev.value)
        n = len(history)
        if isinstance(crash_points, CrashPoints):
            points = crash_points.resolve(n)
        else:
            points = list(crash_points) if crash_points is not None else list(range(1, n))
            for k in points:
                if not 1 <= k <= n:
                    raise ValueError(f"crash point {k} is outside the history (1..{n})")
        report = DeterminismReport(execution.id, n, outcome=expected.status)
        clean = _replayed_part(s.event for s in history)
        started_ids = [s.event.agent_id for s in history if isinstance(s.event, AgentStarted)]
        for k in [1, *(k for k in points if k != 1)]:
            sources.start_resumed_run()
            await _resume_and_compare(
                sources, record, history, k, outcomes, clean, started_ids, expected, secrets)
            if k == 1:
                report.reran = True
            if k in points:
                report.crash_points.append(k)
        report.nondeterministic_calls = list(sources.notes.values())
    return report


async def _resume_and_compare(
    sources: _Sources,
    record: ExecutionRecord,
    history: list[StoredEvent],
    k: int,
    outcomes: Mapping[str, AgentOutcome],
    clean: Mapping[tuple[str, int], list[dict[str, Any]]],
    started_ids: list[str],
    expected: Any,
    secrets: Mapping[str, str] | None,
) -> None:
    """Resume from the first ``k`` events of ``history`` and compare with the first run."""
    n = len(history)
    where = f"after a crash at event {k} of {n}"
    if k == 1:
        where += ", a second run of every step with other random seeds and clocks"
    runtime = _ScriptedRuntime(outcomes)
    alive = {s.event.agent_id for s in history[:k] if isinstance(s.event, AgentStarted)}
    for s in history[:k]:  # agents started before the crash are still there
        if isinstance(s.event, AgentDeployRequested) and s.event.agent_id in alive:
            runtime.running.add(s.event.agent_id)
    store = await store_with_prefix(record, history, k)
    async with WorkflowClient(store=store, runtime=runtime, clock=_CheckClock(sources),
                              secret_fallback=_placeholder) as client:
        try:
            await client.resume(record.id, secrets=secrets)
            got = await client.engine.wait_outcome(record.id)
        except NonDeterminismError as exc:
            raise AssertionError(
                f"step {exc.step!r} did something else {where}: {exc} "
                f"({_cause(sources, exc.step)})") from exc
        except FlowError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
        resumed = await client.store.load(record.id)
    difference = _first_difference(_replayed_part(s.event for s in resumed), clean)
    if difference is not None:
        (step, instance), i, now, before = difference
        if not step:
            raise AssertionError(
                f"{where}: the execution recorded {now!r} where the first run recorded "
                f"{before!r} (event {i} of the execution's own events)")
        raise AssertionError(
            f"step {step!r} recorded a different result "
            f"{'on a second run' if k == 1 else 'when resumed'} ({where}): "
            f"{_cause(sources, step)}. Step {step!r} instance {max(instance, 0)}, event {i} "
            f"of that instance: the resumed run recorded {now!r}, the first run {before!r}")
    if (got.status, got.result_tree, got.error) != (
            expected.status, expected.result_tree, expected.error):
        raise AssertionError(
            f"{where}: the execution ended {got.status} ({got.result_tree!r} "
            f"{got.error or ''}) instead of {expected.status} "
            f"({expected.result_tree!r} {expected.error or ''})")
    twice = sorted({a for a in runtime.launched if runtime.launched.count(a) > 1}
                   | {a for a in runtime.launched if a in alive})
    if twice:
        raise AssertionError(f"{where}: agents launched twice: {', '.join(twice)}")
    missing = set(started_ids) - alive - set(runtime.launched)
    if missing:
        raise AssertionError(f"{where}: agents never launched: {', '.join(sorted(missing))}")
