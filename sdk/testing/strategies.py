"""Hypothesis strategies for property tests of workflows: where to crash, what agents
answer, and whole generated workflows.

This module needs hypothesis (``pip install 'agentainer-flow[testing]'``); the rest of
``agentainer_flow.testing`` does not.

- ``crash_points()``: where ``check_determinism`` crashes and resumes a history;
- ``agent_results()``: the JSON objects an agent may report, hostile ones included (NUL
  characters, astral and combining characters, the engine's own ``"__flow__"`` key, integers
  past 64 bits, nesting down to the engine's limit); ``agent_results(refused=True)`` draws
  outputs the engine must refuse instead (a lone surrogate, nesting past the limit);
- ``agent_failures()``: exit codes and error text of agents that fail;
- ``workflow_dags()``: whole ``@workflow`` classes built at run time, with random
  ``depends_on``, parallel counts, dynamic fan-out, ``when=`` conditions, retries, failures
  handled with ``ErrorHandler.CONTINUE`` and durable sleeps; their agents answer from
  ``mock_agent`` rules, registered in the default registry when drawn and given alone by
  ``.registry()``.

A property test of your own workflow (here the README quickstart's ``Report``), crashed at
drawn points while its agent answers drawn results::

    import asyncio

    from hypothesis import given, settings
    from agentainer_flow.testing import MockRegistry, check_determinism, mock_agent
    from agentainer_flow.testing.strategies import agent_results, crash_points

    @settings(max_examples=50, deadline=None)
    @given(output=agent_results(), crash=crash_points())
    def test_report_survives_any_crash(output, crash):
        agents = MockRegistry()
        mock_agent("researcher", registry=agents).returns(output)
        report = asyncio.run(check_determinism(
            lambda: Report("topic"), crash_points=crash, registry=agents))
        assert report.outcome == "completed"

And of the engine itself, on generated workflows::

    @given(dag=workflow_dags(), crash=crash_points())
    def test_generated_workflows_resume_identically(dag, crash):
        report = asyncio.run(check_determinism(dag, crash_points=crash))
        assert report.outcome == "completed"
"""

from __future__ import annotations

import inspect
import itertools
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

try:
    from hypothesis import strategies as st
except ModuleNotFoundError as exc:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "agentainer_flow.testing.strategies needs hypothesis: "
        "pip install 'agentainer-flow[testing]' (or hypothesis>=6.100)",
        name=exc.name,
    ) from exc

from agentainer_flow._context import Context
from agentainer_flow._decorators import step, workflow
from agentainer_flow._determinism import CrashPoints
from agentainer_flow.engine import values
from agentainer_flow.engine.runtimes.mock import MockAgent, MockCall, MockRegistry
from agentainer_flow.engine.spec import ErrorHandler, RetryPolicy

__all__ = [
    "MAX_DEPTH",
    "STEP_KINDS",
    "AgentFailure",
    "CrashPoints",
    "GeneratedStep",
    "GeneratedWorkflow",
    "agent_failures",
    "agent_results",
    "crash_points",
    "json_values",
    "workflow_dags",
]

#: The deepest nesting (containers inside containers) the engine stores.
MAX_DEPTH = values.MAX_DEPTH

#: What a generated step does (see ``GeneratedStep``).
STEP_KINDS = ("plain", "flaky", "skipped", "conditional", "failing", "sleeping")


# crash points -------------------------------------------------------------------------------
def crash_points(
    *, events: int | None = None, max_points: int = 3, max_every: int = 8
) -> st.SearchStrategy[CrashPoints]:
    """Crash points for ``check_determinism(..., crash_points=...)``.

    Without ``events`` the history's length is not known yet: points are drawn as
    positions in it (fractions in [0, 1]) or as "every k-th event from the s-th on"
    (k up to ``max_every``), and resolved once the first run has recorded it. With
    ``events`` (a history's length) they are event counts in 1..events, or every k-th event.
    Shrinks towards a single crash right after the first event.
    """
    if max_points < 1 or max_every < 1:
        raise ValueError("crash_points: max_points and max_every must be at least 1")
    if events is not None:
        if events < 1:
            raise ValueError(f"crash_points: a history has at least 1 event, got {events}")
        at = st.lists(st.integers(1, events), min_size=1, max_size=max_points, unique=True)
        top = min(events, max_every)
        return st.one_of(
            at.map(lambda ks: CrashPoints(at=tuple(sorted(ks)))),
            _every(top),
        )
    fractions = st.lists(st.floats(0.0, 1.0), min_size=1, max_size=max_points)
    return st.one_of(fractions.map(lambda fs: CrashPoints(fractions=tuple(sorted(fs)))),
                     _every(max_every))


