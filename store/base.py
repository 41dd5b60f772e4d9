"""The ``EventStore`` interface every backend implements, and its record types.

One contract (``tests/store/contract.py``) runs against every backend. An execution is a row
(status, tags, lease) plus an append-only event log numbered 1..n. Appends are optimistic:
the caller names the seq its first event must get, and the store rejects the batch if that
seq is taken, so two writers can never both extend one history.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, Self

from .errors import (
    AmbiguousExecutionIdError,
    ExecutionNotFoundError,
    HistoryCorruptedError,
    StoreNotFoundError,
)
from .events import Event, ExecutionStarted

__all__ = [
    "DEFAULT_QUEUE",
    "TERMINAL_STATUSES",
    "AmbiguousExecutionIdError",
    "AppendResult",
    "AuditedEvent",
    "EventStore",
    "ExecutionRecord",
    "ExecutionStatus",
    "NewExecution",
    "QueueConfig",
    "QueueStats",
    "StoreNotFoundError",
    "StoredEvent",
    "TokenRecord",
    "WorkerInfo",
    "admit_to_queue",
]


class ExecutionStatus(StrEnum):
    """Where an execution is in its life. ``str`` so it prints and compares as its value."""

    PENDING = "pending"
    RUNNING = "running"
    BLOCKED = "blocked"  # waiting for something only a person can give (a missing secret)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.CANCELLED}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class NewExecution:
    """What ``create_execution`` needs besides the ``ExecutionStarted`` event."""

    id: str
    workflow_name: str
    workflow_version: str = "1"
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    parent_id: str | None = None
    secrets: bytes | None = None  # encrypted at rest, never clear text
    #: the creator takes the lease at once (fencing token 1), so nobody else runs it first
    lease_owner: str | None = None
    lease_seconds: float = 0.0
    #: a queue's workers run it (no ``lease_owner`` then); higher ``priority`` first
    queue: str | None = None
    priority: int = 0
    concurrency_key: str | None = None

    def record(self, t: float, last_chain: str | None = None) -> ExecutionRecord:
        """The row ``create_execution`` inserts for it at time ``t`` (``last_chain``: the
        chain value of its event 1)."""
        return ExecutionRecord(
            id=self.id,
            workflow_name=self.workflow_name,
            workflow_version=self.workflow_version,
            status=ExecutionStatus.PENDING,
            created_at=t,
            updated_at=t,
            tags=dict(self.tags),
            idempotency_key=self.idempotency_key,
            parent_id=self.parent_id,
            last_seq=1,
            secrets=self.secrets,
            lease_owner=self.lease_owner,
            lease_expires_at=t + self.lease_seconds if self.lease_owner else None,
            lease_token=1 if self.lease_owner else 0,
            lease_renewed_at=t if self.lease_owner else None,
            last_chain=last_chain,
            queue=self.queue,
            priority=self.priority,
            concurrency_key=self.concurrency_key,
        )


DEFAULT_QUEUE = "default"

#: seconds a follower's :meth:`EventStore.watch` lasts; it renews it every third of that
WATCH_SECONDS = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """A queue's limits; ``None`` is no limit.

    ``concurrency``: executions of the queue running at once, across every worker.
    ``rate_count`` per ``rate_seconds``: executions started (first claimed) per window.
    ``key_tag`` / ``key_concurrency``: at most that many at once per value of the tag.
    """

    name: str
    concurrency: int | None = None
    rate_count: int | None = None
    rate_seconds: float | None = None
    key_tag: str | None = None
    key_concurrency: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueStats:
    """A queue's limits and load: ``pending`` (waiting for a worker), ``running`` (held by
    a live lease), ``sleeping`` (waiting for a timer, holding nothing), ``blocked`` (waiting
    for a person to resume it with a secret: no worker claims it)."""

    config: QueueConfig
    pending: int = 0
    running: int = 0
    sleeping: int = 0
    blocked: int = 0


def admit_to_queue(config: QueueConfig, queue: str, key: str | None,
                   busy: dict[tuple[str, str | None], int], recent: dict[str, int], *,
                   starts: bool = True) -> bool:
    """Whether one more execution of ``queue`` (with concurrency ``key``) fits its limits
    (the rate limit counts only executions that ``starts``, i.e. never claimed before);
    if so, count it."""
    if config.concurrency is not None and busy.get((queue, None), 0) >= config.concurrency:
        return False
    if (config.key_concurrency is not None and key is not None
            and busy.get((queue, key), 0) >= config.key_concurrency):
        return False
    if starts and config.rate_count is not None and recent.get(queue, 0) >= config.rate_count:
        return False
    busy[(queue, None)] = busy.get((queue, None), 0) + 1
    if key is not None:
        busy[(queue, key)] = busy.get((queue, key), 0) + 1
    if starts and queue in recent:
        recent[queue] += 1
    return True


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """A worker as it last reported itself (``heartbeat``)."""

    id: str
    name: str
    host: str
    pid: int
    queues: tuple[str, ...] = ()  # empty: every queue
    concurrency: int = 0
    held: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionRecord:
    """One row of the executions table."""

    id: str
    workflow_name: str
    workflow_version: str
    status: ExecutionStatus
    created_at: float
    updated_at: float
    finished_at: float | None = None
    tags: dict[str, str] = field(default_factory=dict)
    idempotency_key: str | None = None
    parent_id: str | None = None
    last_seq: int = 0
    cancel_requested: bool = False
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    wake_at: float | None = None
    error: str | None = None
    secrets: bytes | None = None
    #: fencing token of the current (or last) lease: grows at every acquisition
    lease_token: int = 0
    lease_renewed_at: float | None = None
    last_chain: str | None = None
    queue: str | None = None
    priority: int = 0
    concurrency_key: str | None = None
    first_claimed_at: float | None = None
    #: the reason given with the first cancel asked for (``request_cancel``), if any
    cancel_reason: str | None = None
    #: only in what ``claim`` returns: the holder whose expired lease this claim took
    #: over (a dead or stalled process), ``None`` when nobody held it (not a column)
    taken_over_from: str | None = None

    def lease_live(self, t: float) -> bool:
        """Whether someone holds an unexpired lease on it at time ``t``."""
        return self.lease_owner is not None and (self.lease_expires_at or 0) >= t

    @property
    def duration(self) -> float | None:
        """Seconds from creation to the end, for finished executions."""
        return None if self.finished_at is None else self.finished_at - self.created_at


# tokens ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TokenRecord:
    """An API token of ``flow server`` as the store keeps it: never the token itself, only
    its SHA-256 (``hash``, hex) and its first characters (``prefix``, shown in lists).

    ``scope`` is ``read``, ``write`` or ``admin``; times are unix seconds, ``revoked_at``
    ``None`` while the token is live.
    """

    id: str
    name: str
    scope: str
    hash: str
    prefix: str
    created_at: float
    last_used_at: float | None = None
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None
# end of tokens ---------------------------------------------------------------------------


class StoredEvent(NamedTuple):
    """An event with its position in its execution's log (a tuple: cheap to build in bulk)."""

    execution_id: str
    seq: int
    event: Event


