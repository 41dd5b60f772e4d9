"""``WorkflowClient``: the embedded engine behind the seed's client API."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from agentainer_flow.engine import Clock, Engine, values
from agentainer_flow.engine.durations import Duration, parse_duration
from agentainer_flow.engine.engine import FORKED_FROM_STEP_TAG, FORKED_FROM_TAG, KEEP
from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.reaper import Reaped, reap_agents
from agentainer_flow.engine.runtimes.base import AgentRuntime
from agentainer_flow.engine.spec import get_workflow_version
from agentainer_flow.store import (
    DEFAULT_QUEUE,
    WATCH_SECONDS,
    EventStore,
    ExecutionNotFoundError,
    ExecutionRecord,
    ExecutionStatus,
    QueueConfig,
    create_store,
)
from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.events import StateSet

from ._context import Context
from ._events import ExecutionEvent
from ._queues import Queue, check_priority, check_queue_name

log = get_logger("agentainer_flow.client")

#: seconds a client trusts the queue limits it read (for ``run_workflow(queue="name")``)
_QUEUE_CONFIG_TTL = 5.0

__all__ = [
    "DEFAULT_STORE",
    "ExecutionMode",
    "ForkOrigin",
    "WorkflowClient",
    "WorkflowExecution",
    "WorkflowMetrics",
]

DEFAULT_STORE = "sqlite:///.flow/flow.db"


class ExecutionMode(enum.Enum):
    """``SYNC``: ``run_workflow`` returns when the execution ended. ``ASYNC``: at once."""

    SYNC = "sync"
    ASYNC = "async"


@dataclass(frozen=True, kw_only=True)
class ForkOrigin:
    """What a forked execution was forked from: the execution, and the step from which
    on it ran again (see ``WorkflowClient.fork``)."""

    execution_id: str
    step: str


@dataclass(frozen=True, kw_only=True)
class WorkflowMetrics:
    """Aggregates over a workflow's executions in a time range."""

    workflow_name: str
    time_range: str
    total_executions: int
    completed: int
    failed: int
    cancelled: int
    running: int
    success_rate: float  # percent of finished executions that completed
    avg_duration: float | None  # seconds, over finished executions


def make_runtime(
    runtime: str | AgentRuntime | None, *, store_url: str = "", **options: Any
) -> AgentRuntime:
    """The agent runtime a name stands for: ``process`` (default), ``docker`` or ``mock``.

    The ``process`` runtime keeps its agents where the store at ``store_url`` is (see
    ``default_agent_root``), so every engine of one store finds them; ``root=`` wins."""
    if isinstance(runtime, AgentRuntime):
        return runtime
    name = (runtime or os.environ.get("FLOW_RUNTIME") or "process").lower()
    if name == "process":
        from agentainer_flow.engine.runtimes.process import ProcessRuntime, default_agent_root

        if options.get("root") is None and store_url:
            options["root"] = default_agent_root(store_url)
        return ProcessRuntime(**options)
    if name == "docker":
        from agentainer_flow.engine.runtimes.docker import DockerRuntime

        if options.get("images"):
            raise ConfigurationError(
                "images= maps container images to local commands for the process runtime; "
                "the docker runtime runs the images themselves: drop images= (or --image) or "
                "use runtime='process'"
            )
        options.pop("images", None)
        options.pop("root", None)
        return DockerRuntime(**options)
    if name == "mock":
        from agentainer_flow.engine.runtimes.mock import MockRuntime

        return MockRuntime()
    raise ConfigurationError(
        f"unknown agent runtime {name!r}: use 'process' (local subprocesses), 'docker' "
        "(containers on a Docker engine) or 'mock' (tests)"
    )


