"""Loading workflow code for the CLI: import a workflow file, pick its class, build it from
``--config``, and find the code of a stored execution again (its ``flow.source`` tag)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from agentainer_flow.engine.errors import WorkflowNotRegisteredError
from agentainer_flow.engine.spec import (
    SPEC_ATTR,
    WorkflowSpec,
    WorkflowVersionNotRegisteredError,
    get_workflow_version,
    registered_workflows,
    version_key,
)
from agentainer_flow.store import ExecutionRecord, FlowError

__all__ = [
    "SOURCE_TAG",
    "UsageError",
    "ensure_registered",
    "import_file",
    "import_modules",
    "instantiate",
    "module_file",
    "pick_workflow",
    "split_target",
]

#: tag recording the workflow file an execution was started from
SOURCE_TAG = "flow.source"


class UsageError(FlowError):
    """A bad argument found after parsing (a file that does not import, bad JSON...)."""

    code = "usage"


def import_file(path: str | Path) -> ModuleType:
    """Import a Python file as a module named after it, its folder first on ``sys.path``.

    Importing the same file twice returns the module already loaded; a different file with
    the same name gets a name made unique by a hash of its path.
    """
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UsageError(f"no such workflow file: {path}")
    folder = str(file.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = file.stem if file.stem.isidentifier() else "flow_module"
    loaded = sys.modules.get(name)
    if loaded is not None:
        if module_file(loaded) == file:
            return loaded
        name = f"{name}_{hashlib.sha1(str(file).encode()).hexdigest()[:10]}"
        if name in sys.modules:
            return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise UsageError(f"cannot import {file}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except FlowError:
        del sys.modules[name]
        raise
    except Exception as exc:
        del sys.modules[name]
        raise UsageError(f"cannot import {file}: {type(exc).__name__}: {exc}") from None
    return module


def module_file(module: ModuleType) -> Path | None:
    f = getattr(module, "__file__", None)
    return Path(f).resolve() if f else None


def split_target(target: str) -> tuple[str, str | None]:
    """``FILE[:Workflow]``; a colon is a separator only if what follows is a name."""
    head, sep, tail = target.rpartition(":")
    if sep and tail.isidentifier() and head:
        return head, tail
    return target, None


def pick_workflow(module: ModuleType, name: str | None) -> type:
    found = [v for v in vars(module).values()
             if isinstance(v, type) and isinstance(getattr(v, SPEC_ATTR, None), WorkflowSpec)]
    own = [c for c in found if c.__module__ == module.__name__] or found
    where = module_file(module)
    if name is not None:
        # a class name first; else the workflow name, whose current (highest) version wins
        # when the module holds several (e.g. v1 imported next to v2)
        by_class = [c for c in found if c.__name__ == name]
        by_name = sorted((c for c in found if getattr(c, SPEC_ATTR).name == name),
                         key=lambda c: version_key(getattr(c, SPEC_ATTR).version))
        if by_class:
            return by_class[0]
        if by_name:
            return by_name[-1]
        listed = ", ".join(c.__name__ for c in own) or "none"
        raise UsageError(f"no workflow {name!r} in {where} (workflows there: {listed})")
    if len(own) == 1:
        return own[0]
    if not own:
        raise UsageError(f"no @workflow class in {where}")
    listed = ", ".join(c.__name__ for c in own)
    raise UsageError(f"{where} defines {len(own)} workflows ({listed}); "
                     f"pick one: flow run {where}:{own[0].__name__}")


def instantiate(cls: type, config: Any, *, has_config: bool) -> object:
    """Build the workflow instance from ``--config``.

    The rule, in order: if ``__init__`` takes exactly one parameter (no ``**kwargs``), the
    whole config is that argument; else a JSON object is spread as keyword arguments; else
    (a list, string, number) it is the single positional argument, if the other parameters
    have defaults. Without ``--config`` the class is called with no argument.
    """
    name = cls.__name__
    sig = inspect.signature(cls)
    params = [p for p in sig.parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if not has_config:
        pass
    elif len(params) == 1 and not var_kw:
        p = params[0]
        if p.kind is p.KEYWORD_ONLY:
            kwargs = {p.name: config}
        else:
            args = (config,)
    elif isinstance(config, dict) and (params or var_kw):
        kwargs = {str(k): v for k, v in config.items()}
    elif not params and not var_kw:
        raise UsageError(f"{name}() takes no arguments; drop --config")
    elif params and params[0].kind is not params[0].KEYWORD_ONLY:
        args = (config,)
    else:
        names = ", ".join(p.name for p in params)
        raise UsageError(f"{name}({names}): --config must be a JSON object whose keys name "
                         "the arguments")
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        hint = " (pass them with --config FILE)" if not has_config else ""
        shown = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                          for p in params)
        raise UsageError(f"cannot call {name}({shown}): {exc}{hint}") from None
    try:
        return cls(*args, **kwargs)
    except FlowError:
        raise
    except Exception as exc:
        raise UsageError(f"{name}(...) raised {type(exc).__name__}: {exc}") from None


def import_modules(modules: Sequence[Path | str] | None) -> None:
    """Import each workflow file, or dotted module name (``myapp.workflows``, found from
    the current directory or ``sys.path``)."""
    for m in modules or ():
        text = str(m)
        if not Path(text).exists() and not text.endswith(".py") and all(
                part.isidentifier() for part in text.split(".")):
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            try:
                importlib.import_module(text)
            except ImportError as exc:
                raise UsageError(f"cannot import module {text!r}: {exc}") from None
            continue
        import_file(m)


def ensure_registered(record: ExecutionRecord, *, exact_version: bool = False) -> WorkflowSpec:
    """The spec of the execution's workflow, importing its recorded source if needed.

    That is the version the execution was started on when it is loaded. Otherwise, with
    ``exact_version`` (what running it needs) ``WorkflowVersionNotRegisteredError`` is
    raised; without, the workflow's current version is returned (for reading, e.g.
    replaying a history against the new code).
    """
    name = record.workflow_name
    if name not in registered_workflows():
        _import_source(record)
    try:
        return get_workflow_version(name, record.workflow_version, execution_id=record.id)
    except WorkflowVersionNotRegisteredError:
        source = record.tags.get(SOURCE_TAG)
        if source and Path(source).is_file():
            import_file(source)  # the file it was started from may still declare it
            with contextlib.suppress(WorkflowVersionNotRegisteredError):
                return get_workflow_version(name, record.workflow_version,
                                            execution_id=record.id)
        if exact_version:
            raise
        return registered_workflows()[name]


def _import_source(record: ExecutionRecord) -> None:
    """Import the file recorded in the execution's ``flow.source`` tag, which must define
    its workflow."""
    name = record.workflow_name
    source = record.tags.get(SOURCE_TAG)
    if source:
        if not Path(source).is_file():
            raise WorkflowNotRegisteredError(
                f"workflow {name!r} of execution {record.id} was started from {source}, which "
                "no longer exists; pass the file that defines it with -m PATH")
        import_file(source)
        if name in registered_workflows():
            return
        raise WorkflowNotRegisteredError(
            f"{source} (recorded at run time) no longer defines workflow {name!r}; "
            "pass the file that does with -m PATH")
    raise WorkflowNotRegisteredError(
        f"workflow {name!r} of execution {record.id} is not registered and the execution "
        f"has no {SOURCE_TAG} tag; pass the file that defines it with -m PATH")
