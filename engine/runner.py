"""The replay executor: runs one execution from its history to its end.

The runner folds the history into an ``ExecutionState``, then drives a deterministic DAG
scheduler: a step whose dependencies are resolved is decided (skipped, or started with its
instances), instances run as tasks, and their outcomes are turned into events. Events are
buffered and made durable together (``flush``) before anything outside the process can see
their effect: one commit per scheduling round in a chain of steps.

A resumed execution is first checked against its code: the shape of the DAG its history
fixes (``shape_divergence``), then the recorded commands of the attempts that were in
flight, re-run before anything new is recorded. Code that diverged stops the run with
``NonDeterminismError`` and leaves the history as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.base import UNSET, ExecutionRecord, ExecutionStatus, StoredEvent
from agentainer_flow.store.errors import LeaseLostError, StoreError
from agentainer_flow.store.events import (
    CancelRequested,
    ChildWorkflowCompleted,
    ChildWorkflowStarted,
    Event,
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    PatchesDeclared,
    StepCompleted,
    StepFailed,
    StepRetryScheduled,
    StepSkipped,
    StepStarted,
)

from . import values
from .commands import StepRuntime, declared_patches
from .eager import eager
from .errors import (
    EngineSignal,
    ExecutionBlockedError,
    ExecutionSuspended,
    NonDeterminismError,
    SecretNotFoundError,
    StepTimeoutError,
)
from .history import CommandKey, ExecutionState, effective_deps, shape_divergence
from .leases import seconds_from_env
from .observe import NOOP, AttemptRef, attempt_outcome, run_stop_reason
from .secrets import Redactor, SecretStore
from .spec import RetryPolicy, StepSpec, WorkflowSpec

if TYPE_CHECKING:
    from .engine import Engine, Outcome

__all__ = ["CHILD_CHECK_BACK", "Runner", "child_check_back_from_env"]

log = get_logger("agentainer_flow")
_NAME_SAFE = re.compile(r"[^a-zA-Z0-9_.-]+")

#: seconds: an execution let go while it waits for a child workflow is claimed again this
#: late at the latest, to look whether the child ended (it is woken as soon as the child
#: ends; this covers a process that died between the child's end and that wake-up).
#: ``$FLOW_CHILD_CHECK_BACK`` overrides it (``Engine.child_check_back``).
CHILD_CHECK_BACK = 30.0
_CHECK_BACK_ENV = "FLOW_CHILD_CHECK_BACK"


def child_check_back_from_env() -> float:
    """``$FLOW_CHILD_CHECK_BACK`` if set (for tests and tuning), else ``CHILD_CHECK_BACK``."""
    return seconds_from_env(_CHECK_BACK_ENV, CHILD_CHECK_BACK)


class _Suspend(EngineSignal):
    """Every in-flight instance sleeps (or waits for a child) until at least ``wake_at``:
    let the execution go (``None``: the engine drains, and nothing runs here any more)."""

    def __init__(self, wake_at: float | None) -> None:
        super().__init__()
        self.wake_at = wake_at


class _Aborted(EngineSignal):
    """Raised through user code when the runner must stop (lost the history, diverged)."""


#: secrets a step instance asked for and did not get (set per instance task)
_MISSING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "flow_missing_secrets", default=None)


class _WatchedSecrets(SecretStore):
    """``ctx.secrets`` that notes a missing secret, so the attempt blocks the execution
    (status ``blocked``) instead of failing it, whatever the step does with the error.

    It also keeps what the fallback (placeholders in tests, ``[secret:NAME]`` in replay)
    served, so that commands compare secrets by name whichever way a run got them."""

    def __init__(self, values: dict[str, str],
                 fallback: Callable[[str], str] | None = None) -> None:
        super().__init__(values, fallback)
        self.given = dict(values)
        #: values the fallback served, by secret name
        self.served: dict[str, str] = {}

    def _lookup(self, name: str) -> str:
        value = super().__getitem__(name)
        if name not in self.given:
            self.served[name] = value
        return value

    def __getitem__(self, name: str) -> str:
        try:
            return self._lookup(name)
        except SecretNotFoundError:
            missing = _MISSING.get()
            if missing is not None:
                missing.append(name)
            raise

    def get(self, name: str, default: Any = None) -> Any:
        """An optional secret: ``default`` when missing (does not block)."""
        try:
            return self._lookup(name)
        except SecretNotFoundError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None


class Runner:
    """Runs one execution to its end (or until it must stop)."""

    def __init__(
        self,
        engine: Engine,
        record: ExecutionRecord,
        spec: WorkflowSpec,
        workflow: object,
        history: list[StoredEvent],
        secrets: dict[str, str],
    ) -> None:
        self.engine = engine
        #: when this run began (``time.monotonic``), for ``Engine._watch_runs``
        self.began = time.monotonic()
        self.store = engine.store
        self.runtime = engine.runtime
        self.clock = engine.clock
        self.spec = spec
        self.workflow = workflow
        self.record = record
        self.execution_id = record.id
        self.secret_store = _WatchedSecrets(secrets, engine.secret_fallback)
        #: the fencing token of this run's lease: every append carries it
        self.lease_token: int | None = record.lease_token or None
        #: the execution reached its end here (its terminal event is durable)
        self.finished = False
        self.redactor = Redactor(secrets)
        self.h = ExecutionState(spec, record.id)
        for stored in history:
            self.h.apply(stored.seq, stored.event)
        self.seq = self.durable_seq = self.h.last_seq
        started = self.h.started
        assert started is not None, "history must begin with ExecutionStarted"
        self.input = values.load(started.input)
        self.deadline = started.deadline
        self._pending: list[Event] = []
        self._after_flush: list[Callable[[], Awaitable[None]]] = []
        self._cleanups: set[asyncio.Task[None]] = set()
        #: sleeping instances: the attempt (see ``_attempt_task``) awaiting ``ctx.sleep``
        #: -> when it fires (or awaiting a child workflow -> when to look at it again)
        self._sleeping: dict[_Attempt, float] = {}
        #: instances waiting for a child workflow: the attempt -> the child's id
        self._awaited: dict[_Attempt, str] = {}
        #: the body of an attempt with a deadline runs as its own task: it -> the attempt
        self._bodies: dict[asyncio.Task[Any], _Attempt] = {}
        #: while ``_launch_started`` runs an attempt's first step: what stands for its task
        self._first_step: _FirstStep | None = None
        self._suspended = False
        self._flush_lock = asyncio.Lock()
        self._status: ExecutionStatus | None = (
            None if record.status is ExecutionStatus.RUNNING else ExecutionStatus.RUNNING
        )
        self._fatal: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: the attempts started: their task, or a done future for one that ended in its
        #: first step -> (step, instance, attempt)
        self._tasks: dict[asyncio.Future[tuple[str, Any]], tuple[str, int, int]] = {}
        self._remaining: dict[str, int] = {}
        self._ready: list[str] = []
        self._open: list[str] = []  # steps with instances to run, in start order
        self._starting: list[tuple[StepSpec, int, int]] = []  # attempts to launch after flush
        self._new_attempts: set[CommandKey] = set()  # started by this run (not resumed)
        # a cancel requested while no run held the execution (e.g. let go, asleep)
        self._cancel_wanted = record.cancel_requested
        self._cancel_reason = ((record.cancel_reason or "requested") if record.cancel_requested
                               else "")
        self._short_id = _NAME_SAFE.sub("-", self.execution_id)[:40]
        self._log = log.bind(execution_id=self.execution_id, workflow=spec.name)
        #: the patch ids this code names (``ctx.patched``), declared by its new executions
        self.code_patches = declared_patches(spec.cls)
        #: on resume, the in-flight attempts still re-running their recorded commands:
        #: nothing new is made durable until they have all caught up (or one diverged)
        self._catching_up: set[CommandKey] = set()
        self._refs: Redactor | None = None
        self._refs_served = 0
        self._caught_up = asyncio.Event()
        self._caught_up.set()

    # ids ------------------------------------------------------------------------------
    def agent_id(self, step: str, instance: int, attempt: int, index: int) -> str:
        """Deterministic agent (container) name for a command."""
        step_part = _NAME_SAFE.sub("-", step)[:60]
        return f"flow-{self._short_id}-{step_part}-{instance}-{attempt}-{index}"

    def child_id(self, step: str, instance: int, attempt: int, index: int) -> str:
        """Deterministic id of a child execution started by a command."""
        return f"{self.execution_id}.{step}.{instance}.{attempt}.{index}"

    # events ---------------------------------------------------------------------------
    def emit(self, event: Event) -> Any:
        """Buffer an event (secrets redacted from its text for people) and fold it into the
        state; returns it. User data in it was checked where it was encoded."""
        if self.redactor:
            event = _redact_event(event, self.redactor)
        self.seq += 1
        self._pending.append(event)
        self.h.apply(self.seq, event)
        return event

    def after_flush(self, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` once everything emitted so far is durable."""
        self._after_flush.append(action)

    async def flush(self, *, wake_at: float | None = UNSET,
                    status: ExecutionStatus | None = None, error: str | None = None) -> None:
        """Make every event emitted so far durable, in as few commits as possible."""
        if not self._caught_up.is_set():
            # an attempt went live while others still replay what they recorded: if one of
            # those diverges, nothing of this run may have been recorded
            await self._caught_up.wait()
            self.check_alive()
        target = self.seq
        async with self._flush_lock:
            if self.durable_seq >= target and status is None and wake_at is UNSET:
                return
            batch, self._pending = self._pending, []
            actions, self._after_flush = self._after_flush, []
            if status is None:
                status = self._status
            # the commit is not cancellable: a store may commit an append whose caller was
            # cancelled, and durable_seq must say what the store holds, or the next append
            # conflicts with our own events. A cancelled flush waits for it, then raises.
            # started at once: a commit that needs no wait costs no task and no loop turn
            commit = eager(self._commit(batch, status, error, wake_at))
            cancelled = False
            with self.clock.busy():  # real work: virtual time does not skip meanwhile
                while not commit.done():
                    try:
                        await asyncio.shield(commit)
                    except asyncio.CancelledError:
                        cancelled = True
                    except BaseException:  # re-raised by commit.result() below
                        break
            if cancelled:
                self._after_flush[:0] = actions  # the next flush runs them
                if not commit.cancelled():
                    commit.exception()  # retrieved; a StoreError has set _fatal
                raise asyncio.CancelledError
            commit.result()
        if actions:
            # cleanup (removing agents) runs beside the execution, all at once: it is off
            # the critical path and a cancelled flusher cannot abandon it; run() waits for it
            task = asyncio.ensure_future(self._clean_up(actions))
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)

    async def _clean_up(self, actions: list[Callable[[], Awaitable[None]]]) -> None:
        async def one(action: Callable[[], Awaitable[None]]) -> None:
            try:
                await action()
            except Exception as exc:  # best effort; the outcome is recorded, gc reaps
                self._log.warning("cleanup_failed", error=str(exc))

        await asyncio.gather(*(one(a) for a in actions))

    async def _cleaned_up(self) -> None:
        """Wait (a while) for the cleanups under way; gc reaps what they leave."""
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=60)

    async def _commit(self, batch: list[Event], status: ExecutionStatus | None,
                      error: str | None, wake_at: float | None) -> None:
        """Append ``batch`` under the lease; note how far the history is durable."""
        try:
            with self.engine.observer.time_store("append"):
                result = await self.store.append(
                    self.execution_id, self.durable_seq + 1, batch,
                    status=status, error=error, wake_at=wake_at, lease_token=self.lease_token)
        except StoreError as exc:
            # lost the lease or a race, or the store stayed down: stop here; the agents
            # are left running for whoever holds (or takes) the lease
            if self._fatal is None:
                self._fatal = exc
            self._wakeup()
            raise _Aborted() from exc
        self.durable_seq = result.last_seq
        self._status = None
        if result.cancel_requested and not self.h.cancel_requested and not self._cancel_wanted:
            # asked by another process (else request_cancel has the reason already): its
            # reason is in the row, read once
            reason = "requested"
            with contextlib.suppress(StoreError):
                record = await self.store.get_execution(self.execution_id)
                if record is not None and record.cancel_reason:
                    reason = record.cancel_reason
            self.request_cancel(reason)

    def _must_flush(self) -> bool:
        """Whether the scheduler must make its buffered events durable before it moves on.

        Outcomes (a step completed, failed, skipped...) must be durable before work that
        depends on them runs. Bare ``StepStarted`` events need not be: until the step's
        first command flushes them, a crash looks the same as one just before the start.
        Nor need ``PatchesDeclared``: until something else is durable, the next run declares
        again, with its own code, as if it were the first.
        """
        return any(type(ev) not in (StepStarted, PatchesDeclared) for ev in self._pending)

    def halt(self, exc: BaseException) -> None:
        """Stop the run where it is, with nothing more recorded and agents left running
        (``exc``, e.g. ``RuntimeUnavailableError``, is what the run ends with): not a step
        failure; the execution resumes later."""
        if self._fatal is None:
            self._fatal = exc
            self._wakeup()

    def lease_lost(self, why: str) -> None:
        """Another process took the execution over: stop before the next side effect."""
        if self._fatal is None:
            self._fatal = LeaseLostError(f"execution {self.execution_id}: {why}; this run "
                                         "stops and leaves its agents to the new holder")
            self._wakeup()

    @property
    def leaves_agents(self) -> bool:
        """Whether stopping now must leave running agents alone (to be adopted): on
        shutdown, and whenever the run stops without an outcome (lease lost, store down,
        blocked, diverged). Only a cancel, a failure or a timeout stops agents."""
        return self.engine.is_shutting_down or self._fatal is not None or self._suspended

    def check_alive(self) -> None:
        """Raise through user code if the execution must stop."""
        if self._fatal is not None:
            raise _Aborted()

    def diverged(self, exc: NonDeterminismError) -> NonDeterminismError:
        """Note a divergence; the execution stops even if user code swallows the error."""
        if self._fatal is None:
            self._fatal = exc
            self._wakeup()
        return exc

    @property
    def secret_refs(self) -> Redactor:
        """Replaces every secret value this run holds (given, or served by the fallback)
        by its ``[secret:NAME]`` reference: commands are compared in that form."""
        store = self.secret_store
        if self._refs is None or self._refs_served != len(store.served):
            known = {**{k: v for k, v in store.served.items() if v}, **store.given}
            self._refs, self._refs_served = Redactor(known), len(store.served)
        return self._refs

    def caught_up(self, key: CommandKey) -> None:
        """The attempt ``key`` re-ran its last recorded command (or ended)."""
        if key in self._catching_up:
            self._catching_up.discard(key)
            self._wakeup()

    def request_cancel(self, reason: str = "") -> None:
        """Ask the scheduler to cancel (from the client, or seen in the store)."""
        self._cancel_reason = reason
        self._cancel_wanted = True
        self._wakeup()

    def log_user(self, level: str, message: str, rt: StepRuntime, fields: dict[str, Any]) -> None:
        """Send a ``ctx.log`` line to structlog: the message redacted, the fields (checked
        by ``ctx.log``: they hold no secret) as they are."""
        getattr(self._log, level)(self.redactor.text(message), step=rt.step.name,
                                  instance=rt.instance, attempt=rt.attempt, **fields)

    # the loop -------------------------------------------------------------------------
    async def run(self) -> Outcome:
        """Run the execution to its end, or until this run must stop; the engine's
        observer hears when the run starts and how it ended."""
        obs, started = self.engine.observer, self.h.started
        if obs is NOOP or self.h.terminal is not None or started is None:
            return await self._run()
        obs.run_started(self.execution_id, self.spec.name, resumed=self.h.progressed)
        try:
            outcome = await self._run()
        except BaseException as exc:
            obs.run_finished(self.execution_id, self.spec.name, outcome=run_stop_reason(exc),
                             duration=None)
            raise
        obs.run_finished(self.execution_id, self.spec.name, outcome=outcome.status,
                         duration=max(0.0, self.clock.now() - started.ts))
        return outcome

    async def _run(self) -> Outcome:
        from .engine import Outcome

        if self.h.terminal is not None:
            return Outcome.from_event(self.execution_id, self.h.terminal)
        if self.h.progressed:
            diverged = shape_divergence(self.h)
            if diverged is not None:
                raise diverged  # before anything is recorded: the history stays as it was
        elif self.h.patches is None and self.code_patches:
            # the first run of the execution: its code's patches are the execution's
            self.emit(PatchesDeclared(ts=self.clock.now(), patches=sorted(self.code_patches)))
        self._init_scheduler()
        deadline_task = (
            asyncio.ensure_future(self.clock.sleep_until(self.deadline))
            if self.deadline is not None else None
        )
        try:
            await self._replay_in_flight()
            while True:
                if self._fatal is not None:
                    raise _Aborted()
                self._check_interrupts(deadline_task)
                next_retry = self._schedule()
                if self._fatal is not None:
                    raise _Aborted()
                if not self._tasks and not self._starting and next_retry is None:
                    break
                if self.engine.draining and not self._tasks:
                    # the running attempts are done and a new one would start (or a retry
                    # is awaited): hand the execution back to whoever claims it next
                    raise _Suspend(None)
                if self._must_flush():
                    await self.flush()  # outcomes are durable before dependants run
                if not self.engine.draining:  # draining: no new attempt starts here
                    self._launch_started()
                if not self._tasks and next_retry is None:
                    continue  # what was to start was stopped instead: decide again
                await self._wait(next_retry, deadline_task)
            return await self._finish()
        except _Suspend as suspend:
            children = {c for t, c in self._awaited.items() if t in self._tasks}
            self._suspended = True  # the sleeping instances are dropped, agents left alone
            await self._cancel_tasks()
            if suspend.wake_at is None:
                await self.flush()
                self._log.info("execution_handed_back")
                raise ExecutionSuspended(self.execution_id, None) from None
            await self.flush(wake_at=suspend.wake_at)
            wake_at = suspend.wake_at
            if await self._woken_meanwhile(children):
                try:
                    if await self.store.wake(self.execution_id):
                        wake_at = self.clock.now()
                except StoreError:
                    pass  # claimed again at the wake-up time written
            self._log.info("execution_suspended", wake_at=wake_at,
                           waiting_for=sorted(children))
            raise ExecutionSuspended(self.execution_id, wake_at) from None
        except _Aborted:
            await self._cancel_tasks()
            assert self._fatal is not None
            if isinstance(self._fatal, ExecutionBlockedError):
                await self._suspend(self._fatal)
            raise self._fatal from None
        except BaseException:
            await self._cancel_tasks()
            raise
        finally:
            if deadline_task is not None:
                deadline_task.cancel()
            if self._cleanups:  # (a shielded wait costs a task and four callbacks)
                await asyncio.shield(self._cleaned_up())

    async def look_at_row(self) -> None:
        """Notice a cancel requested by another process (``flow cancel``), or a lease taken
        over, from the execution's row (``Engine._watch_runs`` calls this every second)."""
        try:
            record = await self.store.get_execution(self.execution_id)
        except StoreError as exc:  # a passing store outage: the next append will tell
            self._log.warning("cancel_watch_failed", error=str(exc))
            return
        if record is None or self.finished:
            return
        if self.lease_token is not None and record.lease_token != self.lease_token:
            self.lease_lost(f"{record.lease_owner or 'another process'} acquired its lease")
        elif record.cancel_requested and not self.h.cancel_requested:
            self.request_cancel(record.cancel_reason or "requested")

    async def _suspend(self, blocked: ExecutionBlockedError) -> None:
        """Record what was done and mark the execution blocked; it resumes from here."""
        try:
            await self.flush(status=ExecutionStatus.BLOCKED,
                             error=f"blocked: waiting for secret {blocked.secret!r}")
        except _Aborted:
            return  # the store error is the fatal one now
        self._log.warning("execution_blocked", secret=blocked.secret)

    def _init_scheduler(self) -> None:
        spec, h = self.spec, self.h
        self._deps: dict[str, tuple[str, ...]] = effective_deps(spec)
        self._waiting_on: dict[str, list[str]] = {n: [] for n in spec.order}
        for name in spec.order:
            deps = self._deps[name]
            self._remaining[name] = sum(1 for d in deps if not h.steps[d].resolved)
            for d in deps:
                self._waiting_on[d].append(name)
        h.newly_resolved.clear()
        self._ready = [n for n in spec.order if self._remaining[n] == 0 and not
                       h.steps[n].resolved and h.steps[n].status == "pending"]
        self._open = [n for n in spec.order if h.steps[n].status == "running"]

    def _drain_resolved(self) -> None:
        h = self.h
        while h.newly_resolved:
            done = h.newly_resolved.pop(0)
            for m in self._waiting_on[done]:
                self._remaining[m] -= 1
                if self._remaining[m] == 0 and not h.steps[m].resolved:
                    self._ready.append(m)

    @property
    def _stopping(self) -> str | None:
        """Why no ordinary step may start any more, if so."""
        if self.h.cancel_requested:
            return "cancelled"
        if self.h.failure is not None:
            return "failed"
        return None

    def _check_interrupts(self, deadline_task: asyncio.Future[None] | None) -> None:
        if self._cancel_wanted and not self.h.cancel_requested:
            self.emit(CancelRequested(ts=self.clock.now(), reason=self._cancel_reason))
            self._log.info("execution_cancel_requested")
        if (deadline_task is not None and deadline_task.done() and self.h.failure is None
                and not self.h.cancel_requested):
            self.h.failure = ("", f"workflow {self.spec.name!r} timed out", "WorkflowTimeoutError")
        if self._stopping:
            for task, (name, _, _) in list(self._tasks.items()):
                if not self.spec.steps[name].always_run:
                    task.cancel()

    def _schedule(self) -> float | None:
        """Start what can start; return the earliest pending retry time, if any."""
        self._drain_resolved()
        h, spec = self.h, self.spec
        now = self.clock.now()
        while self._ready:
            name = self._ready.pop(0)
            self._decide(name)
            self._drain_resolved()
        next_retry: float | None = None
        running = {(n, i) for n, i, _ in self._tasks.values()}
        running.update((st.name, i) for st, i, _ in self._starting)
        self._open = [n for n in self._open if h.steps[n].status == "running"]
        for name in list(self._open):
            st = h.steps[name]
            if st.status != "running":
                continue
            step = spec.steps[name]
            stopping = self._stopping and not step.always_run
            limit = step.max_workers or st.total if step.parallel else 1
            active = 0
            for i, inst in st.instances.items():
                if inst.status in ("running", "retry_wait", "retrying"):
                    active += 1
                if inst.status == "running" and (name, i) not in running:
                    if stopping:
                        self._fail_instance(step, i, inst.attempt, "cancelled",
                                            "ExecutionStopped", final=True)
                    else:
                        self._start_task(step, i, inst.attempt)  # in flight: replay it
                elif inst.status == "retrying" and not stopping:
                    # crashed between a failed attempt and its retry being scheduled
                    self.emit(StepRetryScheduled(
                        ts=now, step=name, instance=i, attempt=inst.attempt,
                        retry_at=now + self._policy(step).delay(inst.attempt)))
                    next_retry = min(next_retry or now, now)
                elif inst.status == "retry_wait":
                    assert inst.retry_at is not None
                    if stopping:
                        self._fail_instance(step, i, inst.attempt, inst.error or "failed",
                                            inst.error_type or "Exception", final=True)
                    elif inst.retry_at <= now:
                        self._start_instance(step, i, inst.attempt + 1, st.total)
                    else:
                        next_retry = min(next_retry or inst.retry_at, inst.retry_at)
            while st.started < st.total and active < limit and not stopping:
                self._start_instance(step, st.started, 1, st.total)
                active += 1
            if stopping and st.started < st.total and not any(
                    i.status in ("running", "retry_wait", "retrying")
                    for i in st.instances.values()):
                self.emit(StepSkipped(ts=now, step=name,
                                      reason=f"execution {self._stopping}: "
                                      f"{st.total - st.started} instances not run"))
        self._drain_resolved()
        if self._ready:
            return self._schedule()
        return next_retry

    def _decide(self, name: str) -> None:
        """A step whose dependencies are resolved: skip it or start it. The event that
        says which carries the step's ``depends_on``, for replays to check."""
        h, step = self.h, self.spec.steps[name]
        now = self.clock.now()
        deps = list(step.depends_on)
        stopping = self._stopping
        if stopping and not step.always_run:
            self.emit(StepSkipped(ts=now, step=name, reason=f"execution {stopping}",
                                  depends_on=deps))
            return
        if not step.always_run:
            for d in step.depends_on:
                if h.steps[d].status == "skipped":
                    self.emit(StepSkipped(ts=now, step=name, depends_on=deps,
                                          reason=f"upstream step {d!r} was skipped"))
                    return
        if step.when is not None:
            try:
                ok = step.when(self._upstream(step)) if step.when_arity else step.when()
            except Exception as exc:
                self._fail_undecided(step, f"when= condition raised {exc!r}",
                                     type(exc).__name__)
                return
            if not ok:
                self.emit(StepSkipped(ts=now, step=name, reason="when= condition was false",
                                      depends_on=deps))
                return
        total = step.static_instances
        if step.dynamic:
            items = self._dynamic_items(step)
            if items is None:
                return
            total = len(items)
        if total == 0:
            self.emit(StepStarted(ts=now, step=name, instance=0, attempt=0, total=0,
                                  depends_on=deps))
            return
        limit = step.max_workers or total if step.parallel else 1
        for i in range(min(total, limit)):
            self._start_instance(step, i, 1, total, depends_on=deps if i == 0 else None)

    def _dynamic_items(self, step: StepSpec) -> list[Any] | None:
        source = next(b.dep for b in step.bindings if b.source == "item")
        assert source is not None
        items = values.load(self.h.step_result_tree(source))
        if isinstance(items, tuple):
            items = list(items)
        if not isinstance(items, list):
            self._fail_undecided(
                step, f"dynamic step {step.name!r} needs a list from step {source!r}, "
                f"got {type(items).__name__}", "TypeError")
            return None
        return items

    def _fail_undecided(self, step: StepSpec, error: str, error_type: str) -> None:
        """Fail a step before any instance ran (its inputs were unusable)."""
        self.emit(StepStarted(ts=self.clock.now(), step=step.name, total=1,
                              depends_on=list(step.depends_on)))
        self._fail_instance(step, 0, 1, error, error_type, final=True)

    def _upstream(self, step: StepSpec) -> Any:
        if len(step.depends_on) == 1:
            return values.load(self.h.step_result_tree(step.depends_on[0]))
        return {d: values.load(self.h.step_result_tree(d)) for d in step.depends_on}

    def _start_instance(self, step: StepSpec, instance: int, attempt: int, total: int,
                        depends_on: list[str] | None = None) -> None:
        now = self.clock.now()
        if self.h.steps[step.name].status == "pending":
            self._open.append(step.name)
        deadline = now + step.timeout if step.timeout is not None else None
        self.emit(StepStarted(ts=now, step=step.name, instance=instance, attempt=attempt,
                              total=total, deadline=deadline, depends_on=depends_on))
        self._new_attempts.add((step.name, instance, attempt))
        self._start_task(step, instance, attempt)

    def _start_task(self, step: StepSpec, instance: int, attempt: int) -> None:
        """Queue an attempt to run; it starts once what precedes it is durable."""
        self._starting.append((step, instance, attempt))

    async def _replay_in_flight(self) -> None:
        """On resume, re-run the attempts that were in flight up to their last recorded
        command before anything else starts, and make nothing new durable meanwhile: code
        that diverged from what they recorded stops the run with the history untouched."""
        h = self.h
        if self.engine.draining:
            return
        for name in self._open:
            step = self.spec.steps[name]
            if self._stopping and not step.always_run:
                continue  # failed by the scheduler instead, without running
            for i, inst in h.steps[name].instances.items():
                key = (name, i, inst.attempt)
                if inst.status == "running" and h.commands.get(key):
                    self._catching_up.add(key)
                    self._start_task(step, i, inst.attempt)
        if not self._catching_up:
            return
        self._caught_up.clear()
        try:
            self._launch_started()
            while self._catching_up and self._fatal is None:
                for task, key in self._tasks.items():
                    if task.done():  # ended (or failed) before its last recorded command
                        self._catching_up.discard(key)
                if not self._catching_up:
                    break
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._waiter = None
        finally:
            self._catching_up.clear()
            self._caught_up.set()

    def _launch_started(self) -> None:
        """Start the attempts queued by ``_start_task``.

        Each attempt's first step runs here and now, in a context of its own as in a task
        (``eager``): an attempt that ends without waiting (a step that only computes) costs
        no task and no turn of the event loop. One that waits goes on in a task; what its
        first step noted under a stand-in (a sleep, a child awaited) moves to that task.
        """
        starting, self._starting = self._starting, []
        for step, instance, attempt in starting:
            if self._stopping and not step.always_run:  # stopped while being flushed
                self._fail_instance(step, instance, attempt, "cancelled", "ExecutionStopped",
                                    final=True)
                continue
            first = self._first_step = _FirstStep()
            try:
                task = eager(self._observed_attempt(step, instance, attempt),
                             contextvars.copy_context())
            finally:
                self._first_step = None
            if isinstance(task, asyncio.Task):
                task.add_done_callback(self._attempt_ended)
                self._adopt(first, task)
            self._tasks[task] = (step.name, instance, attempt)

    def _adopt(self, first: _FirstStep, task: asyncio.Task[Any]) -> None:
        """What an attempt's first step noted under its stand-in ``first`` is its task's."""
        if first in self._sleeping:
            self._sleeping[task] = self._sleeping.pop(first)
        if first in self._awaited:
            self._awaited[task] = self._awaited.pop(first)
        for body, attempt in self._bodies.items():
            if attempt is first:
                self._bodies[body] = task

    def arguments(self, step: StepSpec, instance: int) -> tuple[dict[str, Any], Any]:
        """The keyword arguments of a step instance's call, and its item (dynamic steps):
        upstream results, its index, its item or the list to reduce, as bound at decoration.
        """
        h = self.h
        kwargs: dict[str, Any] = {}
        item = None
        for b in step.bindings:
            if b.source == "index":
                kwargs[b.param] = instance
                continue
            assert b.dep is not None
            value = values.load(h.step_result_tree(b.dep))
            if b.source == "item":
                item = value = value[instance]
            elif b.source == "results" and not isinstance(value, list):
                value = [value]
            kwargs[b.param] = value
        return kwargs, item

    async def _observed_attempt(self, step: StepSpec, instance: int,
                                attempt: int) -> tuple[str, Any]:
        """``_run_instance``, with the engine's observer told when the body starts and how
        it ended (called here, in the attempt's own task: a tracer can make its span the
        current one for what the body does)."""
        key = (step.name, instance, attempt)
        obs = self.engine.observer
        if obs is NOOP:
            self._new_attempts.discard(key)
            try:
                return await self._run_instance(step, instance, attempt)
            finally:
                self._ending()
        ref = AttemptRef(self.execution_id, self.spec.name, *key)
        resumed = key not in self._new_attempts
        self._new_attempts.discard(key)
        obs.step_attempt_started(ref, resumed=resumed)
        t0 = time.perf_counter()
        outcome, error_type = "aborted", None
        try:
            result = await self._run_instance(step, instance, attempt)
            outcome, error_type = attempt_outcome(result)
            return result
        except asyncio.CancelledError:
            outcome = "interrupted" if self.leaves_agents else "cancelled"
            raise
        finally:
            obs.step_attempt_finished(ref, outcome=outcome, error_type=error_type,
                                      seconds=time.perf_counter() - t0)
            self._ending()

    async def _run_instance(self, step: StepSpec, instance: int, attempt: int) -> tuple[str, Any]:
        """Run one attempt; returns ("ok", tree), ("error", exception) or ("blocked",
        secret name)."""
        h = self.h
        st = h.steps[step.name]
        kwargs, item = self.arguments(step, instance)
        snapshot = h.snapshots.get((step.name, instance, attempt), h.state)
        rt = StepRuntime(self, step, instance, st.total, attempt, item, snapshot)
        ctx = self.engine.context_factory(rt)
        deadline = st.instances[instance].deadline
        missing: list[str] = []
        _MISSING.set(missing)
        try:
            coro = step.fn(self.workflow, ctx, **kwargs)
            if deadline is None:
                result = await coro
            else:
                result = await self._with_deadline(coro, deadline, step)
            if self._fatal is not None:
                raise _Aborted()
            if missing:  # it read a secret it did not get: its result cannot be trusted
                return ("blocked", missing[0])
            rt.check_finished()
            tree = values.dump(result, where=f"result of step {step.name!r}",
                               secrets=self.redactor.scanner)
            return ("ok", tree)
        except asyncio.CancelledError:
            if not self.leaves_agents:  # cancelled, failed or timed out: stop, then clean up
                for handle in rt.handles:
                    if not handle.done:
                        await self.runtime.stop(handle.id)
                        self.after_flush(functools.partial(self.runtime.remove, handle.id))
            raise
        except _Aborted:
            raise
        except Exception as exc:
            if missing:
                return ("blocked", missing[0])
            return ("error", exc)

    async def _with_deadline(self, coro: Any, deadline: float, step: StepSpec) -> Any:
        attempt = self._attempt_task()
        body = asyncio.ensure_future(coro)
        if attempt is not None:  # its sleeps and child waits are the attempt's
            self._bodies[body] = attempt
        timer = asyncio.ensure_future(self.clock.sleep_until(deadline))
        try:
            await asyncio.wait({body, timer}, return_when=asyncio.FIRST_COMPLETED)
            if body.done():
                return body.result()
            body.cancel()
            try:
                await body
            except asyncio.CancelledError:
                pass
            raise StepTimeoutError(
                f"step {step.name!r} timed out after {step.timeout:g}s (timeout= on @step)")
        finally:
            timer.cancel()
            if not body.done():
                body.cancel()
                await asyncio.gather(body, return_exceptions=True)
            self._bodies.pop(body, None)

    def _ending(self) -> None:
        """The calling attempt's coroutine returns (or raises): wake the scheduler now,
        not from the task's done callback, which would cost a turn of the loop more per
        step and, queued meanwhile, keep the loop from looking idle to the store (which
        then hands the next commit to a thread). The task is done before the scheduler
        runs, in a later turn."""
        task = asyncio.current_task()
        if task is not None and self._first_step is None:  # (in a first step: no task yet)
            task.remove_done_callback(self._attempt_ended)
        self._wakeup()

    def _attempt_ended(self, task: asyncio.Task[Any]) -> None:
        """An attempt's task is done without having said so (``_ending``): cancelled
        before it started, its coroutine never ran."""
        self._wakeup()

    def _wakeup(self, *_: object) -> None:
        """Wake the scheduler loop (an instance finished, a cancel or a fatal error)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _attempt_task(self) -> _Attempt | None:
        """The task of the attempt the caller runs in (its own, or its body's), or the
        stand-in of an attempt whose first step ``_launch_started`` is running."""
        if self._first_step is not None:
            return self._first_step
        task = asyncio.current_task()
        return None if task is None else self._bodies.get(task, task)

    def sleeping(self, fire_at: float) -> None:
        """The calling instance waits for a durable timer until ``fire_at``."""
        task = self._attempt_task()
        if task is not None:
            self._sleeping[task] = fire_at
            if self.engine.suspend_after is not None:
                self._wakeup()  # the scheduler decides whether to let the execution go

    def awake(self) -> None:
        """The calling instance no longer sleeps (nor waits for a child)."""
        task = self._attempt_task()
        if task is not None:
            self._sleeping.pop(task, None)
            self._awaited.pop(task, None)

    async def wait_for_child(self, child_id: str) -> Outcome:
        """How the child execution ended, waiting for it.

        Under a suspending engine (a worker's) the child runs on whichever worker claims
        it, and the calling instance counts as asleep meanwhile: when every in-flight
        instance sleeps or waits for a child, the execution is let go (see
        ``_suspend_until``), to be woken when the child ends (``Engine._wake``), or after
        ``Engine.child_check_back`` seconds at the latest.
        """
        after = self.engine.suspend_after
        if after is None:  # the child runs in this process (``Engine.ensure_child``)
            return await self.engine.wait_outcome(child_id)
        record = await self.store.get_execution(child_id)
        if record is not None and record.status.is_terminal:  # e.g. what woke this run
            return await self.engine.wait_outcome(child_id, follow=True)
        task = self._attempt_task()
        if task is not None:
            self._awaited[task] = child_id
        self.sleeping(self.clock.now() + max(self.engine.child_check_back, after))
        try:
            return await self.engine.wait_outcome(child_id, follow=True)
        finally:
            self.awake()

    async def _woken_meanwhile(self, children: set[str]) -> bool:
        """After letting go: whether a cancel was asked, or one of the awaited ``children``
        ended, while the wake-up time was being written (its wake-up may have come before
        ours, and been overwritten by it)."""
        if self._cancel_wanted:
            return True
        for child_id in sorted(children):
            try:
                record = await self.store.get_execution(child_id)
            except StoreError:
                return True  # cannot tell: be claimed again rather than wait
            if record is None or record.status.is_terminal:
                return True
        return False

    def _suspend_until(self, next_retry: float | None) -> float | None:
        """When to wake, if this run may let go of the execution now: the engine suspends
        (a worker's does), every in-flight instance sleeps in ``ctx.sleep`` or waits for a
        child workflow (``wait_for_child``) itself, and nothing (timer, check-back, retry,
        step or workflow deadline) is due within ``suspend_after``."""
        after = self.engine.suspend_after
        if after is None or self._starting or self._fatal is not None or self._cancel_wanted:
            return None
        if any(task not in self._sleeping for task in self._tasks):
            return None
        due = [self._sleeping[t] for t in self._tasks]
        if next_retry is not None:
            due.append(next_retry)
        if self.deadline is not None:
            due.append(self.deadline)
        for name, instance, _attempt in self._tasks.values():
            deadline = self.h.steps[name].instances[instance].deadline
            if deadline is not None:
                due.append(deadline)
        if not due:
            return None  # nothing would wake it
        wake = min(due)
        return wake if wake - self.clock.now() >= after else None

    async def _wait(self, next_retry: float | None,
                    deadline_task: asyncio.Future[None] | None) -> None:
        if any(t.done() for t in self._tasks) or self._fatal is not None or (
                self._cancel_wanted and not self.h.cancel_requested):
            await self._collect()
            return
        wake = self._suspend_until(next_retry)
        if wake is not None:
            raise _Suspend(wake)
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        timers: set[asyncio.Future[Any]] = set()
        if next_retry is not None:
            timers.add(asyncio.ensure_future(self.clock.sleep_until(next_retry)))
        if deadline_task is not None and not deadline_task.done():
            timers.add(deadline_task)
        try:
            if timers:
                await asyncio.wait({waiter, *timers}, return_when=asyncio.FIRST_COMPLETED)
            else:
                await waiter
        finally:
            self._waiter = None
            for timer in timers:
                if timer is not deadline_task:
                    timer.cancel()
        await self._collect()

    async def _collect(self) -> None:
        """Turn finished instance tasks into events."""
        for task in [t for t in self._tasks if t.done()]:
            name, instance, attempt = self._tasks.pop(task)
            step = self.spec.steps[name]
            if self._fatal is not None:
                continue  # the execution stops here; nothing more is recorded
            if task.cancelled():
                reason = "cancelled" if self.h.cancel_requested else "stopped: execution failed"
                self._fail_instance(step, instance, attempt, reason, "ExecutionStopped",
                                    final=True)
                continue
            exc = task.exception()
            if exc is not None:
                if self._fatal is None:
                    self._fatal = exc
                continue
            kind, value = task.result()
            if kind == "blocked":
                if self._fatal is None:
                    self._fatal = ExecutionBlockedError(self.execution_id, value)
                continue
            if kind == "ok":
                self.emit(StepCompleted(ts=self.clock.now(), step=name, instance=instance,
                                        attempt=attempt, result=value))
            else:
                self._handle_error(step, instance, attempt, value)

    def _policy(self, step: StepSpec) -> RetryPolicy:
        return step.retry_policy or self.spec.retry_policy

    def _handle_error(self, step: StepSpec, instance: int, attempt: int,
                      exc: BaseException) -> None:
        policy = self._policy(step)
        message = values.safe_text(self.redactor.text(str(exc) or type(exc).__name__))
        retryable = policy.is_retryable(exc)
        if retryable and attempt < policy.max_attempts and not self._stopping:
            now = self.clock.now()
            self._fail_instance(step, instance, attempt, message, type(exc).__name__,
                                final=False)
            self.emit(StepRetryScheduled(ts=now, step=step.name, instance=instance,
                                         attempt=attempt, retry_at=now + policy.delay(attempt)))
            self._log.info("step_retry_scheduled", step=step.name, instance=instance,
                           attempt=attempt, error=message)
            return
        self._fail_instance(step, instance, attempt, message, type(exc).__name__, final=True,
                            retryable=retryable)
        self._log.warning("step_failed", step=step.name, instance=instance, attempt=attempt,
                          error_type=type(exc).__name__, error=message)

    def _fail_instance(self, step: StepSpec, instance: int, attempt: int, error: str,
                       error_type: str, *, final: bool, retryable: bool = False) -> None:
        self.emit(StepFailed(ts=self.clock.now(), step=step.name, instance=instance,
                             attempt=attempt, error=values.safe_text(error),
                             error_type=values.safe_text(error_type), final=final,
                             retryable=retryable))

    async def _cancel_tasks(self) -> None:
        self._starting.clear()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    async def _cancel_open_children(self) -> None:
        """A cancelled execution cancels the children its interrupted attempts started.

        The step waiting for a child cancels it when it is interrupted; this also reaches
        a child whose step was interrupted elsewhere (a resumed run cancelled before the
        step was back waiting, e.g. a parent cancelled while it was let go)."""
        for child_id in _open_children(self.h):
            try:
                await self.engine.cancel(child_id, "its parent was cancelled")
            except StoreError as exc:
                self._log.warning("child_cancel_failed", child_id=child_id, error=str(exc))

    async def _finish(self) -> Outcome:
        from .engine import Outcome

        h = self.h
        if h.cancel_requested:
            await self._cancel_open_children()
        now = self.clock.now()
        if h.cancel_requested:
            ev: Event = ExecutionCancelled(ts=now, reason=h.cancel_reason)
            status = ExecutionStatus.CANCELLED
            error: str | None = f"cancelled{': ' + h.cancel_reason if h.cancel_reason else ''}"
        elif h.failure is not None:
            step, message, error_type = h.failure
            where = f"step {step!r} failed: " if step else ""
            ev = ExecutionFailed(ts=now, error=f"{where}{message}", error_type=error_type,
                                 step=step or None)
            status, error = ExecutionStatus.FAILED, f"{where}{message}"
        else:
            sinks = self.spec.sinks
            if len(sinks) == 1:
                result = h.step_result_tree(sinks[0])
            else:
                result = {s: h.step_result_tree(s) for s in sinks}
            ev = ExecutionCompleted(ts=now, result=result)
            status, error = ExecutionStatus.COMPLETED, None
        self.emit(ev)
        await self.flush(status=status, error=error)
        self.finished = True
        self._log.info("execution_finished", status=status.value)
        return Outcome.from_event(self.execution_id, ev)


class _FirstStep:
    """Stands for an attempt's task while its first step runs outside any task
    (``Runner._launch_started``)."""

    __slots__ = ()


#: how the runner knows an attempt: its task, or the stand-in of its first step
_Attempt = asyncio.Future[Any] | _FirstStep


def _open_children(h: ExecutionState) -> list[str]:
    """The children started by attempts that did not complete and whose outcome the
    history does not hold (a child a completed step left running is left alone)."""
    out: list[str] = []
    for (name, instance, attempt), by_index in h.commands.items():
        inst = h.steps[name].instances.get(instance) if name in h.steps else None
        if inst is not None and inst.attempt == attempt and inst.status == "completed":
            continue
        for events in by_index.values():
            if isinstance(events[0], ChildWorkflowStarted) and not any(
                    isinstance(e, ChildWorkflowCompleted) for e in events):
                out.append(events[0].child_id)
    return out


def _redact_event(event: Event, redactor: Redactor) -> Event:
    """``event`` with secret values replaced in its text for people (``Redactor.event``)."""
    return redactor.event(event)