class WorkflowClient:
    """Starts, resumes, watches and cancels executions, running them in this process.

    ``store`` is a URL (``sqlite:///path.db``, ``postgresql://user@host/db``,
    ``memory://``) or an ``EventStore``; it defaults to ``$FLOW_STORE``, else
    ``sqlite:///.flow/flow.db``. ``runtime`` is ``"process"`` (default), ``"docker"``,
    ``"mock"`` or an ``AgentRuntime``; ``images`` maps container images to local commands for
    the process runtime. Use as ``async with WorkflowClient(...) as client`` or call ``close()``.
    """

    def __new__(cls, store: str | EventStore | None = None, *args: Any,
                api_url: str | None = None, api_token: str | None = None,
                **kwargs: Any) -> Any:
        """With ``api_url``/``api_token`` (or ``$AGENTAINER_API_URL`` and no store): a client
        of a ``flow server`` (``RemoteWorkflowClient``), with the same methods."""
        from ._remote import remote_client_for

        remote = remote_client_for(store, api_url, api_token)
        return remote if remote is not None else super().__new__(cls)

    def __init__(
        self,
        store: str | EventStore | None = None,
        runtime: str | AgentRuntime | None = None,
        *,
        images: Mapping[str, Sequence[str]] | None = None,
        clock: Clock | None = None,
        api_url: str | None = None,
        api_token: str | None = None,
        **engine_options: Any,
    ) -> None:
        url = store if store is not None else os.environ.get("FLOW_STORE") or DEFAULT_STORE
        self.store: EventStore = create_store(url) if isinstance(url, str) else url
        runtime_options = {"images": images} if images else {}
        self.runtime = make_runtime(
            runtime, store_url=url if isinstance(url, str) else self.store.url, **runtime_options
        )
        self.engine = Engine(self.store, self.runtime, clock=clock, context_factory=Context,
                             **engine_options)
        self._opened = False
        self._open_lock: asyncio.Lock | None = None
        self._queue_configs: dict[str, tuple[float, QueueConfig]] = {}

    # lifecycle --------------------------------------------------------------------------
    async def open(self) -> Self:
        """Connect the store (creating or migrating its schema) and the runtime."""
        if self._opened:
            return self
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if not self._opened:
                await self.store.open()
                try:
                    await self.runtime.open()
                except BaseException:  # e.g. no Docker engine: leave nothing open
                    await self.store.close()
                    raise
                self._opened = True
        return self

    async def close(self) -> None:
        """Stop executions running in this process (they stay resumable) and disconnect."""
        if not self._opened:
            return
        await self.engine.shutdown()
        await self.runtime.close()
        await self.store.close()
        self._opened = False

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # running ----------------------------------------------------------------------------
    async def run_workflow(
        self,
        workflow: object,
        mode: ExecutionMode = ExecutionMode.SYNC,
        *,
        input: Any = None,
        secrets: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        execution_id: str | None = None,
        queue: str | Queue | None = None,
        priority: int = 0,
    ) -> WorkflowExecution:
        """Start an execution of ``workflow`` (an instance of a ``@workflow`` class).

        With an ``idempotency_key`` (or ``execution_id``) already used, returns that
        execution instead of starting another. ``SYNC`` waits for the end (a failure is
        raised by ``get_result``, not here); ``ASYNC`` returns at once.

        With ``queue`` the execution is recorded for the workers of that queue (``flow
        worker --queue NAME`` or ``Worker``) instead of running in this process; higher
        ``priority`` runs first. A ``Queue`` object also writes its limits to the store.
        The caller can still ``get_result()``, ``stream_events()`` and ``cancel()`` it.
        """
        await self.open()
        if queue is not None:
            return await self._enqueue(workflow, mode, queue, priority, input=input,
                                       secrets=secrets, tags=tags,
                                       idempotency_key=idempotency_key,
                                       execution_id=execution_id)
        record, created = await self.engine.start(
            workflow, input=input, tags=tags, secrets=secrets,
            idempotency_key=idempotency_key, execution_id=execution_id)
        execution = WorkflowExecution(self, record.id)
        if created or not record.status.is_terminal:
            task = self.engine.launch(record.id, secrets=secrets,
                                      workflow=workflow if created else None)
            if mode is ExecutionMode.SYNC:
                # how it ended (failed, blocked, stopped) is for get_result() to raise
                await asyncio.wait([task])
        return execution

    async def _enqueue(self, workflow: object, mode: ExecutionMode, queue: str | Queue,
                       priority: int, **start: Any) -> WorkflowExecution:
        """Record the execution for a queue's workers; with ``SYNC``, wait for its end.

        The engine forgets it at once: whichever worker claims it (in this process or
        another) reads it back from the store with the lease it took, and its secrets
        from the store (``FLOW_SECRETS_KEY``) or ``FLOW_SECRET_<NAME>``, as any worker does.
        """
        priority = check_priority(priority)
        stored_queue, key = await self._queue_for(queue, start.get("tags"))
        record, created = await self.engine.start(
            workflow, run_here=False, queue=stored_queue, priority=priority,
            concurrency_key=key, **start)
        if created:
            self._forget_queued(record.id)
        execution = WorkflowExecution(self, record.id)
        if mode is ExecutionMode.SYNC:
            await self.engine.wait_outcome(record.id)
        return execution

    def _forget_queued(self, execution_id: str) -> None:
        """Drop what ``Engine.start`` kept to run a new execution here (its workflow object
        and secrets): a queued one runs on a worker. Kept, it would grow without end in a
        process that starts executions all day (``flow server``).

        Unlike ``Engine._let_go`` (a fork handing over the lease it took), nothing is
        released: a queued start takes no lease, and a release by this engine's owner id
        would drop the claim a ``Worker`` of this process may have made meanwhile. An
        execution this engine already runs (a worker of this process claimed it while
        it was being recorded) keeps what its run uses.
        """
        self.engine.forget_start(execution_id)

    async def _queue_for(self, queue: str | Queue,
                         tags: Mapping[str, str] | None) -> tuple[str | None, str | None]:
        """The queue an execution is stored under (``None``: the default one) and its
        concurrency key (the value of the queue's ``key_tag`` among ``tags``). A ``Queue``
        object writes its limits to the store first."""
        if isinstance(queue, Queue):
            config = queue.config()
            await self.store.set_queue(config)
            name = queue.name
        else:
            name = check_queue_name(queue)
            config = await self._queue_config(name)
        str_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        key = str_tags.get(config.key_tag) if config.key_tag else None
        return (None if name == DEFAULT_QUEUE else name), key

    async def _queue_config(self, name: str) -> QueueConfig:
        """A queue's limits as the store has them, read at most every few seconds (only
        its concurrency key is needed here; the limits themselves are enforced by claims)."""
        now = time.monotonic()
        cached = self._queue_configs.get(name)
        if cached is not None and now - cached[0] < _QUEUE_CONFIG_TTL:
            return cached[1]
        found = {q.config.name: q.config for q in await self.store.list_queues()}
        for queue_name, config in found.items():
            self._queue_configs[queue_name] = (now, config)
        config = found.get(name, QueueConfig(name=name))
        self._queue_configs[name] = (now, config)
        return config

    def get_execution(self, execution_id: str) -> WorkflowExecution:
        """A handle on an existing execution."""
        return WorkflowExecution(self, execution_id)

    async def fork(
        self,
        execution_id: str,
        *,
        from_step: str,
        input: Any = KEEP,
        secrets: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        mode: ExecutionMode = ExecutionMode.SYNC,
        workflow: object | None = None,
        queue: str | Queue | None = None,
        priority: int = 0,
    ) -> WorkflowExecution:
        """Start a new execution that redoes ``execution_id`` from step ``from_step`` on.

        The new execution runs the workflow's current code (the highest version loaded, or
        ``workflow``, an instance of it, for other constructor arguments). It reuses the
        recorded results and state writes of every step that does not depend (directly or
        through others) on ``from_step`` and completed in the original: their bodies do
        not run again and their agents are not relaunched (they stay the original's).
        ``from_step`` and everything after it run with the current code. A step the
        original never reached is fine: what completed before it is reused. The original
        may have ended in any way, or still run; it is not changed.

        ``input`` defaults to the original's. Secrets are never stored in clear: those not
        given again come from ``FLOW_SECRET_<NAME>`` or, with ``FLOW_SECRETS_KEY``, the
        original's encrypted ones; a step that needs a missing one blocks the fork until it
        is resumed with it. The fork keeps the original's tags (with ``tags`` added) and
        is linked to it by the tags ``flow.forked_from`` (the original's id) and
        ``flow.forked_from_step``: see ``forked_from`` and ``forks_of``. ``mode``,
        ``queue`` and ``priority`` are as for ``run_workflow``.

        Raises ``ExecutionNotFoundError`` for an unknown id, ``StepNotFoundError`` (listing
        the steps) for a step the workflow does not have, and
        ``WorkflowNotRegisteredError`` if the workflow's code is not loaded.
        """
        await self.open()
        stored_queue: str | None = None
        key: str | None = None
        if queue is not None:
            if await self.store.get_execution(execution_id) is None:
                raise ExecutionNotFoundError(execution_id)
            first = (await self.store.load(execution_id))[0].event
            all_tags = {**getattr(first, "tags", {}), **(tags or {})}
            stored_queue, key = await self._queue_for(queue, all_tags)
        record = await self.engine.fork(
            execution_id, from_step=from_step, workflow=workflow, input=input, tags=tags,
            secrets=secrets, run_here=queue is None, queue=stored_queue,
            priority=int(priority), concurrency_key=key)
        execution = WorkflowExecution(self, record.id)
        if queue is None:
            task = self.engine.launch(record.id, secrets=secrets)
            if mode is ExecutionMode.SYNC:
                await asyncio.wait([task])  # how it ended is for get_result() to raise
        elif mode is ExecutionMode.SYNC:
            await self.engine.wait_outcome(record.id)
        return execution

    async def forked_from(self, execution_id: str) -> ForkOrigin | None:
        """Where a forked execution came from (``None`` if it is not a fork)."""
        tags = (await self.describe(execution_id)).tags
        source = tags.get(FORKED_FROM_TAG)
        if source is None:
            return None
        return ForkOrigin(execution_id=source, step=tags.get(FORKED_FROM_STEP_TAG, ""))

    async def forks_of(self, execution_id: str) -> list[ExecutionRecord]:
        """The executions forked from this one (``fork``), newest first."""
        await self.describe(execution_id)
        return await self.store.list_executions(tags={FORKED_FROM_TAG: execution_id},
                                                limit=None)

    async def resume(
        self,
        execution_id: str,
        *,
        secrets: Mapping[str, str] | None = None,
        wait: bool = True,
        takeover: bool = False,
    ) -> WorkflowExecution:
        """Resume an unfinished execution from its history in this process.

        It runs on the code of the version it was started on: the ``@workflow`` class
        declaring that name and version must be loaded (its module imported), even if a
        newer version is too. If none is, ``WorkflowVersionNotRegisteredError`` (or
        ``WorkflowNotRegisteredError`` for an unknown name) is raised at once and the
        execution is left as it is, for a process that has the code. If another live
        process runs it (holds its lease), this follows that process to the outcome, and
        takes the execution over only if that process dies or its lease expires;
        ``takeover=True`` takes it over at once (the other process is fenced out). Raises
        ``NonDeterminismError`` if the code no longer matches the history, and
        ``ExecutionBlockedError`` if a step needs a secret that is still missing.
        """
        await self.open()
        record = await self.store.get_execution(execution_id)
        if record is None:
            raise ExecutionNotFoundError(execution_id)
        if not record.status.is_terminal and execution_id not in self.engine.tasks:
            # refused before anything is touched: a process that has the code can run it
            get_workflow_version(record.workflow_name, record.workflow_version,
                                 execution_id=execution_id)
        task = self.engine.launch(execution_id, secrets=secrets, takeover=takeover)
        if wait:
            await asyncio.shield(task)
        return WorkflowExecution(self, execution_id)

    async def gc(self, *, dry_run: bool = False) -> list[Reaped]:
        """Remove the agents (containers, process directories) that crashes left behind:
        those of ended executions, and those whose outcome the history already holds.
        Agents of other stores and of running commands are never touched."""
        await self.open()
        return await reap_agents(self.store, self.engine.runtime, dry_run=dry_run)

    async def recover(
        self, *, secrets: Mapping[str, str] | None = None, wait: bool = True
    ) -> list[WorkflowExecution]:
        """Resume every unfinished top-level execution in the store (after removing the
        agents that crashes left behind, see ``gc``).

        One that cannot run (its workflow, or the version it was started on, is not
        loaded; a secret is missing; its code diverged) does not stop the others: it is
        logged (``execution_stopped``), left unchanged in the store, and its
        ``get_result()`` in this process raises why.
        """
        await self.open()
        try:
            await self.gc()
        except Exception as exc:
            log.warning("gc_failed", error=str(exc))
        rows = await self.store.list_executions(
            statuses=[ExecutionStatus.PENDING, ExecutionStatus.RUNNING], limit=None)
        tasks = []
        out = []
        for row in rows:
            if row.parent_id is not None:
                continue  # children are resumed by their parents' commands
            tasks.append(self.engine.launch(row.id, secrets=secrets))
            out.append(WorkflowExecution(self, row.id))
        if wait and tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks), return_exceptions=True)
        return out

    async def cancel(self, execution_id: str, reason: str = "") -> bool:
        """Cancel an execution: its agents are stopped and its ``always_run`` steps run.

        Returns ``False`` if it had already finished.
        """
        await self.open()
        if await self.store.get_execution(execution_id) is None:
            raise ExecutionNotFoundError(execution_id)
        return await self.engine.cancel(execution_id, reason)

    # reading ----------------------------------------------------------------------------
    async def describe(self, execution_id: str) -> ExecutionRecord:
        """The execution's row: status, tags, times, error."""
        await self.open()
        record = await self.store.get_execution(execution_id)
        if record is None:
            raise ExecutionNotFoundError(execution_id)
        return record

    async def get_workflow_status(self, execution_id: str) -> ExecutionStatus:
        """The execution's status (a ``str`` enum: ``"completed"``, ``"running"``...)."""
        return (await self.describe(execution_id)).status

    async def list_executions(self, **filters: Any) -> list[ExecutionRecord]:
        """Executions matching the filters of ``EventStore.list_executions``, newest first."""
        await self.open()
        return await self.store.list_executions(**filters)

    async def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """Every event of the execution, in order."""
        await self.describe(execution_id)
        return [ExecutionEvent.from_stored(s) for s in await self.store.load(execution_id)]

    async def get_state(self, execution_id: str) -> dict[str, Any]:
        """The workflow state after every write recorded so far."""
        await self.describe(execution_id)
        state: dict[str, Any] = {}
        for stored in await self.store.load(execution_id):
            ev = stored.event
            if isinstance(ev, StateSet):
                if ev.deleted:
                    state.pop(ev.key, None)
                else:
                    state[ev.key] = ev.value
        return {k: values.load(v) for k, v in state.items()}

    async def get_logs(self, execution_id: str) -> list[str]:
        """Log lines: ``ctx.log`` messages, step/execution milestones and what agents
        printed (tagged with the agent's name)."""
        return [line for e in await self.get_history(execution_id) if _is_log(e)
                for line in _log_lines(e)]

    async def stream_logs(self, execution_id: str) -> AsyncIterator[str]:
        """Log lines as they are written, until the execution ends."""
        await self.describe(execution_id)
        async for stored in self.store.subscribe(execution_id):
            event = ExecutionEvent.from_stored(stored)
            if _is_log(event):
                for line in _log_lines(event):
                    yield line

    async def stream_events(
        self, execution_id: str, *, after_seq: int = 0
    ) -> AsyncIterator[ExecutionEvent]:
        """The execution's events, then new ones as they land, until it ends."""
        await self.describe(execution_id)
        async for stored in self.store.subscribe(execution_id, after_seq):
            yield ExecutionEvent.from_stored(stored)

    async def stream_workflow_events(
        self,
        workflow_name: str | None = None,
        event_types: Sequence[str] | None = None,
        *,
        since: dt.datetime | None = None,
        follow: bool = True,
        poll_interval: float = 0.25,
    ) -> AsyncIterator[ExecutionEvent]:
        """Events of every execution of ``workflow_name`` (all workflows if ``None``).

        Starts with the history of executions created since ``since`` (all by default),
        then follows new events until the caller stops iterating (or, with
        ``follow=False``, stops once caught up). ``event_types`` filters by type, as in
        ``["step_started", "step_completed", "workflow_failed"]``.
        """
        await self.open()
        wanted = set(event_types) if event_types else None
        seen: dict[str, int] = {}
        created_after = since.timestamp() if since is not None else None
        checked_at: float | None = None
        renew_at = 0.0
        while True:
            if follow and time.monotonic() >= renew_at:  # other processes: announce appends
                await self.store.watch(None)
                renew_at = time.monotonic() + WATCH_SECONDS / 3
            poll_started = self.engine.clock.now()
            rows = await self.store.list_executions(
                workflow_name=workflow_name, created_after=created_after,
                updated_after=None if checked_at is None else checked_at - 5.0, limit=None)
            for row in sorted(rows, key=lambda r: (r.created_at, r.id)):
                if row.last_seq <= seen.get(row.id, 0):
                    continue
                for stored in await self.store.load(row.id, seen.get(row.id, 0)):
                    seen[row.id] = stored.seq
                    event = ExecutionEvent.from_stored(stored)
                    if wanted is None or event.type in wanted:
                        yield event
            checked_at = poll_started
            if not follow:
                return
            await self.store.wait_for_change(None, poll_interval)

    async def get_workflow_metrics(
        self, workflow_name: str, time_range: Duration = "24h"
    ) -> WorkflowMetrics:
        """Totals, success rate (percent of finished runs) and average duration (seconds)
        of the workflow's executions created within ``time_range``."""
        await self.open()
        seconds = parse_duration(time_range, what="time_range") or 0.0
        rows = await self.store.list_executions(
            workflow_name=workflow_name, created_after=self.engine.clock.now() - seconds,
            limit=None)
        by = {s: sum(1 for r in rows if r.status is s) for s in ExecutionStatus}
        finished = [r for r in rows if r.status.is_terminal]
        durations = [d for r in finished if (d := r.duration) is not None]
        done = by[ExecutionStatus.COMPLETED]
        return WorkflowMetrics(
            workflow_name=workflow_name,
            time_range=str(time_range),
            total_executions=len(rows),
            completed=done,
            failed=by[ExecutionStatus.FAILED],
            cancelled=by[ExecutionStatus.CANCELLED],
            running=by[ExecutionStatus.RUNNING] + by[ExecutionStatus.PENDING],
            success_rate=round(100.0 * done / len(finished), 2) if finished else 0.0,
            avg_duration=sum(durations) / len(durations) if durations else None,
        )