def _every(top: int) -> st.SearchStrategy[CrashPoints]:
    return st.integers(1, top).flatmap(
        lambda k: st.integers(1, k).map(lambda start: CrashPoints(every=k, start=start)))


# values -------------------------------------------------------------------------------------
_HOSTILE_TEXT = (
    "",
    "\x00",
    "NUL\x00inside",
    "\U0001f600 emoji",
    "e\u0301 combining",
    "\u202eright-to-left",
    "\ufeffBOM",
    "\\ud83d (escaped text, not a surrogate)",
    "__flow__",
    '{"__flow__": "tuple"}',
    "line\nbreak\r\n",
    "x" * 300,
)
_HOSTILE_KEYS = ("", "__flow__", "\x00", "type", "items", "v", "$", "a.b", "\U0001f600", " ")
_HOSTILE_INTS = (0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1,
                 10**40, -(10**40))
_LONE_SURROGATES = ("\ud83d", "\udc00", "\udfff")
_NO_SURROGATES = st.characters(exclude_categories=["Cs"])


def _text(refused: bool = False) -> st.SearchStrategy[str]:
    storable = st.one_of(
        st.sampled_from(_HOSTILE_TEXT),
        st.text(_NO_SURROGATES, max_size=40),
    )
    if not refused:
        return storable
    # a lone surrogate somewhere in otherwise storable text
    return st.tuples(storable, st.sampled_from(_LONE_SURROGATES), storable).map("".join)


def _keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(_HOSTILE_KEYS),
                     st.text(_NO_SURROGATES, max_size=12))


def _leaves() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(_HOSTILE_INTS),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        _text(),
    )


def _nest(value: Any, depth: int, keys: Iterable[str]) -> Any:
    """``value`` inside ``depth`` containers, lists and dicts taking turns."""
    names = itertools.cycle(list(keys) or ["k"])
    for level in range(depth):
        value = [value] if level % 2 else {next(names): value}
    return value


def json_values(*, max_leaves: int = 12, max_depth: int = 32) -> st.SearchStrategy[Any]:
    """JSON-like values the engine stores and reads back exactly: ``None``, booleans,
    integers of any size, finite floats, text (without lone surrogates), and lists and dicts
    of them, some nested up to ``max_depth`` containers deep (at most ``MAX_DEPTH``)."""
    if not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"json_values: max_depth must be in 1..{MAX_DEPTH}, got {max_depth}")
    leaves = _leaves()
    keys = _keys()
    nested = st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(keys, inner, max_size=4)),
        max_leaves=max_leaves,
    ).filter(lambda v: _depth(v) <= max_depth)
    deep = st.builds(_nest, leaves, st.integers(1, max_depth), st.lists(keys, max_size=3))
    return st.one_of(nested, deep)


