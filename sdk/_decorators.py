"""``@workflow`` and ``@step``: turn a class into a validated, registered workflow."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast, overload

from agentainer_flow.engine.durations import Duration
from agentainer_flow.engine.spec import (
    ARGS_ATTR,
    SPEC_ATTR,
    STEP_ATTR,
    ErrorHandler,
    RetryPolicy,
    StepOptions,
    build_workflow_spec,
    register,
)

__all__ = ["step", "workflow"]

C = TypeVar("C", bound=type)
F = TypeVar("F", bound=Callable[..., Any])


@overload
def workflow(cls: C, /) -> C: ...


@overload
def workflow(
    *,
    name: str | None = None,
    description: str | None = None,
    version: str | int = "1",
    max_retries: int | None = None,
    timeout: Duration | None = None,
    retry_policy: RetryPolicy | None = None,
) -> Callable[[C], C]: ...


def workflow(
    cls: Any = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    version: str | int = "1",
    max_retries: int | None = None,
    timeout: Duration | None = None,
    retry_policy: RetryPolicy | None = None,
) -> Any:
    """Make a class a workflow: its ``@step`` methods form a DAG, validated right here.

    The constructor's arguments are recorded (they must be serialisable) so a crashed
    execution can rebuild the instance when it resumes. ``max_retries=N`` is shorthand for
    ``retry_policy=RetryPolicy(max_attempts=N + 1)`` applied to steps without their own.
    Raises ``WorkflowDefinitionError`` listing every problem (cycles, unknown steps...).

    ``version`` lets code change under executions in flight: each version of a ``name``
    stays registered, and an execution is always resumed by the class declaring the
    version it was started on (rebuilt from its recorded constructor arguments), wherever
    it resumes. So to change a workflow incompatibly, keep the old class (e.g. in a
    module ``workflows_v1.py``, same ``name``, old ``version``) loaded next to the new one
    until the executions started on it have finished. New executions run the version of
    the instance given; by name (e.g. ``fork``), the highest version loaded. An
    execution whose version no loaded class declares is left as it is:
    ``WorkflowClient.resume`` raises ``WorkflowVersionNotRegisteredError`` and a
    ``Worker`` hands it back for a worker that has the code.
    """

    def wrap(klass: C) -> C:
        spec = build_workflow_spec(
            klass, name=name, description=description, version=version,
            max_retries=max_retries, timeout=timeout, retry_policy=retry_policy)
        original: Any = cast(Any, klass).__init__

        @functools.wraps(original)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            if ARGS_ATTR not in self.__dict__:
                self.__dict__[ARGS_ATTR] = (args, kwargs)
            original(self, *args, **kwargs)

        cast(Any, klass).__init__ = __init__
        setattr(klass, SPEC_ATTR, spec)
        register(spec)
        return klass

    return wrap(cls) if cls is not None else wrap


@overload
def step(fn: F, /) -> F: ...


@overload
def step(
    name: str | None = None,
    *,
    depends_on: str | Sequence[str] | None = None,
    timeout: Duration | None = None,
    parallel: bool = False,
    max_workers: int | None = None,
    count: int | None = None,
    dynamic: bool = False,
    reduce: bool = False,
    when: Callable[..., Any] | None = None,
    retry_policy: RetryPolicy | None = None,
    error_handler: ErrorHandler = ErrorHandler.FAIL,
    always_run: bool = False,
    description: str | None = None,
) -> Callable[[F], F]: ...


def step(
    name: Any = None,
    *,
    depends_on: str | Sequence[str] | None = None,
    timeout: Duration | None = None,
    parallel: bool = False,
    max_workers: int | None = None,
    count: int | None = None,
    dynamic: bool = False,
    reduce: bool = False,
    when: Callable[..., Any] | None = None,
    retry_policy: RetryPolicy | None = None,
    error_handler: ErrorHandler = ErrorHandler.FAIL,
    always_run: bool = False,
    description: str | None = None,
) -> Any:
    """Mark an async method ``(self, ctx, ...)`` as a step of its workflow.

    Parameters after ``ctx`` receive, by name, the result of a dependency
    (``<dep>_result``/``<dep>_results``), or for a single dependency its result
    positionally; a static parallel step's first free parameter gets its index
    (``count`` instances, else ``max_workers``), a ``dynamic`` one its item of the upstream
    list, and a ``reduce`` step the list of results of its parallel dependency.
    """
    if callable(name) and not isinstance(name, str):
        fn = name
        setattr(fn, STEP_ATTR, StepOptions())
        return fn
    deps = (depends_on,) if isinstance(depends_on, str) else tuple(depends_on or ())
    options = StepOptions(
        name=name, depends_on=deps, timeout=timeout, parallel=parallel,
        max_workers=max_workers, count=count, dynamic=dynamic, reduce=reduce, when=when,
        retry_policy=retry_policy, error_handler=error_handler, always_run=always_run,
        description=description)

    def mark(fn: F) -> F:
        setattr(fn, STEP_ATTR, options)
        return fn

    return mark
