"""The engine: starts executions, runs and resumes them in this process, waits for results.

One ``Engine`` owns a store, an agent runtime and a clock. Executions it runs are asyncio
tasks in the caller's loop; each is driven by a ``Runner`` built from its stored history, so
starting fresh and resuming after a crash are the same code path.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.base import (
    DEFAULT_QUEUE,
    EventStore,
    ExecutionRecord,
    ExecutionStatus,
    NewExecution,
    StoredEvent,
)
from agentainer_flow.store.errors import (
    AppendConflictError,
    ExecutionNotFoundError,
    LeaseLostError,
    StoreError,
)
from agentainer_flow.store.events import (
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    PatchesDeclared,
    StepEvent,
)

from . import values
from ._testhooks import reach
from .clock import Clock
from .errors import (
    ConfigurationError,
    ExecutionBlockedError,
    ExecutionSuspended,
    FlowError,
    IdempotencyConflictError,
    SecretNotFoundError,
    WorkflowCancelledError,
    WorkflowFailedError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
)
from .history import ExecutionState, effective_deps, shape_divergence
from .leases import holder_is_dead, lease_seconds_from_env, make_owner_id
from .observe import Observer, combine, default_observer
from .runner import Runner, child_check_back_from_env
from .runtimes.base import AgentRuntime, store_label
from .secrets import (
    KEY_ENV,
    Redactor,
    decrypt_secrets,
    encrypt_secrets,
    redact_known,
    resolve_secrets,
)
from .spec import (
    ARGS_ATTR,
    StepNotFoundError,
    WorkflowSpec,
    get_workflow_spec,
    get_workflow_version,
)

__all__ = [
    "FORKED_FROM_STEP_TAG",
    "FORKED_FROM_TAG",
    "KEEP",
    "Engine",
    "Outcome",
    "rebuild_workflow",
    "reusable_steps",
]

#: tag of a forked execution: the id of the execution it was forked from
FORKED_FROM_TAG = "flow.forked_from"
#: tag of a forked execution: the step it was forked from (it and what follows ran again)
FORKED_FROM_STEP_TAG = "flow.forked_from_step"
_FORK_TAGS = (FORKED_FROM_TAG, FORKED_FROM_STEP_TAG)


class _Keep:
    """Sentinel type: keep the source execution's value (``Engine.fork(input=)``)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()