def _depth(value: Any) -> int:
    """Containers along the deepest path of ``value`` (0 for a scalar)."""
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def agent_results(
    *, max_keys: int = 6, max_depth: int = 32, refused: bool = False
) -> st.SearchStrategy[dict[str, Any]]:
    """JSON objects an agent may report as its output (``mock_agent(...).returns(output)``).

    By default every one is an output the engine stores and gives back exactly, hostile
    ones included: NUL characters, emoji, combining and right-to-left characters, the
    engine's own envelope key ``"__flow__"``, integers beyond 64 bits, floats at the edges of
    their range, and nesting up to ``max_depth`` containers counting the object itself
    (``max_depth=MAX_DEPTH`` reaches the engine's limit; a step that wraps such an output in
    another container cannot store it). Outputs are finite: real agents print JSON, which
    has no NaN or infinity.

    With ``refused=True`` every output holds one thing the engine must refuse, a lone
    surrogate (half of a UTF-16 pair, as a cut emoji leaves it) in a value or a key, or
    nesting a few levels past ``MAX_DEPTH``: ``wait_for_completion()`` raises
    ``SerializationError`` for them, which a test of a step's error handling can use.
    """
    if not 1 <= max_depth <= MAX_DEPTH:
        raise ValueError(f"agent_results: max_depth must be in 1..{MAX_DEPTH}, "
                         f"got {max_depth}")
    inner = json_values(max_depth=max_depth - 1) if max_depth > 1 else _leaves()
    storable = st.dictionaries(_keys(), inner, max_size=max_keys)
    if not refused:
        return storable
    bad_value = st.builds(_nest, _text(refused=True), st.integers(0, 4), st.lists(_keys()))
    too_deep = st.builds(_nest, _leaves(), st.integers(MAX_DEPTH, MAX_DEPTH + 4),
                         st.lists(_keys(), max_size=2))
    bad_key = _text(refused=True)
    return st.one_of(
        st.tuples(storable, _keys(), st.one_of(bad_value, too_deep)).map(
            lambda t: {**t[0], t[1]: t[2]}),
        st.tuples(storable, bad_key, inner).map(lambda t: {**t[0], t[1]: t[2]}),
    )


@dataclass(frozen=True)
class AgentFailure:
    """How a failing agent ends: its exit code (never 0) and the error it printed."""

    exit_code: int
    error: str

    def apply(self, mock: MockAgent, *, times: int | None = None) -> MockAgent:
        """Make ``mock`` fail this way (the next ``times`` calls, or from now on)."""
        return mock.fails(self.error, exit_code=self.exit_code, times=times)


_EXIT_CODES = (1, 2, 126, 127, 134, 137, 139, 143, 255)


def agent_failures(*, hostile: bool = True) -> st.SearchStrategy[AgentFailure]:
    """Agent failures: exit codes (the usual ones: 1, 2, 126, 127, killed 137, segfault
    139, terminated 143..., or any in 1..255) and error text. With ``hostile`` (the default)
    the text may hold what the engine must clean before it stores a log tail: NUL
    characters and lone surrogates, as a process cut short prints them."""
    code = st.one_of(st.sampled_from(_EXIT_CODES), st.integers(1, 255))
    text = st.one_of(
        st.sampled_from(["", "killed", "Traceback (most recent call last):\n  ...\n"
                         "RuntimeError: boom"]),
        _text(refused=hostile) if hostile else _text(),
        st.text(max_size=200) if hostile else st.text(
            _NO_SURROGATES, max_size=200),
    )
    return st.builds(AgentFailure, code, text)


# generated workflows ------------------------------------------------------------------------
@dataclass(frozen=True)
class GeneratedStep:
    """One step of a generated workflow.

    Every instance deploys one agent (``<workflow>-<step>-<instance>``), keeps its output in
    ``ctx.state["<step>-<instance>"]``, logs a line and returns its agent's ``"v"`` plus the
    integers of what its dependencies returned. By ``kind``:

    - ``plain``: just that;
    - ``flaky``: its first attempt raises, the retry (after a 1 minute backoff) succeeds;
    - ``skipped``: ``when=`` is false, so it and what depends on it are skipped;
    - ``conditional``: ``when=`` runs only if its dependencies' integers add up to an even
      number;
    - ``failing``: its agent fails (``failure``); ``ErrorHandler.CONTINUE`` gives its
      dependants ``None``;
    - ``sleeping``: sleeps 5 minutes durably and records ``ctx.now()``, ``ctx.random()`` and
      ``ctx.uuid4()`` in the state first.

    ``count`` makes it a static parallel step of that many instances; ``dynamic`` one
    instance per item of its first dependency's list. Instance i's agent reports
    ``{"v": value + i, "extra": extra}``.
    """

    name: str
    depends_on: tuple[str, ...] = ()
    kind: str = "plain"
    count: int | None = None
    dynamic: bool = False
    value: int = 0
    failure: AgentFailure | None = None
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __str__(self) -> str:
        deps = f" <- {','.join(self.depends_on)}" if self.depends_on else ""
        fan = f" x{self.count}" if self.count else (" dynamic" if self.dynamic else "")
        return f"{self.name}{deps}{fan} {self.kind}"


_generated = itertools.count(1)
_IMAGE = "generated:1"


