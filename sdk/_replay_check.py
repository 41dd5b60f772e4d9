"""The pre-deploy gate: would new workflow code break the executions a store holds?

``check_replay(store_url, module)`` replays the history of every unfinished execution (and
optionally a random sample of finished ones) against the workflow classes that ``module``
defines, with no side effects, and lists those the code does not match. Run it in CI before
deploying new workflow code (``flow replay --check -m FILE`` is the same from a shell)::

    report = await check_replay("postgresql://ci@db/flow", "myapp.workflows")
    assert report.ok, report.describe()

From synchronous code (a plain pytest test, a script)::

    report = asyncio.run(check_replay("sqlite:///.flow/flow.db", "workflows.py"))
    report.assert_ok()
"""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from agentainer_flow.engine.engine import rebuild_workflow
from agentainer_flow.engine.errors import (
    WorkflowNotRegisteredError,
    WorkflowVersionNotRegisteredError,
)
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.spec import SPEC_ATTR, WorkflowSpec
from agentainer_flow.store import (
    TERMINAL_STATUSES,
    EventStore,
    ExecutionRecord,
    ExecutionStatus,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted

from ._context import Context
from ._loading import UsageError, import_file

__all__ = ["BrokenExecution", "ReplayCheckReport", "SkippedExecution", "check_replay"]

#: the statuses checked by default: every execution that may still run
UNFINISHED = (ExecutionStatus.PENDING, ExecutionStatus.RUNNING, ExecutionStatus.BLOCKED)

ModuleLike = str | Path | ModuleType


@dataclass(frozen=True, kw_only=True)
class BrokenExecution:
    """An execution the new code would break, and why (``error``: usually a
    ``NonDeterminismError`` naming the step and both sides; a
    ``WorkflowNotRegisteredError`` when the code lacks its workflow or version; a
    ``HistoryCorruptedError`` when its history cannot be read)."""

    execution_id: str
    workflow: str
    version: str
    status: str
    error: Exception

    @property
    def step(self) -> str | None:
        return getattr(self.error, "step", None)

    @property
    def recorded(self) -> str | None:
        return getattr(self.error, "recorded", None)

    @property
    def actual(self) -> str | None:
        return getattr(self.error, "actual", None)

    def to_dict(self) -> dict[str, Any]:
        e = self.error
        return {"execution_id": self.execution_id, "workflow": self.workflow,
                "version": self.version, "status": self.status, "step": self.step,
                "instance": getattr(e, "instance", None), "attempt": getattr(e, "attempt", None),
                "index": getattr(e, "index", None), "seq": getattr(e, "seq", None),
                "recorded": self.recorded, "actual": self.actual,
                "hint": getattr(e, "hint", None), "error_type": type(e).__name__,
                "error": str(e)}


@dataclass(frozen=True, kw_only=True)
class SkippedExecution:
    """An execution that was not checked: the code given does not define its workflow (or,
    for a finished one, the version it ran)."""

    execution_id: str
    workflow: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"execution_id": self.execution_id, "workflow": self.workflow,
                "reason": self.reason}


@dataclass(kw_only=True)
class ReplayCheckReport:
    """What ``check_replay`` found: ``checked`` executions (replayed, or found unable to
    run: the code lacks their version), the ``broken`` ones among them (the code does not
    match their history, or cannot run them), and the ``skipped`` ones."""

    checked: int = 0
    broken: list[BrokenExecution] = field(default_factory=list)
    skipped: list[SkippedExecution] = field(default_factory=list)
    #: the workflow names the code given defines
    workflows: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether no execution would break."""
        return not self.broken

    def describe(self) -> str:
        """Every broken execution, one line each (for an assertion message)."""
        lines = [f"{len(self.broken)} of {self.checked} executions would break:"]
        lines += [f"  {b.execution_id} ({b.workflow}): {b.error}" for b in self.broken]
        return "\n".join(lines) if self.broken else f"all {self.checked} executions match"

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` listing the broken executions, if there are any."""
        if self.broken:
            raise AssertionError(self.describe())

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "workflows": list(self.workflows),
                "broken": [b.to_dict() for b in self.broken],
                "skipped": [s.to_dict() for s in self.skipped]}


def load_module(target: ModuleLike) -> ModuleType:
    """A workflow module: given, a file (``path/to/workflows.py``) or a dotted name
    (``myapp.workflows``, found from the current directory or ``sys.path``)."""
    if isinstance(target, ModuleType):
        return target
    text = str(target)
    if isinstance(target, Path) or Path(text).exists() or text.endswith(".py"):
        return import_file(text)
    if not all(part.isidentifier() for part in text.split(".")):
        raise UsageError(f"{text!r} is neither a workflow file nor a module name")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(text)
    except ImportError as exc:
        raise UsageError(f"cannot import module {text!r}: {exc}") from None