log = get_logger("agentainer_flow")


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
        owner_id: str | None = None,
        lease_seconds: float | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.store = store
        self._observer = combine(observer) if observer is not None else default_observer()
        #: this engine's lease owner id (see ``leases.make_owner_id``)
        self.owner_id = owner_id or make_owner_id()
        self.lease_seconds = lease_seconds or lease_seconds_from_env()
        self._renewer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
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
        #: seconds: a run whose every instance sleeps at least this long lets the execution
        #: go (lease released, memory freed) for a worker to claim when it is due; ``None``
        #: (the default, for runs that callers wait on in this process) never suspends
        self.suspend_after: float | None = None
        #: seconds: an execution let go while it waits for a child is claimed again this
        #: late at the latest (it is woken when the child ends; see ``CHILD_CHECK_BACK``)
        self.child_check_back = child_check_back_from_env()
        #: set by a worker that shuts down: no new step attempt starts; an execution whose
        #: running attempts are done is handed back (``ExecutionSuspended``)
        self.draining = False
        #: carried by every agent as its ``flow.store`` label (see ``store_label``)
        self.store_label = store_label(getattr(store, "url", "") or "memory://")
        #: cancels another process asked for that this store told of before their run
        #: here began (a claim under way): execution id -> when heard
        self._cancels_heard: dict[str, float] = {}
        self._looks: set[asyncio.Task[None]] = set()
        listeners = getattr(store, "cancel_listeners", None)
        if isinstance(listeners, list):
            listeners.append(self._cancel_heard)

    def _cancel_heard(self, execution_id: str) -> None:
        """Another process asked to cancel ``execution_id`` (the store heard it at once):
        its run here, if any, reads the request from the row now, and stops. One that has
        not begun (claimed a moment ago) does so when it begins."""
        runner = self.runners.get(execution_id)
        if runner is not None:
            self._look_at_row(runner)
            return
        now = time.monotonic()
        if len(self._cancels_heard) > 1000:  # of executions that never ran here
            self._cancels_heard = {k: t for k, t in self._cancels_heard.items()
                                   if now - t < 60}
        self._cancels_heard[execution_id] = now

    def _look_at_row(self, runner: Runner) -> None:
        if runner.finished or runner.h.cancel_requested:
            return
        task = asyncio.ensure_future(runner.look_at_row())
        self._looks.add(task)
        task.add_done_callback(self._looks.discard)

    @property
    def observer(self) -> Observer:
        """Hears of the live work done here (metrics, traces): see ``observe``. One that
        is set is wrapped by ``combine``: what it raises is logged, never raised here."""
        return self._observer

    @observer.setter
    def observer(self, observer: Observer | None) -> None:
        self._observer = combine(observer)

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
        run_here: bool = True,
        queue: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
    ) -> tuple[ExecutionRecord, bool]:
        """Record a new execution (or find the one with this id / idempotency key).

        With ``run_here`` the new execution is leased to this engine from the start (it
        is about to run it: nobody else may start it first); without, it waits for a
        worker or a resume (of ``queue``, most urgent ``priority`` first).
        """
        spec = get_workflow_spec(workflow)
        if isinstance(workflow, type):
            raise TypeError(
                f"run_workflow() needs a workflow instance, got the class {spec.cls.__name__}; "
                f"create one first: {spec.cls.__name__}(...)"
            )
        secrets = {str(k): str(v) for k, v in (secrets or {}).items()}
        redactor = Redactor(secrets)  # an empty secret value is refused here
        str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        if redactor:  # user data holding a secret's value is refused, never rewritten
            redactor.check(str_tags, f"the tags of workflow {spec.name!r}")
        clean_tags: dict[str, str] = {}
        for k, v in str_tags.items():  # kept in text/JSONB columns: no NUL, no surrogate
            key = values.check_text(k, f"tag {k!r} of workflow {spec.name!r}: its name",
                                    allow_nul=False)
            clean_tags[key] = values.check_text(v, f"tag {key!r} of workflow "
                                                f"{spec.name!r}: its value", allow_nul=False)
        for what, text in (("idempotency_key", idempotency_key), ("execution_id", execution_id)):
            if text is None:
                continue
            # a child's id is derived from its parent's: it holds no secret of its own
            if redactor and (what != "execution_id" or parent_id is None):
                redactor.check(str(text), f"the {what} of workflow {spec.name!r}")
            values.check_text(text, f"{what} {text!r} of workflow {spec.name!r}",
                              allow_nul=False)
        args, kwargs = getattr(workflow, ARGS_ATTR, ((), {}))
        ctor = values.dump([list(args), kwargs],
                           where=f"constructor arguments of workflow {spec.name!r} ($[0]: "
                           "positional, $[1]: keyword)", secrets=redactor.scanner)
        input_tree = values.dump(input, where=f"input of workflow {spec.name!r}",
                                 secrets=redactor.scanner)
        now = self.clock.now()
        eid = execution_id or str(uuid.uuid4())
        started = ExecutionStarted(
            ts=now, workflow_name=spec.name, workflow_version=spec.version, args=ctor,
            input=input_tree, tags=clean_tags, secret_names=sorted(secrets),
            parent_id=parent_id,
            deadline=now + spec.timeout if spec.timeout is not None else None)
        with self.observer.time_store("create_execution"):
            record, created = await self.store.create_execution(NewExecution(
                id=eid, workflow_name=spec.name, workflow_version=spec.version,
                tags=clean_tags, idempotency_key=idempotency_key, parent_id=parent_id,
                secrets=encrypt_secrets(secrets),
                lease_owner=self.owner_id if run_here else None,
                lease_seconds=self.lease_seconds, queue=queue, priority=priority,
                concurrency_key=concurrency_key), started)
        if not created and idempotency_key is not None:
            await self._check_same_start(record, idempotency_key, started)
        if created:
            if run_here:  # a worker's claim reads it back, with the lease it took
                self._fresh[record.id] = (record, [StoredEvent(record.id, 1, started)])
            self._objects[record.id] = workflow
            self._secrets[record.id] = secrets
            log.info("execution_started", execution_id=record.id, workflow=spec.name)
            self.observer.execution_started(record.id, spec.name, queue=queue or DEFAULT_QUEUE)
        return record, created

    def forget_start(self, execution_id: str) -> None:
        """Drop what ``start`` kept to run a new execution here (its workflow object, its
        secrets, its first events), unless it runs here already: it is to run elsewhere."""
        if execution_id in self.tasks:
            return
        for kept in (self._fresh, self._objects, self._secrets):
            kept.pop(execution_id, None)

    async def _check_same_start(self, record: ExecutionRecord, key: str,
                                started: ExecutionStarted) -> None:
        """An idempotency key names one run: the same workflow with the same arguments."""
        if record.workflow_name != started.workflow_name:
            raise IdempotencyConflictError(key, record.id,
                                           f"workflow {record.workflow_name!r}, not "
                                           f"{started.workflow_name!r}")
        first = (await self.store.load(record.id))[0].event
        assert isinstance(first, ExecutionStarted)
        if first.args != started.args or first.input != started.input:
            raise IdempotencyConflictError(key, record.id, "other constructor arguments or input")

    def launch(self, execution_id: str, *, secrets: Mapping[str, str] | None = None,
               workflow: object | None = None, leased: ExecutionRecord | None = None,
               takeover: bool = False,
               history: list[StoredEvent] | None = None) -> asyncio.Task[Outcome]:
        """Run (or keep running) the execution as a task of this process.

        The run first takes the execution's lease (``leased``: already taken, e.g. by a
        worker's claim). While another live process holds it, the run follows that process
        to the execution's outcome and takes over only if the lease expires or its holder
        dies; ``takeover`` takes it at once (the other holder is fenced out). ``history``:
        with ``leased``, the execution's history as loaded after that lease was taken (a
        worker loads what it claims in one read), instead of loading it here.
        """
        task = self.tasks.get(execution_id)
        if task is not None:
            return task
        self._stopped.pop(execution_id, None)
        task = asyncio.ensure_future(self._run(execution_id, secrets=secrets, workflow=workflow,
                                               leased=leased, takeover=takeover,
                                               history=history if leased else None))
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
        if not task.cancelled() and isinstance(task.exception(), ExecutionSuspended):
            pass  # asleep in the store: waiters follow it there
        elif not task.cancelled() and isinstance(exc := task.exception(),
                                                 LeaseLostError | AppendConflictError):
            # taken over by another process: waiters here follow it to the outcome
            log.warning("execution_lease_lost", execution_id=execution_id, error=str(exc))
        elif not task.cancelled() and (exc := task.exception()) is not None:
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
                   workflow: object | None, leased: ExecutionRecord | None = None,
                   takeover: bool = False,
                   history: list[StoredEvent] | None = None) -> Outcome:
        fresh = self._fresh.pop(execution_id, None)
        if fresh is not None:
            record, history = fresh
        else:
            got = leased or await self._acquire(execution_id, takeover=takeover)
            if isinstance(got, Outcome):
                return got
            record = got
            if not history:
                with self.observer.time_store("load"):
                    history = await self.store.load(execution_id)
        runner: Runner | None = None
        try:
            started = history[0].event
            assert isinstance(started, ExecutionStarted)
            if _is_terminal(history[-1].event):
                return Outcome.from_event(execution_id, history[-1].event)
            if workflow is None:
                workflow = self._objects.pop(execution_id, None)
            spec, workflow = self._code_for(execution_id, started, workflow)
            if workflow is None:
                workflow = rebuild_workflow(spec, started)
            if fresh is None and FORKED_FROM_TAG in started.tags:
                history = await self._copy_reused(record, spec, history)
            given = dict(self._secrets.get(execution_id) or {})
            given.update(secrets or {})
            resolved = _resolve_available(started.secret_names, given, record.secrets)
            self._secrets[execution_id] = resolved
            runner = Runner(self, record, spec, workflow, history, resolved)
            self.runners[execution_id] = runner
            if self._cancels_heard.pop(execution_id, None) is not None:
                self._look_at_row(runner)  # asked while it was being claimed
            self._ensure_renewer()
            if self.store.url != "memory://" and len(history) > 1:
                log.info("execution_resumed", execution_id=execution_id, events=len(history))
            outcome = await runner.run()
            if started.parent_id is not None and runner.finished:
                reach("child.ended")  # a crash here: the parent's check-back finds it
                await self._wake(started.parent_id)
            return outcome
        finally:
            if runner is None or not runner.finished:
                # stopped without an outcome (blocked, diverged, store down, shut down):
                # let whoever resumes it take over at once; a no-op if we lost the lease
                try:
                    await asyncio.shield(self.store.release(self.owner_id, execution_id))
                except (StoreError, asyncio.CancelledError):
                    pass

    async def _acquire(self, execution_id: str, *, takeover: bool) -> ExecutionRecord | Outcome:
        """Take the execution's lease; while a live process holds it, follow that process
        until the execution ends (its outcome) or the lease can be taken over."""
        following = False
        while True:
            record = await self.store.get_execution(execution_id)
            if record is None:
                raise ExecutionNotFoundError(execution_id)
            if record.status.is_terminal:
                history = await self.store.load(execution_id)
                return Outcome.from_event(execution_id, history[-1].event)
            now = time.time()  # leases are wall-clock times, whatever clock the engine uses
            holder = record.lease_owner
            if takeover or (holder is not None and holder != self.owner_id
                            and holder_is_dead(holder)):
                got = await self.store.acquire(execution_id, self.owner_id,
                                               lease_seconds=self.lease_seconds,
                                               takeover_from=holder)
            elif not record.lease_live(now) or holder == self.owner_id:
                got = await self.store.acquire(execution_id, self.owner_id,
                                               lease_seconds=self.lease_seconds)
            else:
                got = None
                if not following:
                    following = True
                    log.info("execution_followed", execution_id=execution_id, holder=holder,
                             lease_expires_at=record.lease_expires_at)
                left = (record.lease_expires_at or now) - now
                await self.store.wait_for_change(execution_id, max(0.05, min(1.0, left)))
            if got is not None:
                if holder is not None and holder != self.owner_id:
                    self.observer.lease_taken_over(execution_id, record.workflow_name,
                                                   previous_holder=holder)
                if following:
                    log.info("execution_taken_over", execution_id=execution_id,
                             previous_holder=holder)
                return got
            takeover = False

    # leases -----------------------------------------------------------------------------
    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew_leases())
        if self.store.url != "memory://" and (self._watcher is None or self._watcher.done()):
            self._watcher = asyncio.ensure_future(self._watch_runs())

    async def _watch_runs(self, interval: float = 0.5, min_age: float = 0.2) -> None:
        """Every ``interval``, look at the store row of each run that has gone on for at
        least ``min_age``: a cancel requested by another process (``flow cancel``) or a
        lease taken over is noticed while nothing is appended, e.g. during a long agent
        run (appends also tell; on Postgres a cancel is heard at once). One task for the
        whole engine: a run that ends within ``min_age`` costs nothing here, where a
        watcher of its own cost it a task and two turns of the event loop."""
        while self.runners:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = [r for r in self.runners.values()
                   if not r.finished and now - r.began >= min_age]
            if due:  # one run's unexpected error must not end the others' watching
                for failed in await asyncio.gather(*(r.look_at_row() for r in due),
                                                   return_exceptions=True):
                    if isinstance(failed, Exception):
                        log.warning("run_watch_failed", error=repr(failed))

    async def _renew_leases(self) -> None:
        """Renew the leases of every execution this engine runs, a third of a lease apart.

        A lease the store no longer gives back was taken over: its runner stops at once,
        leaving its agents to the new holder. A store that cannot be reached is tried again
        at the next round; appends are fenced anyway.
        """
        while self.runners:
            await asyncio.sleep(self.lease_seconds / 3)
            ids = [eid for eid, r in self.runners.items() if not r.finished]
            if not ids:
                continue
            try:
                with self.observer.time_store("renew_lease"):
                    held = set(await self.store.renew_lease(self.owner_id, ids,
                                                            self.lease_seconds))
            except StoreError as exc:
                log.warning("lease_renewal_failed", error=str(exc), executions=len(ids))
                continue
            for eid in ids:
                runner = self.runners.get(eid)
                if eid not in held and runner is not None and not runner.finished:
                    runner.lease_lost("its lease was not renewed in time and another "
                                      "process may have taken it over")

    def _code_for(self, execution_id: str, started: ExecutionStarted,
                  workflow: object | None) -> tuple[WorkflowSpec, object | None]:
        """The spec that runs the execution, and the instance to run it on if one was given
        that fits (``None``: rebuild it from the recorded constructor arguments).

        The code is that of the version the execution was started on, whatever version
        the caller's instance (a parent's step, a fresh start) or the name's current version
        is: an instance of another version is set aside. Raises
        ``WorkflowVersionNotRegisteredError`` when no loaded code declares that version;
        nothing is recorded then, so a process that has the code can still run it.
        """
        name, version = started.workflow_name, started.workflow_version
        if workflow is not None:
            spec = get_workflow_spec(workflow)
            if spec.name != name:
                raise WorkflowNotRegisteredError(
                    f"execution {execution_id} is of workflow {name!r}, not {spec.name!r}")
            if spec.version == version:
                return spec, workflow
        return get_workflow_version(name, version, execution_id=execution_id), None

    # forks ------------------------------------------------------------------------------
    async def fork(
        self,
        source_id: str,
        *,
        from_step: str,
        workflow: object | None = None,
        input: Any = KEEP,
        tags: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        run_here: bool = True,
        queue: str | None = None,
        priority: int = 0,
        concurrency_key: str | None = None,
    ) -> ExecutionRecord:
        """Record a new execution of ``source_id``'s workflow that reuses the recorded
        results of every step not depending (transitively) on ``from_step``.

        The new execution runs the current code (``workflow``, else the current version of
        the workflow rebuilt from the source's constructor arguments) with the source's
        input unless ``input`` is given. Its history starts with a copy of the events of
        the reused steps (a step is reused if it completed in the source and every step it
        depends on is reused), so replay uses their results and state writes and never
        runs their bodies or touches their agents, which stay the source's. Tags
        ``flow.forked_from``/``flow.forked_from_step`` link it to the source. Secrets
        are those given, else the source's (``FLOW_SECRET_<NAME>``, or kept encrypted).
        With ``run_here`` it is leased to this engine, ready for ``launch``; without, it
        is left for a worker (of ``queue``).
        """
        source = await self.store.get_execution(source_id)
        if source is None:
            raise ExecutionNotFoundError(source_id)
        first = (await self.store.load(source_id))[0].event
        assert isinstance(first, ExecutionStarted)
        if workflow is None:
            spec = get_workflow_spec(first.workflow_name)
            workflow = rebuild_workflow(spec, first)
        else:
            spec = get_workflow_spec(workflow)
            if spec.name != first.workflow_name:
                raise ConfigurationError(
                    f"execution {source_id} is of workflow {first.workflow_name!r}: it cannot "
                    f"be forked into workflow {spec.name!r}")
        if from_step not in spec.steps:
            raise StepNotFoundError(spec.name, from_step, list(spec.steps))
        given = {**(self._secrets.get(source_id) or {}), **(secrets or {})}
        resolved = _resolve_available(first.secret_names, given, source.secrets)
        fork_tags = {k: v for k, v in first.tags.items() if k not in _FORK_TAGS}
        fork_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        fork_tags.update({FORKED_FROM_TAG: source_id, FORKED_FROM_STEP_TAG: from_step})
        record, _ = await self.start(
            workflow, input=values.load(first.input) if input is KEEP else input,
            tags=fork_tags, secrets=resolved, run_here=True, queue=queue, priority=priority,
            concurrency_key=concurrency_key)
        # not runnable here before its reused steps are in (a launch meanwhile loads it)
        _, history = self._fresh.pop(record.id)
        try:
            history = await self._copy_reused(record, spec, history)
        except BaseException:
            # whoever runs it next copies them (see ``_run``): let it go at once
            await self._let_go(record.id)
            raise
        log.info("execution_forked", execution_id=record.id, source=source_id,
                 from_step=from_step, reused_events=len(history) - 1)
        if run_here:
            self._fresh[record.id] = (replace(record, last_seq=len(history)), history)
        else:  # a worker runs it
            await self._let_go(record.id)
        return record

    async def _let_go(self, execution_id: str) -> None:
        """Forget an execution created here and not run here, and release its lease."""
        for kept in (self._fresh, self._objects, self._secrets):
            kept.pop(execution_id, None)
        try:
            await asyncio.shield(self.store.release(self.owner_id, execution_id))
        except StoreError:
            pass  # its lease expires

    async def _copy_reused(self, record: ExecutionRecord, spec: WorkflowSpec,
                           history: list[StoredEvent]) -> list[StoredEvent]:
        """Append to a fork that holds only its ``ExecutionStarted`` the events of the
        steps it reuses from its source; the new history.

        Called when the fork is created and again by whoever runs a fork left with one
        event (its creator died between the two appends), so the reused steps never run.
        """
        started = history[0].event
        assert isinstance(started, ExecutionStarted)
        source_id = started.tags.get(FORKED_FROM_TAG)
        from_step = started.tags.get(FORKED_FROM_STEP_TAG)
        if len(history) != 1 or source_id is None or from_step is None:
            return history
        source = await self.store.load(source_id)
        keep = reusable_steps(spec, source, from_step)
        # the source's patch decisions too: the reused steps were recorded under them, and
        # the steps run again take the same branches
        events = [s.event for s in source[1:]
                  if (isinstance(s.event, StepEvent) and s.event.step in keep)
                  or isinstance(s.event, PatchesDeclared)]
        if not events:
            return history
        await self.store.append(record.id, 2, events, lease_token=record.lease_token or None)
        return [*history, *(StoredEvent(record.id, seq, ev)
                            for seq, ev in enumerate(events, start=2))]

    # children ---------------------------------------------------------------------------
    async def ensure_child(self, child_id: str, workflow: object, *, parent: Runner,
                           input: Any, tags: Mapping[str, str] | None) -> None:
        """Create (once) the child execution of a ``ctx.run_workflow`` command, and run it.

        Here, as a task of this process, unless the engine suspends (a worker's): then the
        child is left for the workers of its parent's queue, like any queued execution,
        so that the parent can let go while it runs (see ``Runner.wait_for_child``).
        """
        secrets = dict(self._secrets.get(parent.execution_id) or {})
        if self.suspend_after is None:
            await self.start(workflow, input=input, tags=tags, secrets=secrets,
                             execution_id=child_id, parent_id=parent.execution_id)
            self.launch(child_id, secrets=secrets, workflow=workflow)
            return
        record = parent.record
        _, created = await self.start(
            workflow, input=input, tags=tags, secrets=secrets, execution_id=child_id,
            parent_id=parent.execution_id, run_here=False, queue=record.queue,
            priority=record.priority, concurrency_key=record.concurrency_key)
        if created and child_id not in self.tasks:
            # whichever worker claims it rebuilds it and finds its secrets, as for any
            # queued execution; kept here, they would pile up for the ones run elsewhere
            self._objects.pop(child_id, None)
            self._secrets.pop(child_id, None)

    async def _wake(self, execution_id: str) -> None:
        """Make a suspended execution due now (a child of it ended, or it was cancelled);
        if this fails, its own check-back timer finds what changed."""
        try:
            with self.observer.time_store("wake"):
                await self.store.wake(execution_id)
        except StoreError as exc:
            log.warning("execution_wake_failed", execution_id=execution_id, error=str(exc))

    # waiting and cancelling -------------------------------------------------------------
    async def wait_outcome(self, execution_id: str, *, follow: bool = False) -> Outcome:
        """How the execution ended, waiting for it (in this process or in the store).

        A run of this process that lets the execution go without an outcome (suspended,
        handed back, taken over) is followed in the store. One that stopped here (it
        diverged, a store error...) raises why, unless ``follow``: then only the store's
        outcome counts, as for a worker's child, which another worker may run. Raises
        ``ExecutionBlockedError`` for an execution that waits for a secret.
        """
        task = self.tasks.get(execution_id)
        if task is not None:
            try:
                return await asyncio.shield(task)
            except (ExecutionSuspended, LeaseLostError, AppendConflictError):
                pass  # let go here: its outcome comes through the store
            except Exception:
                if not follow:
                    raise
        stopped = None if follow else self._stopped.get(execution_id)
        if stopped is not None:
            raise stopped
        seq = 0
        while True:
            watch = self.store._watch(execution_id)
            batch = await self.store.load(execution_id, seq)
            for stored in batch:
                seq = stored.seq
                if _is_terminal(stored.event):
                    return Outcome.from_event(execution_id, stored.event)
            record = await self.store.get_execution(execution_id)
            if record is None:
                raise ExecutionNotFoundError(execution_id)
            if record.status.is_terminal and record.last_seq <= seq:
                raise FlowError(f"execution {execution_id} ended without a terminal event")
            if record.status is ExecutionStatus.BLOCKED and not record.lease_live(time.time()):
                raise ExecutionBlockedError(execution_id, _blocked_secret(record.error))
            if not batch:
                await self.store.wait_for_change(execution_id, 1.0, watch=watch)

    async def cancel(self, execution_id: str, reason: str = "") -> bool:
        """Ask the execution to stop: running agents are stopped, ``always_run`` steps run.

        ``reason`` goes with the request to whichever process runs it. It is stored in the
        execution's row, so the values of every secret this process can know of are
        redacted from it first (``_redact_reason``).
        """
        reason = await self._redact_reason(execution_id, reason)
        ok = await self.store.request_cancel(execution_id, reason)
        runner = self.runners.get(execution_id)
        if runner is not None:
            runner.request_cancel(reason)
        elif ok:  # suspended (asleep, waiting for a child): claimed again now, to stop
            await self._wake(execution_id)
        return ok

    async def _redact_reason(self, execution_id: str, reason: str) -> str:
        """A cancel reason without the secret values this process can know of: those it
        holds, those in ``FLOW_SECRET_<NAME>`` variables, and the execution's own secrets
        kept encrypted in its row (readable where ``FLOW_SECRETS_KEY`` is set). A process
        that knows none of them (another machine, no key) cannot find them."""
        reason = redact_known(reason)
        if not reason:
            return reason
        known = {name[len("FLOW_SECRET_"):].lower(): value
                 for name, value in os.environ.items()
                 if name.startswith("FLOW_SECRET_") and value}
        if os.environ.get(KEY_ENV):
            try:
                record = await self.store.get_execution(execution_id)
                if record is not None:
                    known.update(decrypt_secrets(record.secrets))
            except (StoreError, ConfigurationError):
                pass  # the request still goes through, redacted with what is known
        return Redactor({k: v for k, v in known.items() if v}).text(reason) if known else reason

    async def shutdown(self) -> None:
        """Stop running executions in this process; they stay resumable (their leases are
        released, their agents keep running and are adopted by whoever resumes them)."""
        self.is_shutting_down = True
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for background in (self._renewer, self._watcher, *self._looks):
            if background is not None:
                background.cancel()
                await asyncio.gather(background, return_exceptions=True)
        self._renewer = self._watcher = None
        fresh, self._fresh = list(self._fresh), {}
        for execution_id in fresh:  # created and leased here, never run: free them
            try:
                await self.store.release(self.owner_id, execution_id)
            except StoreError:
                pass


