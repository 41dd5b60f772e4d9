"""The engine: starts executions, runs and resumes them in this process, waits for results.

One ``Engine`` owns a store, an agent runtime and a clock. Executions it runs are asyncio
tasks in the caller's loop; each is driven by a ``Runner`` built from its stored history, so
starting fresh and resuming after a crash are the same code path.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from agentainer_flow.store.base import EventStore, ExecutionRecord, NewExecution, StoredEvent
from agentainer_flow.store.errors import ExecutionNotFoundError
from agentainer_flow.store.events import (
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
)

from . import values
from .clock import Clock
from .errors import (
    FlowError,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
)
from .runner import Runner, _redact_event
from .runtimes.base import AgentRuntime
from .secrets import Redactor, encrypt_secrets, resolve_secrets
from .spec import ARGS_ATTR, WorkflowSpec, get_workflow_spec

__all__ = ["Engine", "Outcome", "rebuild_workflow"]

log = structlog.get_logger("agentainer_flow")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an execution ended."""

    execution_id: str
    status: str  # completed | failed | cancelled
    result_tree: Any = None
    error: str | None = None
    error_type: str | None = None
    step: str | None = None

    @classmethod
    def from_event(cls, execution_id: str, ev: Event) -> Outcome:
        if isinstance(ev, ExecutionCompleted):
            return cls(execution_id, "completed", ev.result)
        if isinstance(ev, ExecutionFailed):
            return cls(execution_id, "failed", None, ev.error, ev.error_type, ev.step)
        if isinstance(ev, ExecutionCancelled):
            return cls(execution_id, "cancelled", None,
                       f"cancelled{': ' + ev.reason if ev.reason else ''}", "Cancelled")
        raise ValueError(f"not a terminal event: {ev!r}")

    @property
    def result(self) -> Any:
        return values.load(self.result_tree)

    def unwrap(self) -> Any:
        """The result, or the matching ``WorkflowFailedError`` subclass."""
        if self.status == "completed":
            return self.result
        cls: type[WorkflowFailedError] = WorkflowFailedError
        if self.status == "cancelled":
            cls = WorkflowCancelledError
        elif self.error_type == "WorkflowTimeoutError":
            cls = WorkflowTimeoutError
        raise cls(f"execution {self.execution_id} {self.status}: {self.error}",
                  execution_id=self.execution_id, step=self.step,
                  error_type=self.error_type or "Exception")


def _identity(rt: Any) -> Any:
    return rt