def workflows_of(modules: Iterable[ModuleType]) -> dict[str, dict[str, WorkflowSpec]]:
    """The ``@workflow`` classes the modules hold (defined or imported there), by name and
    version."""
    found: dict[str, dict[str, WorkflowSpec]] = {}
    for module in modules:
        for value in vars(module).values():
            spec = getattr(value, SPEC_ATTR, None) if isinstance(value, type) else None
            if isinstance(spec, WorkflowSpec):
                found.setdefault(spec.name, {})[spec.version] = spec
    return found


async def check_replay(
    store_url: str | EventStore,
    module: ModuleLike | Sequence[ModuleLike],
    *,
    workflow: str | None = None,
    statuses: Sequence[ExecutionStatus | str] | None = None,
    sample: int = 0,
    seed: int | None = None,
) -> ReplayCheckReport:
    """Replay the store's unfinished executions against the workflow code in ``module``.

    Args:
        store_url: the store (a URL, opened without creating it; or an ``EventStore``,
            left open).
        module: the new code: a workflow file, a dotted module name, a module, or several.
            Only the ``@workflow`` classes found there are used (not other code this process
            happens to have loaded).
        workflow: only executions of this workflow. The code must define it: if it does
            not, its executions are reported broken (the new code could not run them).
        statuses: which executions to check (default: every unfinished one: pending,
            running, blocked).
        sample: also check a random sample of this many finished executions (completed,
            failed or cancelled): their histories exercise the code too.
        seed: seeds the sample, for a reproducible choice.

    An execution whose workflow the code does not define is skipped (see ``skipped``).
    One started on a version the code does not declare is broken if it may still run (its
    resume would be refused), skipped if it finished. Nothing is written to the store.
    """
    targets = [module] if isinstance(module, str | Path | ModuleType) else list(module)
    if not targets:
        raise UsageError("check_replay needs the workflow code to check: a file or a module")
    code = workflows_of(load_module(m) for m in targets)
    report = ReplayCheckReport(workflows=tuple(sorted(code)))
    wanted = list(UNFINISHED) if statuses is None else [ExecutionStatus(s) for s in statuses]
    store = create_store(store_url, create=False) if isinstance(store_url, str) else store_url
    await store.open()
    try:
        rows = await store.list_executions(workflow_name=workflow, statuses=wanted, limit=None)
        if sample > 0:
            seen = {r.id for r in rows}
            finished = [r for r in await store.list_executions(
                workflow_name=workflow, statuses=sorted(TERMINAL_STATUSES), limit=None)
                if r.id not in seen]
            rows += random.Random(seed).sample(finished, min(sample, len(finished)))
        for record in rows:
            await _check_one(store, record, code, report, named=workflow is not None)
    finally:
        if isinstance(store_url, str):
            await store.close()
    return report


async def _check_one(store: EventStore, record: ExecutionRecord,
                     code: dict[str, dict[str, WorkflowSpec]], report: ReplayCheckReport,
                     *, named: bool) -> None:
    name, version = record.workflow_name, record.workflow_version

    def broken(error: Exception) -> None:
        report.broken.append(BrokenExecution(
            execution_id=record.id, workflow=name, version=version,
            status=record.status.value, error=error))

    versions = code.get(name)
    if not versions:
        if named:
            report.checked += 1  # checked, and found unable to run
            broken(WorkflowNotRegisteredError(
                f"the code checked does not define workflow {name!r} (it defines: "
                f"{', '.join(sorted(code)) or 'no workflow'}); execution {record.id} "
                "could not run"))
        else:
            report.skipped.append(SkippedExecution(
                execution_id=record.id, workflow=name,
                reason=f"the code does not define workflow {name!r}"))
        return
    spec = versions.get(version)
    if spec is None:
        has = ", ".join(repr(v) for v in versions)
        if record.status.is_terminal:
            report.skipped.append(SkippedExecution(
                execution_id=record.id, workflow=name,
                reason=f"it ran version {version!r}; the code has version(s) {has}"))
        else:
            report.checked += 1
            broken(WorkflowVersionNotRegisteredError(
                workflow=name, version=version, available=list(versions),
                execution_id=record.id))
        return
    report.checked += 1
    try:
        history = await store.load(record.id)
        started = history[0].event
        assert isinstance(started, ExecutionStarted)
        instance = rebuild_workflow(spec, started)
        replayed = await replay_history(spec, instance, record, history,
                                        context_factory=Context)
    except Exception as exc:  # a damaged history, a constructor that changed...
        broken(exc)
        return
    if replayed.error is not None:
        broken(replayed.error)
