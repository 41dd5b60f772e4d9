"""Workflow and step definitions: what ``@workflow`` and ``@step`` build, validated up front.

A ``WorkflowSpec`` is built once per decorated class. Every problem found (unknown
dependency, cycle, unbindable parameter...) is collected and raised together as one
``WorkflowDefinitionError`` naming each step, so a user fixes them in one go.
"""

from __future__ import annotations

import difflib
import enum
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .durations import Duration, parse_duration
from .errors import (
    AgentConfigurationError,
    NonDeterminismError,
    SecretNotFoundError,
    StepNotFoundError,
    WorkflowDefinitionError,
    WorkflowNotRegisteredError,
    WorkflowVersionNotRegisteredError,
)

__all__ = [
    "ErrorHandler",
    "RetryPolicy",
    "StepNotFoundError",
    "StepOptions",
    "StepSpec",
    "WorkflowSpec",
    "WorkflowVersionNotRegisteredError",
    "build_workflow_spec",
    "get_workflow_spec",
    "get_workflow_version",
    "registered_workflows",
    "version_key",
    "workflow_versions",
]

STEP_ATTR = "__flow_step__"
SPEC_ATTR = "__flow_spec__"
ARGS_ATTR = "__flow_args__"


class ErrorHandler(enum.Enum):
    """What a step's final failure does to the execution."""

    FAIL = "fail"  # fail the execution (the default)
    CONTINUE = "continue"  # record the failure; dependants run with ``None``