class Engine:
    """Runs executions of registered workflows against one store and one runtime."""

    def __init__(
        self,
        store: EventStore,
        runtime: AgentRuntime,
        *,
        clock: Clock | None = None,
        context_factory: Callable[[Any], Any] | None = None,
        secret_fallback: Callable[[str], str] | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.clock = clock or Clock()
        self.context_factory = context_factory or _identity
        self.secret_fallback = secret_fallback
        self.tasks: dict[str, asyncio.Task[Outcome]] = {}
        self.runners: dict[str, Runner] = {}
        self._objects: dict[str, object] = {}
        self._secrets: dict[str, dict[str, str]] = {}
        # executions created by this engine and not yet run: no need to read them back
        self._fresh: dict[str, tuple[ExecutionRecord, list[StoredEvent]]] = {}
        # why runs of this process stopped without an outcome, by execution id
        self._stopped: dict[str, BaseException] = {}
        self.is_shutting_down = False

    # starting ---------------------------------------------------------------------------
    async def start(
        self,
        workflow: object,
        *,
        input: Any = None,
        tags: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        execution_id: str | None = None,
        parent_id: str | None = None,
    ) -> tuple[ExecutionRecord, bool]:
        """Record a new execution (or find the one with this id / idempotency key)."""
        spec = get_workflow_spec(workflow)
        if isinstance(workflow, type):
            raise TypeError(
                f"run_workflow() needs a workflow instance, got the class {spec.cls.__name__}; "
                f"create one first: {spec.cls.__name__}(...)"
            )
        secrets = {str(k): str(v) for k, v in (secrets or {}).items()}
        args, kwargs = getattr(workflow, ARGS_ATTR, ((), {}))
        ctor = values.dump([list(args), kwargs],
                           where=f"constructor arguments of workflow {spec.name!r}")
        input_tree = values.dump(input, where=f"input of workflow {spec.name!r}")
        clean_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        now = self.clock.now()
        eid = execution_id or str(uuid.uuid4())
        started = ExecutionStarted(
            ts=now, workflow_name=spec.name, workflow_version=spec.version, args=ctor,
            input=input_tree, tags=clean_tags, secret_names=sorted(secrets),
            parent_id=parent_id,
            deadline=now + spec.timeout if spec.timeout is not None else None)
        redactor = Redactor(secrets)
        if redactor:
            started = _redact_event(started, redactor)  # type: ignore[assignment]
        record, created = await self.store.create_execution(
            NewExecution(id=eid, workflow_name=spec.name, workflow_version=spec.version,
                         tags=clean_tags, idempotency_key=idempotency_key, parent_id=parent_id,
                         secrets=encrypt_secrets(secrets)),
            started)
        if created:
            self._fresh[record.id] = (record, [StoredEvent(record.id, 1, started)])
            self._objects[record.id] = workflow
            self._secrets[record.id] = secrets
            log.info("execution_started", execution_id=record.id, workflow=spec.name)
        return record, created

    def launch(self, execution_id: str, *, secrets: Mapping[str, str] | None = None,
               workflow: object | None = None) -> asyncio.Task[Outcome]:
        """Run (or keep running) the execution as a task of this process."""
        task = self.tasks.get(execution_id)
        if task is not None:
            return task
        self._stopped.pop(execution_id, None)
        task = asyncio.ensure_future(self._run(execution_id, secrets=secrets, workflow=workflow))
        self.tasks[execution_id] = task
        task.add_done_callback(lambda t: self._forget(execution_id, t))
        return task

    def _forget(self, execution_id: str, task: asyncio.Task[Outcome]) -> None:
        if self.tasks.get(execution_id) is task:
            del self.tasks[execution_id]
        self.runners.pop(execution_id, None)
        self._secrets.pop(execution_id, None)
        self._objects.pop(execution_id, None)
        self._fresh.pop(execution_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # A run that stopped without an outcome (non-determinism, a missing secret, a
            # store error): waiters get this error instead of waiting for an end that will
            # not come from this process. Resuming again clears it.
            self._stopped[execution_id] = exc
            log.warning("execution_stopped", execution_id=execution_id,
                        error_type=type(exc).__name__, error=str(exc))

    async def run(self, execution_id: str, **kwargs: Any) -> Outcome:
        """Run the execution to its end in this process and return how it ended."""
        return await asyncio.shield(self.launch(execution_id, **kwargs))

    async def _run(self, execution_id: str, *, secrets: Mapping[str, str] | None,
                   workflow: object | None) -> Outcome:
        fresh = self._fresh.pop(execution_id, None)
        if fresh is not None:
            record, history = fresh
        else:
            found = await self.store.get_execution(execution_id)
            if found is None:
                raise ExecutionNotFoundError(execution_id)
            record = found
            history = await self.store.load(execution_id)
        started = history[0].event
        assert isinstance(started, ExecutionStarted)
        if record.status.is_terminal:
            return Outcome.from_event(execution_id, history[-1].event)
        spec = self._spec_for(started, workflow)
        if workflow is None:
            workflow = self._objects.pop(execution_id, None)
        if workflow is None:
            workflow = rebuild_workflow(spec, started)
        given = dict(self._secrets.get(execution_id) or {})
        given.update(secrets or {})
        resolved = resolve_secrets(started.secret_names, given, record.secrets)
        self._secrets[execution_id] = resolved
        runner = Runner(self, record, spec, workflow, history, resolved)
        self.runners[execution_id] = runner
        if self.store.url != "memory://" and len(history) > 1:
            log.info("execution_resumed", execution_id=execution_id, events=len(history))
        return await runner.run()

    def _spec_for(self, started: ExecutionStarted, workflow: object | None) -> WorkflowSpec:
        spec = get_workflow_spec(workflow if workflow is not None else started.workflow_name)
        if spec.name != started.workflow_name:
            raise WorkflowNotRegisteredError(
                f"execution is of workflow {started.workflow_name!r}, not {spec.name!r}")
        if spec.version != started.workflow_version:
            raise WorkflowNotRegisteredError(
                f"the execution was started with version {started.workflow_version!r} of "
                f"workflow {spec.name!r}, but this process has version {spec.version!r}; "
                "resume it with the code of that version"
            )
        return spec

    # children ---------------------------------------------------------------------------
    async def ensure_child(self, child_id: str, workflow: object, *, parent: Runner,
                           input: Any, tags: Mapping[str, str] | None) -> None:
        """Create (once) and run the child execution of a ``ctx.run_workflow`` command."""
        secrets = dict(self._secrets.get(parent.execution_id) or {})
        await self.start(workflow, input=input, tags=tags, secrets=secrets,
                         execution_id=child_id, parent_id=parent.execution_id)
        self.launch(child_id, secrets=secrets, workflow=workflow)

    # waiting and cancelling -------------------------------------------------------------
    async def wait_outcome(self, execution_id: str) -> Outcome:
        """How the execution ended, waiting for it (in this process or in the store)."""
        task = self.tasks.get(execution_id)
        if task is not None:
            return await asyncio.shield(task)
        stopped = self._stopped.get(execution_id)
        if stopped is not None:
            raise stopped
        async for stored in self.store.subscribe(execution_id):
            if isinstance(stored.event, ExecutionCompleted | ExecutionFailed |
                          ExecutionCancelled):
                return Outcome.from_event(execution_id, stored.event)
        if await self.store.get_execution(execution_id) is None:
            raise ExecutionNotFoundError(execution_id)
        raise FlowError(f"execution {execution_id} ended without a terminal event")

    async def cancel(self, execution_id: str, reason: str = "") -> bool:
        """Ask the execution to stop: running agents are stopped, ``always_run`` steps run."""
        ok = await self.store.request_cancel(execution_id)
        runner = self.runners.get(execution_id)
        if runner is not None:
            runner.request_cancel(reason)
        return ok

    async def shutdown(self) -> None:
        """Stop running executions in this process; they stay resumable."""
        self.is_shutting_down = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def rebuild_workflow(spec: WorkflowSpec, started: ExecutionStarted) -> object:
    """A workflow instance from the constructor arguments recorded at start."""
    args, kwargs = values.load(started.args) if started.args is not None else ([], {})
    try:
        return spec.cls(*args, **kwargs)
    except Exception as exc:
        raise WorkflowNotRegisteredError(
            f"cannot rebuild workflow {spec.name!r} from its recorded constructor arguments: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