def _is_log(event: ExecutionEvent) -> bool:
    return event.type in ("log_recorded", "agent_output", "workflow_started", "workflow_completed",
                          "workflow_failed", "workflow_cancelled", "step_completed",
                          "step_failed", "step_skipped", "step_started")


def _log_lines(event: ExecutionEvent) -> list[str]:
    """An event as log lines: one, or one per line an agent printed."""
    if event.type != "agent_output":
        return [_log_line(event)]
    ts = event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    tag = f"{ts} {'OUTPUT':<7} [{event.details.get('name', '?')}]"
    return [f"{tag} {line}" for line in event.message.split("\n")]


def _log_line(event: ExecutionEvent) -> str:
    level = event.details.get("level", "info").upper()
    if event.type in ("step_failed", "workflow_failed"):
        level = "ERROR"
    where = f" [{event.step}]" if event.step else ""
    ts = event.timestamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return f"{ts} {level:<7}{where} {event.message}"


class WorkflowExecution:
    """A handle on one execution."""

    def __init__(self, client: WorkflowClient, execution_id: str) -> None:
        self.client = client
        self.id = execution_id

    @property
    def execution_id(self) -> str:
        return self.id

    async def status(self) -> ExecutionStatus:
        return await self.client.get_workflow_status(self.id)

    async def describe(self) -> ExecutionRecord:
        return await self.client.describe(self.id)

    async def get_result(self, timeout: Duration | None = None) -> Any:
        """Wait for the end; the result, or ``WorkflowFailedError`` (``WorkflowTimeoutError``,
        ``WorkflowCancelledError``) saying why it did not complete."""
        await self.client.open()
        wait = self.client.engine.wait_outcome(self.id)
        seconds = parse_duration(timeout, what="timeout")
        outcome = await (asyncio.wait_for(wait, seconds) if seconds is not None else wait)
        return outcome.unwrap()

    async def wait(self, timeout: Duration | None = None) -> ExecutionStatus:
        """Wait for the end without raising on failure; the final status."""
        await self.client.open()
        wait = self.client.engine.wait_outcome(self.id)
        seconds = parse_duration(timeout, what="timeout")
        await (asyncio.wait_for(wait, seconds) if seconds is not None else wait)
        return await self.status()

    async def stream_events(self) -> AsyncIterator[ExecutionEvent]:
        """Events so far, then new ones as they land, until the execution ends."""
        async for event in self.client.stream_events(self.id):
            yield event

    async def history(self) -> list[ExecutionEvent]:
        return await self.client.get_history(self.id)

    async def logs(self) -> list[str]:
        return await self.client.get_logs(self.id)

    async def state(self) -> dict[str, Any]:
        return await self.client.get_state(self.id)

    async def cancel(self, reason: str = "") -> bool:
        """Cancel it (agents stopped, ``always_run`` steps still run)."""
        return await self.client.cancel(self.id, reason)

    def __repr__(self) -> str:
        return f"WorkflowExecution(id={self.id!r})"