# A value refused where it entered (SerializationError) is retried like any step error: an
# agent's next answer, or a step's next result, may well be storable.
_ALWAYS_FATAL: tuple[type[BaseException], ...] = (
    AgentConfigurationError,
    NonDeterminismError,
    SecretNotFoundError,
    WorkflowDefinitionError,
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many times a failing step attempt is tried, and how long to wait in between.

    ``max_attempts`` counts the first try. Delays grow ``exponential``-ly (initial_delay *
    multiplier ** (n-1)), ``linear``-ly (initial_delay * n) or stay ``fixed``, capped at
    ``max_delay``. Exceptions in ``non_retryable`` (types or type names) fail at once.
    """

    max_attempts: int = 3
    backoff: Literal["exponential", "linear", "fixed"] = "exponential"
    initial_delay: Duration = "1s"
    max_delay: Duration = "5m"
    multiplier: float = 2.0
    non_retryable: Sequence[type[BaseException] | str] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(
                f"RetryPolicy.max_attempts must be at least 1, got {self.max_attempts}"
            )
        if self.backoff not in ("exponential", "linear", "fixed"):
            raise ValueError(
                f"RetryPolicy.backoff must be 'exponential', 'linear' or 'fixed', "
                f"got {self.backoff!r}"
            )
        parse_duration(self.initial_delay, what="RetryPolicy.initial_delay")
        parse_duration(self.max_delay, what="RetryPolicy.max_delay")

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        initial = parse_duration(self.initial_delay) or 0.0
        cap = parse_duration(self.max_delay) or 0.0
        if self.backoff == "fixed":
            d = initial
        elif self.backoff == "linear":
            d = initial * failed_attempt
        else:
            d = initial * self.multiplier ** (failed_attempt - 1)
        return min(d, cap)

    def is_retryable(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried under this policy."""
        if isinstance(exc, _ALWAYS_FATAL):
            return False
        names = {type(exc).__name__, f"{type(exc).__module__}.{type(exc).__qualname__}"}
        for item in self.non_retryable:
            if isinstance(item, str):
                if item in names:
                    return False
            elif isinstance(exc, item):
                return False
        return True


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """The arguments of ``@step``, attached to the method until the class is decorated."""

    name: str | None = None
    depends_on: tuple[str, ...] = ()
    timeout: Duration | None = None
    parallel: bool = False
    max_workers: int | None = None
    count: int | None = None
    dynamic: bool = False
    reduce: bool = False
    when: Callable[..., Any] | None = None
    retry_policy: RetryPolicy | None = None
    error_handler: ErrorHandler = ErrorHandler.FAIL
    always_run: bool = False
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Binding:
    """Where one extra parameter of a step function gets its value."""

    param: str
    source: Literal["dep", "index", "item", "results"]
    dep: str | None = None


@dataclass(frozen=True, kw_only=True)
class StepSpec:
    """A validated step of a workflow."""

    name: str
    method_name: str
    fn: Callable[..., Any]
    depends_on: tuple[str, ...]
    timeout: float | None
    parallel: bool
    dynamic: bool
    reduce: bool
    count: int | None
    max_workers: int | None
    when: Callable[..., Any] | None
    when_arity: int
    retry_policy: RetryPolicy | None  # None: the workflow's policy
    error_handler: ErrorHandler
    always_run: bool
    bindings: tuple[Binding, ...]
    description: str | None = None

    @property
    def static_instances(self) -> int:
        """Instance count of a static parallel step (1 for ordinary steps)."""
        if not self.parallel or self.dynamic:
            return 1
        return self.count if self.count is not None else (self.max_workers or 1)


@dataclass(frozen=True, kw_only=True)
class WorkflowSpec:
    """A validated workflow class."""

    name: str
    cls: type
    version: str
    description: str | None
    timeout: float | None
    retry_policy: RetryPolicy
    steps: dict[str, StepSpec]
    order: tuple[str, ...]  # a topological order, stable (definition order where free)
    dependants: dict[str, tuple[str, ...]] = field(default_factory=dict)
    sinks: tuple[str, ...] = ()


# name -> version -> spec: every version of a workflow this process has loaded, so that an
# execution started under an older version is resumed by the code that declares it
_registry: dict[str, dict[str, WorkflowSpec]] = {}


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order of versions: runs of digits compare as numbers (``"2" < "10"``, ``"1.2" <
    "1.10"``), other text as text."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in re.findall(r"\d+|\D+", version))


def _current(versions: dict[str, WorkflowSpec]) -> WorkflowSpec:
    return versions[max(versions, key=lambda v: (version_key(v), v))]


def registered_workflows() -> dict[str, WorkflowSpec]:
    """Workflows known to this process, by name: each name's current (highest) version."""
    return {name: _current(versions) for name, versions in _registry.items()}


def workflow_versions(name: str) -> dict[str, WorkflowSpec]:
    """Every version of workflow ``name`` loaded in this process, oldest first (empty if
    none)."""
    versions = _registry.get(name, {})
    return {v: versions[v] for v in sorted(versions, key=lambda v: (version_key(v), v))}


def get_workflow_spec(target: object) -> WorkflowSpec:
    """The spec of a workflow class or instance (its own version), or of a registered name
    (its current version: the highest loaded, see ``register``)."""
    if isinstance(target, str):
        versions = _registry.get(target)
        if not versions:
            raise _not_registered(target)
        return _current(versions)
    cls = target if isinstance(target, type) else type(target)
    spec = getattr(cls, SPEC_ATTR, None)
    if not isinstance(spec, WorkflowSpec):
        raise WorkflowDefinitionError(
            getattr(cls, "__name__", str(cls)),
            ["not a workflow: decorate the class with @workflow(...)"],
        )
    return spec


def get_workflow_version(name: str, version: str, *,
                         execution_id: str | None = None) -> WorkflowSpec:
    """The spec that declares version ``version`` of workflow ``name``: the code an
    execution started under that version is resumed with.

    Raises ``WorkflowNotRegisteredError`` if no version of ``name`` is loaded, and
    ``WorkflowVersionNotRegisteredError`` (naming ``execution_id``) if others are.
    """
    versions = _registry.get(name)
    if not versions:
        raise _not_registered(name, execution_id)
    spec = versions.get(str(version))
    if spec is None:
        raise WorkflowVersionNotRegisteredError(
            workflow=name, version=str(version), available=list(workflow_versions(name)),
            execution_id=execution_id)
    return spec


def _not_registered(name: str, execution_id: str | None = None) -> WorkflowNotRegisteredError:
    known = ", ".join(sorted(_registry)) or "none"
    of = f" (of execution {execution_id})" if execution_id else ""
    return WorkflowNotRegisteredError(
        f"no workflow named {name!r}{of} is registered in this process (known: {known}); "
        "import the module that defines it before resuming"
    )


def build_workflow_spec(
    cls: type,
    *,
    name: str | None = None,
    description: str | None = None,
    version: str | int = "1",
    max_retries: int | None = None,
    timeout: Duration | None = None,
    retry_policy: RetryPolicy | None = None,
) -> WorkflowSpec:
    """Collect and validate the steps of ``cls``; raise one error listing every problem."""
    wf_name = name or cls.__name__
    problems: list[str] = []
    try:
        wf_timeout = parse_duration(timeout, what="workflow timeout")
    except ValueError as exc:
        problems.append(str(exc))
        wf_timeout = None
    if retry_policy is None:
        if max_retries is not None:
            if max_retries < 0:
                problems.append(f"max_retries must not be negative, got {max_retries}")
                max_retries = 0
            retry_policy = RetryPolicy(max_attempts=max_retries + 1)
        else:
            retry_policy = NO_RETRY

    options: list[tuple[str, Callable[..., Any], StepOptions]] = []
    for attr, value in _class_members_in_order(cls):
        opts = getattr(value, STEP_ATTR, None)
        if isinstance(opts, StepOptions):
            options.append((attr, value, opts))
    if not options:
        problems.append("it has no steps: decorate at least one async method with @step")

    names: dict[str, str] = {}
    for attr, _fn, opts in options:
        step_name = opts.name or attr
        if step_name in names:
            problems.append(
                f"step name {step_name!r} is used by both {names[step_name]}() and {attr}()"
            )
        names[step_name] = attr

    by_name = {opts.name or attr: (attr, fn, opts) for attr, fn, opts in options}
    for step_name, (_attr, _fn, opts) in by_name.items():
        for dep in opts.depends_on:
            if dep not in by_name:
                close = difflib.get_close_matches(dep, list(by_name), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(
                    f"step {step_name!r} depends on unknown step {dep!r} "
                    f"(steps: {', '.join(by_name)}){hint}"
                )
            elif dep == step_name:
                problems.append(f"step {step_name!r} depends on itself")

    steps: dict[str, StepSpec] = {}
    for step_name, (attr, fn, opts) in by_name.items():
        spec = _build_step(step_name, attr, fn, opts, by_name, problems)
        if spec is not None:
            steps[step_name] = spec

    order: tuple[str, ...] = ()
    if not problems:
        order = _topological_order(steps, problems)
    if problems:
        raise WorkflowDefinitionError(wf_name, problems)

    dependants: dict[str, list[str]] = {s: [] for s in steps}
    for s in steps.values():
        for dep in s.depends_on:
            dependants[dep].append(s.name)
    candidates = [s for s in order if not steps[s].always_run] or list(order)
    sinks = tuple(s for s in candidates if not any(d in candidates for d in dependants[s]))
    return WorkflowSpec(
        name=wf_name,
        cls=cls,
        version=str(version),
        description=description if description is not None else inspect.getdoc(cls),
        timeout=wf_timeout,
        retry_policy=retry_policy,
        steps=steps,
        order=order,
        dependants={k: tuple(v) for k, v in dependants.items()},
        sinks=sinks,
    )


def register(spec: WorkflowSpec) -> None:
    """Make the spec findable by its name and version.

    Every version of a name stays registered: an execution is resumed by the code of the
    version it was started on (``get_workflow_version``). The latest definition of one
    (name, version) wins. A name's *current* version, the one new executions started by
    name get, is the highest (``version_key`` order), not the one defined last: which
    module happens to be imported last must not decide what new executions run.

    Another class taking over a (name, version) is logged as a warning: its executions,
    in flight or not, now run the new class's code (two modules that define one workflow
    name by mistake; a module imported twice under two names).
    """
    versions = _registry.setdefault(spec.name, {})
    previous = versions.get(spec.version)
    if previous is not None and _where(previous.cls) != _where(spec.cls):
        from agentainer_flow.store._logging import get_logger

        get_logger("agentainer_flow.engine").warning(
            "workflow_redefined", workflow=spec.name, version=spec.version,
            previous=_where(previous.cls), now=_where(spec.cls))
    versions[spec.version] = spec


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_members_in_order(cls: type) -> list[tuple[str, Any]]:
    seen: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            seen[attr] = value
    return list(seen.items())


def _build_step(
    name: str,
    attr: str,
    fn: Callable[..., Any],
    opts: StepOptions,
    all_steps: dict[str, tuple[str, Callable[..., Any], StepOptions]],
    problems: list[str],
) -> StepSpec | None:
    start = len(problems)
    where = f"step {name!r} ({attr})"
    if not inspect.iscoroutinefunction(fn):
        problems.append(f"{where} must be an async method (async def {attr}(self, ctx, ...))")
    try:
        timeout = parse_duration(opts.timeout, what=f"{where} timeout")
    except ValueError as exc:
        problems.append(str(exc))
        timeout = None
    if opts.dynamic and not opts.parallel:
        problems.append(f"{where}: dynamic=True needs parallel=True")
    if opts.dynamic and not opts.depends_on:
        problems.append(f"{where}: dynamic=True needs a dependency whose result is a list")
    if opts.parallel and not opts.dynamic and opts.count is None and opts.max_workers is None:
        problems.append(
            f"{where}: parallel=True needs count=N or max_workers=N (static fan-out), "
            "or dynamic=True (one instance per item of the upstream list)"
        )
    for label, value in (("count", opts.count), ("max_workers", opts.max_workers)):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{where}: {label} must be a positive integer, got {value!r}")
    if opts.when is not None and not callable(opts.when):
        problems.append(f"{where}: when= must be a callable taking the upstream result")
    parallel_deps = [d for d in opts.depends_on if d in all_steps and all_steps[d][2].parallel]
    if opts.reduce and not parallel_deps:
        problems.append(f"{where}: reduce=True needs a parallel step in depends_on")

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        problems.append(f"{where}: cannot read its signature")
        return None
    params = list(sig.parameters.values())
    if len(params) < 2 or params[0].kind not in _POSITIONAL or params[1].kind not in _POSITIONAL:
        problems.append(f"{where} must take (self, ctx, ...) as its first parameters")
        return None
    extra = [
        p for p in params[2:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    bindings: list[Binding] = []
    free: list[inspect.Parameter] = []
    for p in extra:
        dep = _dep_for_param(p.name, opts.depends_on)
        if dep is not None:
            bindings.append(Binding(p.name, "dep", dep))
        else:
            free.append(p)
    bound_deps = {b.dep for b in bindings}
    special: str | None = None
    if opts.reduce:
        special = "results"
    elif opts.parallel and opts.dynamic:
        special = "item"
    elif opts.parallel:
        special = "index"
    for p in free:
        if special is not None:
            dep = parallel_deps[0] if special == "results" and parallel_deps else (
                opts.depends_on[0] if special == "item" and opts.depends_on else None
            )
            bindings.append(Binding(p.name, special, dep))  # type: ignore[arg-type]
            special = None
            continue
        unbound = [d for d in opts.depends_on if d not in bound_deps]
        if len(opts.depends_on) == 1 and unbound and not opts.parallel:
            bindings.append(Binding(p.name, "dep", unbound[0]))
            bound_deps.add(unbound[0])
            continue
        if p.default is not p.empty:
            continue
        deps = ", ".join(opts.depends_on) or "none"
        problems.append(
            f"{where}: cannot bind parameter {p.name!r}: name it '<dep>_result' after one of "
            f"its dependencies ({deps}), give it a default, or remove it"
        )
    if opts.dynamic and not any(b.source == "item" for b in bindings):
        problems.append(f"{where}: dynamic=True needs a parameter to receive its item")
    when_arity = 0
    if opts.when is not None and callable(opts.when):
        try:
            wparams = [
                p
                for p in inspect.signature(opts.when).parameters.values()
                if p.kind in _POSITIONAL and p.default is p.empty
            ]
            when_arity = min(len(wparams), 1)
        except (TypeError, ValueError):
            when_arity = 1
    if len(problems) > start:
        return None
    return StepSpec(
        name=name,
        method_name=attr,
        fn=fn,
        depends_on=tuple(opts.depends_on),
        timeout=timeout,
        parallel=opts.parallel,
        dynamic=opts.dynamic,
        reduce=opts.reduce,
        count=opts.count,
        max_workers=opts.max_workers,
        when=opts.when,
        when_arity=when_arity,
        retry_policy=opts.retry_policy,
        error_handler=opts.error_handler,
        always_run=opts.always_run,
        bindings=tuple(bindings),
        description=opts.description or inspect.getdoc(fn),
    )


_POSITIONAL = (
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
)


def _dep_for_param(param: str, deps: Sequence[str]) -> str | None:
    for dep in deps:
        key = dep.replace("-", "_")
        if param in (f"{key}_result", f"{key}_results", key):
            return dep
    return None


def _topological_order(steps: dict[str, StepSpec], problems: list[str]) -> tuple[str, ...]:
    """Kahn's algorithm in definition order; a cycle is reported with its path."""
    indegree = {n: len(s.depends_on) for n, s in steps.items()}
    dependants: dict[str, list[str]] = {n: [] for n in steps}
    for n, s in steps.items():
        for d in s.depends_on:
            dependants[d].append(n)
    ready = [n for n in steps if indegree[n] == 0]
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in dependants[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
    if len(order) < len(steps):
        left = [n for n in steps if n not in order]
        cycle = " -> ".join(reversed(_find_cycle(steps, left)))
        problems.append(
            f"depends_on forms a cycle: {cycle} (each step would have to run before the next); "
            "remove one of these dependencies"
        )
    return tuple(order)


def _find_cycle(steps: dict[str, StepSpec], candidates: list[str]) -> list[str]:
    path: list[str] = []
    node = candidates[0]
    while node not in path:
        path.append(node)
        node = next(d for d in steps[node].depends_on if d in candidates)
    return [*path[path.index(node) :], node]