@dataclass(frozen=True, slots=True)
class AuditedEvent:
    """One entry of :meth:`EventStore.audit`: a stored event as far as it can be read.

    ``event`` is ``None`` when the payload does not decode, or for the final entry standing
    for events missing at the end; ``problem`` says what is wrong there (``None``: nothing).
    """

    seq: int
    type: str
    event: Event | None
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Outcome of an append: the new last seq, and whether a cancel was requested meanwhile."""

    last_seq: int
    cancel_requested: bool = False


#: candidates an ambiguous id prefix lists
_CANDIDATES = 10


class _Unset:
    """Sentinel type: 'leave this column as it is'."""


UNSET: Any = _Unset()


class EventStore(ABC):
    """Durable home of executions and their event logs. Use as an async context manager."""

    #: seconds between polls when a backend has no push notification
    poll_interval: float = 0.2
    #: the URL the store was opened with (passwords masked where shown)
    url: str = ""

    def __init__(self) -> None:
        self._changed: dict[str | None, asyncio.Event] = {}
        self.cancel_listeners = []

    # lifecycle --------------------------------------------------------------------------
    @abstractmethod
    async def open(self) -> None:
        """Connect, and create or migrate the schema."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # executions -------------------------------------------------------------------------
    @abstractmethod
    async def create_execution(
        self, new: NewExecution, started: ExecutionStarted
    ) -> tuple[ExecutionRecord, bool]:
        """Insert the row and event 1 atomically.

        Idempotent: if the id, or the idempotency key, already exists, returns the existing
        record and ``False`` and writes nothing.
        """

    @abstractmethod
    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        """The row, or ``None``."""

    @abstractmethod
    async def list_executions(
        self,
        *,
        workflow_name: str | None = None,
        statuses: Sequence[ExecutionStatus] | None = None,
        tags: dict[str, str] | None = None,
        parent_id: str | None = None,
        created_after: float | None = None,
        updated_after: float | None = None,
        limit: int | None = 100,
        id_prefix: str | None = None,
        created_before: float | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:
        """Executions matching every filter given, newest first (``id_prefix``: those whose
        id starts with it, case-sensitively; ``created_before``: created strictly before).

        ``before`` pages through them: the ``(created_at, id)`` of the last execution of the
        previous page, after which this one goes on (in the same order, so a page costs
        its own length whatever the number of executions, and none is skipped or repeated
        when executions are created meanwhile).
        """

    async def resolve_execution_id(self, prefix: str) -> str:
        """The id of the one execution whose id is ``prefix`` or starts with it, so people
        may type a short unique prefix of an id.

        Raises ``ExecutionNotFoundError`` when none matches, and
        ``AmbiguousExecutionIdError`` (listing some candidates) when several do.
        """
        if await self.get_execution(prefix) is not None:
            return prefix  # an exact id wins, even if it is the prefix of another
        found = (await self.list_executions(id_prefix=prefix, limit=_CANDIDATES + 1)
                 if prefix else [])
        if not found:
            raise ExecutionNotFoundError(prefix)
        if len(found) > 1:
            raise AmbiguousExecutionIdError(prefix, [r.id for r in found[:_CANDIDATES]],
                                            more=len(found) > _CANDIDATES)
        return found[0].id

    @abstractmethod
    async def request_cancel(self, execution_id: str, reason: str = "") -> bool:
        """Flag the execution for cancellation; ``False`` if it already finished.

        ``reason`` is kept with the flag (the first one given, if asked again), so that the
        process that runs the execution records it in ``CancelRequested``.
        """

    # the log ----------------------------------------------------------------------------
    @abstractmethod
    async def append(
        self,
        execution_id: str,
        expected_seq: int,
        events: Sequence[Event],
        *,
        status: ExecutionStatus | None = None,
        error: str | None = None,
        wake_at: float | None = UNSET,
        lease_owner: str | None = None,
        lease_token: int | None = None,
    ) -> AppendResult:
        """Append ``events`` as seqs ``expected_seq, expected_seq + 1, ...`` in one commit.

        Raises ``AppendConflictError`` if ``expected_seq`` is not the log's next seq, and
        ``LeaseLostError`` if ``lease_owner`` is given but does not hold a live lease, or if
        ``lease_token`` is given but is not the execution's current fencing token (someone
        acquired the lease since: the caller must stop). The token is checked in the same
        statement that appends. ``status``/``error``/``wake_at`` update the row in the same
        commit; a terminal ``status`` also releases the lease.
        """

    @abstractmethod
    async def load(self, execution_id: str, after_seq: int = 0) -> list[StoredEvent]:
        """Events with seq > ``after_seq``, in order, verified (see ``store.chain``).

        Raises ``HistoryCorruptedError`` (naming the first damaged seq) on a gap, an event
        that does not decode, a checksum that does not match, or a tail the execution's row
        says exists but is gone: a damaged history is never handed out to be replayed.
        """

    async def load_many(self, execution_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        """The whole histories of several executions, each verified as ``load`` does: for
        a worker that has just claimed them, one read instead of one each (Postgres).

        A history that fails verification, or an execution that does not exist, is left
        out: ``load`` it to get the error.
        """
        out: dict[str, list[StoredEvent]] = {}
        for execution_id in dict.fromkeys(execution_ids):
            try:
                events = await self.load(execution_id)
            except HistoryCorruptedError:
                continue
            if events:
                out[execution_id] = events
        return out

    @abstractmethod
    async def audit(self, execution_id: str) -> list[AuditedEvent]:
        """Every stored event that can be read, with the damage ``load`` refuses marked
        (for ``flow history``): never raises ``HistoryCorruptedError``."""

    # workers ----------------------------------------------------------------------------
    @abstractmethod
    async def claim(
        self, worker_id: str, *, lease_seconds: float, limit: int = 1,
        queues: Sequence[str] | None = None,
    ) -> list[ExecutionRecord]:
        """Lease up to ``limit`` unfinished, due executions nobody holds a live lease on,
        most urgent first (priority, then age).

        ``queues`` restricts it to those queues (``"default"`` is the executions started
        without one); ``None`` serves every queue. The limits of each queue
        (``QueueConfig``) hold across every worker: they are checked in the claiming
        transaction, with the queue's row locked.
        """

    @abstractmethod
    async def next_wake(self) -> float | None:
        """The earliest future wake-up time of an unfinished execution nobody holds (a
        suspended sleeper), so that workers wake for it on time; ``None`` if there is none."""

    @abstractmethod
    async def heartbeat(self, worker: WorkerInfo, *, gone: bool = False) -> None:
        """Record that ``worker`` is alive (its ``heartbeat_at`` is now); ``gone``
        removes it (a worker that stops cleanly)."""

    @abstractmethod
    async def list_workers(self) -> list[WorkerInfo]:
        """Every worker that reported itself, most recent heartbeat first."""

    @abstractmethod
    async def set_queue(self, config: QueueConfig) -> None:
        """Create or replace a queue's limits."""

    @abstractmethod
    async def list_queues(self) -> list[QueueStats]:
        """Every queue that has limits or unfinished executions: limits, depth, running."""

    @abstractmethod
    async def acquire(
        self,
        execution_id: str,
        owner: str,
        *,
        lease_seconds: float,
        takeover_from: str | None = None,
    ) -> ExecutionRecord | None:
        """Take the lease on one unfinished execution, with a new fencing token.

        Succeeds when nobody holds a live lease, when ``owner`` holds it already, or when
        ``takeover_from`` holds it (the caller knows that holder is dead). Returns the row
        with its new ``lease_token``, or ``None`` (held by someone else, finished, or no
        such execution: read the row to tell).
        """

    @abstractmethod
    async def renew_lease(
        self, worker_id: str, execution_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        """Extend the leases this worker still holds; returns the ids it still holds."""

    @abstractmethod
    async def release(self, worker_id: str, execution_id: str) -> None:
        """Give up this worker's lease on the execution."""

    @abstractmethod
    async def expire_leases(self, owner: str) -> list[str]:
        """End now every live lease ``owner`` holds on an unfinished execution (a process
        of this machine known to be dead): they stay in its name but expired, so the next
        claim takes them over from it without waiting. Returns their ids."""

    @abstractmethod
    async def wake(self, execution_id: str) -> bool:
        """Make a suspended execution due now: set its wake-up time to now if it is
        unfinished and its wake-up time is later, and announce the change (workers waiting
        for work claim it within milliseconds on Postgres). Returns whether it changed.

        Called when something a suspended execution waits for happened before its timer
        (a child workflow ended, a cancel was requested). An execution without a future
        wake-up time is not suspended (it runs, or is claimable already): left as it is.
        """

    @abstractmethod
    async def due_timers(self, now: float) -> list[tuple[str, float]]:
        """(execution id, wake_at) of unfinished executions whose wake-up time has come."""

    # tokens -----------------------------------------------------------------------------
    @abstractmethod
    async def create_token(self, token: TokenRecord) -> bool:
        """Insert a token; ``False`` (and nothing written) if a live token has its name."""

    @abstractmethod
    async def get_token(self, token_hash: str) -> TokenRecord | None:
        """The token whose SHA-256 (hex) is ``token_hash``, revoked or not; or ``None``."""

    @abstractmethod
    async def list_tokens(self) -> list[TokenRecord]:
        """Every token, revoked ones included, newest first."""

    @abstractmethod
    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a live token; ``False`` if there is no live token with that id."""

    @abstractmethod
    async def touch_token(self, token_id: str, t: float) -> None:
        """Record that the token was used at ``t`` (callers throttle how often)."""
    # end of tokens ----------------------------------------------------------------------

    # change notification ----------------------------------------------------------------
    async def watch(self, execution_id: str | None, seconds: float = WATCH_SECONDS) -> None:
        """Ask writers in every process to announce each append to ``execution_id`` (every
        execution for ``None``) for the next ``seconds``; a follower renews it while it
        follows. Without it, only creates of executions nobody holds, status and timer
        changes, cancels and lease releases are announced. Only Postgres has other
        processes to tell."""
        return  # in one process, ``_notify`` already wakes every waiter on every append

    #: called (on the event loop) with the id of an execution whose cancel another process
    #: asked for, as soon as this store hears of it (Postgres: LISTEN/NOTIFY), so that the
    #: process running it stops it now rather than at its next append or row check
    cancel_listeners: list[Callable[[str], None]]

    def _cancel_heard(self, execution_ids: list[str]) -> None:
        for execution_id in execution_ids:
            for listener in list(self.cancel_listeners):
                listener(execution_id)

    def listen(self) -> None:  # noqa: B027 (a backend without push has nothing to do)
        """Hear other processes' changes from now on, not only once something waits for
        one (Postgres: LISTEN); nothing to do where there is no push notification."""

    def _notify(self, execution_id: str) -> None:
        """Wake in-process waiters on this execution (and on 'any execution')."""
        for key in (execution_id, None):
            ev = self._changed.pop(key, None)
            if ev is not None:
                ev.set()

    async def _wait_external(self, timeout: float) -> None:
        """Wait for a change made by another process; polling by default."""
        await asyncio.sleep(min(timeout, self.poll_interval))

    def _watch(self, execution_id: str | None) -> asyncio.Event:
        """The event set on the next change; take it *before* reading, so a change that
        lands between the read and the wait is not missed."""
        ev = self._changed.get(execution_id)
        if ev is None:
            ev = self._changed[execution_id] = asyncio.Event()
        return ev

    async def wait_for_change(
        self, execution_id: str | None, timeout: float, *, watch: asyncio.Event | None = None
    ) -> None:
        """Return when the execution (or, for ``None``, any execution) may have changed.

        A wake-up, not a guarantee: callers re-read the store afterwards.
        """
        ev = watch if watch is not None else self._watch(execution_id)
        waiter = asyncio.ensure_future(ev.wait())
        external = asyncio.ensure_future(self._wait_external(timeout))
        try:
            await asyncio.wait({waiter, external}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            external.cancel()

    async def subscribe(
        self, execution_id: str, after_seq: int = 0, *, until_terminal: bool = True
    ) -> AsyncIterator[StoredEvent]:
        """Yield the execution's events after ``after_seq``, then new ones as they land.

        Ends after the execution's terminal event when ``until_terminal``.
        """
        seq = after_seq
        renew_at = 0.0
        settled_at = 0.0
        while True:
            if time.monotonic() >= renew_at:  # before reading: no append falls between
                await self.watch(execution_id)
                renew_at = time.monotonic() + WATCH_SECONDS / 3
                # ...except one whose statement began before the watch was committed: it is
                # not announced; look again shortly rather than wait for the next one
                settled_at = time.monotonic() + 0.25
            watch = self._watch(execution_id)
            batch = await self.load(execution_id, seq)
            for stored in batch:
                seq = stored.seq
                yield stored
            if until_terminal and batch and _is_terminal_event(batch[-1].event):
                return
            if not batch:
                record = await self.get_execution(execution_id)
                if until_terminal and (record is None or record.status.is_terminal):
                    if record is None or record.last_seq <= seq:
                        return
                    continue
                timeout = 0.05 if time.monotonic() < settled_at else 1.0
                await self.wait_for_change(execution_id, timeout, watch=watch)


def _is_terminal_event(event: Event) -> bool:
    from .events import ExecutionCancelled, ExecutionCompleted, ExecutionFailed

    return isinstance(event, ExecutionCompleted | ExecutionFailed | ExecutionCancelled)


def now() -> float:
    """Wall-clock unix time; one place so backends agree."""
    return time.time()