class _GeneratedMeta(type):
    """Gives a generated workflow class a repr that shows its shape (hypothesis prints it
    when it reports a falsifying example)."""

    def __repr__(cls) -> str:
        steps: tuple[GeneratedStep, ...] = getattr(cls, "dag_steps", ())
        if not steps:
            return super().__repr__()
        return f"<generated workflow {cls.__name__}: {'; '.join(map(str, steps))}>"


class GeneratedWorkflow(metaclass=_GeneratedMeta):
    """The base class of the ``@workflow`` classes ``workflow_dags()`` draws.

    A drawn class is an ordinary workflow: ``cls()`` makes an instance (the constructor
    takes no arguments), ``check_determinism(cls)`` and ``client.run_workflow(cls())`` run
    it. ``dag_steps`` is the shape it was built from. Its agents answer from ``mock_agent``
    rules: drawing it registers them in the default registry (the one ``WorkflowTestCase``,
    ``test_client()`` and ``check_determinism`` use unless given another), and
    ``registry()`` gives a registry holding only them.
    """

    #: the steps the class was built from, in definition order
    dag_steps: ClassVar[tuple[GeneratedStep, ...]] = ()

    @classmethod
    def agent_name(cls, step: str, instance: int) -> str:
        """The name under which an instance of ``step`` deploys its agent."""
        return f"{cls.__name__}-{step}-{instance}"

    @classmethod
    def mock_agents(cls, registry: MockRegistry | None = None) -> list[MockAgent]:
        """Register the rules that answer this workflow's agents in ``registry`` (the
        default one if not given), and return them."""
        rules = []
        for s in cls.dag_steps:
            rule = MockAgent(f"{cls.__name__}-{s.name}-*", registry)
            if s.failure is not None:
                s.failure.apply(rule)
            else:
                rule.returns(_answer(s))
            rules.append(rule)
        return rules

    @classmethod
    def registry(cls) -> MockRegistry:
        """A new registry holding only this workflow's rules."""
        registry = MockRegistry()
        cls.mock_agents(registry)
        return registry


def _answer(s: GeneratedStep) -> Callable[[MockCall], dict[str, Any]]:
    def answer(call: MockCall) -> dict[str, Any]:
        instance = int(call.name.rsplit("-", 1)[1])
        return {"v": s.value + instance, "extra": s.extra}

    return answer


def _integers(value: Any) -> int:
    """The sum of the integers in ``value`` (lists and dicts searched, booleans not)."""
    if isinstance(value, bool) or value is None:
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return sum(map(_integers, value.values()))
    if isinstance(value, list | tuple):
        return sum(map(_integers, value))
    return 0