def _is_terminal(event: Event) -> bool:
    return isinstance(event, ExecutionCompleted | ExecutionFailed | ExecutionCancelled)


def _blocked_secret(error: str | None) -> str:
    """The secret a blocked execution waits for, from the message the runner stored."""
    text = error or ""
    start = text.find("secret '")
    if start < 0:
        return "?"
    start += len("secret '")
    end = text.find("'", start)
    return text[start:end] if end > start else "?"


def _resolve_available(names: list[str], given: Mapping[str, str],
                       blob: bytes | None) -> dict[str, str]:
    """The recorded secrets that can be found now. A missing one does not stop the run: a
    step that reads it blocks the execution until it is resumed with the secret."""
    out = dict(given)  # given now for a blocked step, perhaps never recorded at the start
    for name in names:
        try:
            out.update(resolve_secrets([name], given, blob))
        except SecretNotFoundError:
            continue
    return out


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


def reusable_steps(spec: WorkflowSpec, history: list[StoredEvent], from_step: str) -> list[str]:
    """The steps of ``spec`` a fork of ``history`` from ``from_step`` reuses, in order:
    those that completed there, do not depend (transitively) on ``from_step``, depend only
    on reused steps (a step after one that runs again may get another input), and whose
    recorded shape (dependencies, instance count, ``when=``) the code still has: a step the
    code changed that way runs again, with what follows it."""
    state = ExecutionState(spec, history[0].execution_id if history else "")
    for stored in history:
        state.apply(stored.seq, stored.event)
    deps = effective_deps(spec)
    rerun = {from_step}
    while True:
        keep = _kept(spec, state, deps, rerun)
        changed = _changed_shape(spec, history, keep)
        if changed is None or changed in rerun:
            return keep
        rerun.add(changed)


def _kept(spec: WorkflowSpec, state: ExecutionState, deps: Mapping[str, Sequence[str]],
          seeds: set[str]) -> list[str]:
    rerun = set(seeds)
    keep: list[str] = []
    for name in spec.order:
        if name in rerun or any(d in rerun for d in deps[name]):
            rerun.add(name)
        elif state.steps[name].status == "completed" and all(d in keep for d in deps[name]):
            keep.append(name)
    return keep


def _changed_shape(spec: WorkflowSpec, history: list[StoredEvent], keep: list[str]
                   ) -> str | None:
    """The first of the ``keep`` steps whose recorded events the code's DAG no longer fits."""
    if not history:
        return None
    trial = ExecutionState(spec, history[0].execution_id)
    trial.apply(history[0].seq, history[0].event)
    seq = history[0].seq
    for stored in history[1:]:
        ev = stored.event
        if isinstance(ev, StepEvent) and ev.step in keep:
            seq += 1
            trial.apply(seq, ev)
    diverged = shape_divergence(trial)
    return None if diverged is None else diverged.step