def _body(s: GeneratedStep, workflow_name: str) -> Callable[..., Any]:
    async def body(self: object, ctx: Context, **inputs: Any) -> int:
        instance = ctx.parallel_context.index if ctx.parallel_context is not None else 0
        if s.kind == "flaky" and ctx.attempt == 1:
            raise RuntimeError(f"{s.name}: the first attempt fails on purpose")
        if s.kind == "sleeping":
            await ctx.sleep("5m")
            ctx.state[f"{s.name}-{instance}-drawn"] = [
                ctx.now().isoformat(), ctx.random(), str(ctx.uuid4())]
        agent = await ctx.deploy_agent(f"{workflow_name}-{s.name}-{instance}", _IMAGE,
                                       env={"STEP": s.name})
        output = (await agent.wait_for_completion()).output
        ctx.state[f"{s.name}-{instance}"] = output
        await ctx.log(f"{s.name}[{instance}] done", v=output["v"])
        total: int = output["v"] + _integers(list(inputs.values()))
        return total

    params = [inspect.Parameter(p, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for p in ("self", "ctx", *(f"{d}_result" for d in s.depends_on))]
    if s.dynamic:  # the engine gives a dynamic instance its item through a free parameter
        params.append(inspect.Parameter("item", inspect.Parameter.POSITIONAL_OR_KEYWORD))
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    body.__name__ = s.name
    body.__qualname__ = f"{workflow_name}.{s.name}"
    return body


def _never() -> bool:
    return False


def _even(upstream: Any) -> bool:
    return _integers(upstream) % 2 == 0


def _build(name: str, steps: Sequence[GeneratedStep]) -> type[GeneratedWorkflow]:
    attrs: dict[str, Any] = {"__doc__": f"A generated workflow: {'; '.join(map(str, steps))}",
                             "dag_steps": tuple(steps), "__module__": __name__}
    for s in steps:
        options: dict[str, Any] = {"depends_on": list(s.depends_on)}
        if s.kind == "flaky":
            options["retry_policy"] = RetryPolicy(max_attempts=2, initial_delay="1m")
        elif s.kind == "skipped":
            options["when"] = _never
        elif s.kind == "conditional":
            options["when"] = _even
        elif s.kind == "failing":
            options["retry_policy"] = RetryPolicy(max_attempts=1)
            options["error_handler"] = ErrorHandler.CONTINUE
        if s.count:
            options.update(parallel=True, count=s.count)
        elif s.dynamic:
            options.update(parallel=True, dynamic=True)
        attrs[s.name] = step(**options)(_body(s, name))
    cls: type[GeneratedWorkflow] = types.new_class(
        name, (GeneratedWorkflow,), exec_body=lambda ns: ns.update(attrs))
    built = workflow(name=name)(cls)
    built.mock_agents()  # so that it runs as is on the mock runtime's default registry
    return built


@st.composite
def _workflow_dags(
    draw: st.DrawFn,
    min_steps: int,
    max_steps: int,
    kinds: tuple[str, ...],
    max_count: int,
    hostile_outputs: bool,
) -> type[GeneratedWorkflow]:
    n = draw(st.integers(min_steps, max_steps))
    steps: list[GeneratedStep] = []
    for i in range(n):
        deps = sorted(draw(st.lists(st.integers(0, i - 1), unique=True, max_size=2))) if i \
            else []
        allowed = [k for k in kinds if deps or k not in ("skipped", "conditional")]
        kind = draw(st.sampled_from(allowed or ["plain"]))
        first = steps[deps[0]] if deps else None
        fan = ["single"]
        if max_count >= 2:
            fan.append("count")
        # a dynamic step fans out over a list: the result of a static parallel step
        if first is not None and first.count and first.kind != "failing":
            fan.append("dynamic")
        mode = draw(st.sampled_from(fan))
        steps.append(GeneratedStep(
            name=f"s{i}",
            depends_on=tuple(f"s{d}" for d in deps),
            kind=kind,
            count=draw(st.integers(2, max_count)) if mode == "count" else None,
            dynamic=mode == "dynamic",
            value=draw(st.integers(0, 96)),
            failure=draw(agent_failures()) if kind == "failing" else None,
            extra=draw(agent_results(max_keys=2, max_depth=4)) if hostile_outputs else {},
        ))
    return _build(f"generated_dag_{next(_generated)}", steps)


def workflow_dags(
    *,
    min_steps: int = 2,
    max_steps: int = 6,
    kinds: Sequence[str] = STEP_KINDS,
    max_count: int = 3,
    hostile_outputs: bool = True,
) -> st.SearchStrategy[type[GeneratedWorkflow]]:
    """Whole workflow classes (``GeneratedWorkflow`` subclasses): ``min_steps`` to
    ``max_steps`` steps, each depending on up to two earlier ones, of the ``kinds`` given
    (see ``GeneratedStep``), some static parallel (2 to ``max_count`` instances) or dynamic.
    With ``hostile_outputs`` agents also report a small ``agent_results()`` object, which
    goes through the state and the event log.

    Each draw builds and registers a new ``@workflow`` class (``generated_dag_<n>``) and the
    mock rules of its agents (see ``GeneratedWorkflow``). Shrinks towards fewer, plainer,
    unparallel steps.
    """
    unknown = sorted(set(kinds) - set(STEP_KINDS))
    if unknown or not kinds:
        raise ValueError(f"workflow_dags: kinds must be among {', '.join(STEP_KINDS)}, got "
                         f"{list(kinds)!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"workflow_dags: need 1 <= min_steps <= max_steps, got {min_steps} "
                         f"and {max_steps}")
    if max_count < 1:
        raise ValueError(f"workflow_dags: max_count must be at least 1, got {max_count}")
    ordered = tuple(k for k in STEP_KINDS if k in kinds)  # "plain" first: it shrinks there
    return _workflow_dags(min_steps, max_steps, ordered, max_count, hostile_outputs)
