"""What the SQLite and Postgres backends share: statements, and every operation once.

Statements are SQLAlchemy Core, compiled once per dialect (:class:`Prepared`) and run on the
DBAPI cursor with bound parameters. Why not ``Connection.execute``: measured on a 2-core
machine it costs ~60 us per statement, and an append (two statements plus a durable commit of
~0.23 ms) must stay well under 0.4 ms. Queries whose shape depends on the call
(``list_executions``) go through ``Connection.execute`` on SQLite, which caches their
compilation; Postgres compiles them per call.

Every operation is a plain function of a :class:`Tx` (a cursor inside one transaction), so
the dialects differ only in how they run it: SQLite on its writer thread (group commit),
Postgres on worker threads that each own a psycopg connection. (Postgres also runs an append
as one statement, the guarded update below with the insert in one data-modifying CTE.)
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import msgspec
import sqlalchemy as sa
from sqlalchemy.sql.compiler import SQLCompiler

from ._logging import get_logger
from .base import (
    DEFAULT_QUEUE,
    UNSET,
    AppendResult,
    AuditedEvent,
    EventStore,
    ExecutionRecord,
    ExecutionStatus,
    NewExecution,
    QueueConfig,
    QueueStats,
    StoredEvent,
    TokenRecord,
    WorkerInfo,
    admit_to_queue,
    now,
)
from .chain import ChainCache, audited, chain_all, chain_of, verified
from .errors import (
    AppendConflictError,
    ExecutionNotFoundError,
    LeaseLostError,
    StoreError,
    StoreUnavailableError,
)
from .events import ENCODING, Event, ExecutionStarted, encode_event, event_type_name
from .schema import events, executions, queues, tokens, workers

__all__ = ["Prepared", "SQLEventStore", "Tx"]

T = TypeVar("T")
Row = tuple[Any, ...]

_ex = executions
_q = queues
_w = workers
_ev = events
_p = sa.bindparam

log = get_logger("agentainer_flow.store")

#: seconds a store rides out an outage (connection lost, database locked) by default
DEFAULT_RETRY_FOR = 60.0
#: the first wait between two tries of an operation, doubled after each up to the last
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 2.0


class TransientError(StoreUnavailableError):
    """A failure that may pass (connection lost, server restarting, database busy): the
    store tries the operation again instead of raising it (see ``_ride_out``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def retry_for_option(value: float | str | None, query: Mapping[str, Any]) -> float:
    """``retry_for`` from the constructor, else the URL's query, else the default."""
    raw = value if value is not None else query.get("retry_for", DEFAULT_RETRY_FOR)
    try:
        seconds = float(str(raw))
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StoreUnavailableError(
            f"retry_for={raw} is not a number of seconds: use e.g. retry_for=60 (how long "
            "an outage is ridden out), or retry_for=0 to fail at once"
        )
    return seconds


def backoff(delay: float) -> tuple[float, float]:
    """The wait before the next try (``delay`` with jitter) and the delay after it."""
    return delay * (0.5 + random.random() / 2), min(delay * 2, _BACKOFF_MAX)


class Prepared:
    """A Core statement compiled for one dialect: its SQL and how to bind a dict of values.

    Every parameter is a named ``bindparam``; constants the compiler turned into anonymous
    parameters (``LIMIT``'s offset, ``coalesce(x, 0)``) are filled in from the statement.
    """

    __slots__ = ("_defaults", "_names", "_positional", "sql")

    def __init__(self, stmt: sa.ClauseElement, dialect: sa.Dialect) -> None:
        compiled = stmt.compile(dialect=dialect)
        assert isinstance(compiled, SQLCompiler)
        self.sql: str = compiled.string
        self._positional = bool(dialect.positional)
        names = list(compiled.positiontup or ()) if self._positional else list(compiled.binds)
        self._names = tuple(names)
        self._defaults = {
            name: compiled.binds[name].effective_value
            for name in names
            if name in compiled.binds and not compiled.binds[name].required
        }

    def bind(self, values: Mapping[str, Any]) -> Any:
        """DBAPI parameters for ``values``: a tuple or a dict, as the driver expects."""
        if self._defaults:
            values = {**self._defaults, **values}
        if self._positional:
            return tuple([values[n] for n in self._names])
        return values


class Tx:
    """A DBAPI connection inside one transaction, running :class:`Prepared` statements."""

    __slots__ = ("_cur",)

    def __init__(self, dbapi_connection: Any) -> None:
        self._cur = dbapi_connection.cursor()

    def rows(self, stmt: Prepared, values: Mapping[str, Any]) -> list[Row]:
        self._cur.execute(stmt.sql, stmt.bind(values))
        rows: list[Row] = self._cur.fetchall()
        return rows

    def first(self, stmt: Prepared, values: Mapping[str, Any]) -> Row | None:
        rows = self.rows(stmt, values)
        return rows[0] if rows else None

    def execute(self, stmt: Prepared, values: Mapping[str, Any]) -> int:
        """Run a statement without result rows; returns the rowcount."""
        self._cur.execute(stmt.sql, stmt.bind(values))
        count: int = self._cur.rowcount
        return count

    def executemany(self, stmt: Prepared, values: Sequence[Mapping[str, Any]]) -> None:
        self._cur.executemany(stmt.sql, [stmt.bind(v) for v in values])

    def close(self) -> None:
        self._cur.close()


def record_from_row(row: Row | sa.Row[Any]) -> ExecutionRecord:
    """An :class:`ExecutionRecord` from a full ``flow_executions`` row, in column order."""
    values: Row = tuple(row)
    (
        id_,
        workflow_name,
        workflow_version,
        status,
        created_at,
        updated_at,
        finished_at,
        tags,
        idempotency_key,
        parent_id,
        last_seq,
        cancel_requested,
        lease_owner,
        lease_expires_at,
        wake_at,
        error,
        secrets,
        lease_token,
        lease_renewed_at,
        last_chain,
        queue,
        priority,
        concurrency_key,
        first_claimed_at,
        cancel_reason,
    ) = values
    if isinstance(tags, str | bytes):  # SQLite keeps JSON as text; psycopg decodes JSONB
        tags = msgspec.json.decode(tags)
    return ExecutionRecord(
        id=id_,
        workflow_name=workflow_name,
        workflow_version=workflow_version,
        status=ExecutionStatus(status),
        created_at=float(created_at),
        updated_at=float(updated_at),
        finished_at=_float(finished_at),
        tags=tags or {},
        idempotency_key=idempotency_key,
        parent_id=parent_id,
        last_seq=last_seq,
        cancel_requested=bool(cancel_requested),
        lease_owner=lease_owner,
        lease_expires_at=_float(lease_expires_at),
        wake_at=_float(wake_at),
        error=error,
        secrets=None if secrets is None else bytes(secrets),
        lease_token=lease_token or 0,
        lease_renewed_at=_float(lease_renewed_at),
        last_chain=last_chain,
        queue=queue,
        priority=priority or 0,
        concurrency_key=concurrency_key,
        first_claimed_at=_float(first_claimed_at),
        cancel_reason=cancel_reason,
    )


def _queue_config(row: Row) -> QueueConfig:
    name, concurrency, rate_count, rate_seconds, key_tag, key_concurrency, _updated = row
    return QueueConfig(name=name, concurrency=concurrency, rate_count=rate_count,
                       rate_seconds=_float(rate_seconds), key_tag=key_tag,
                       key_concurrency=key_concurrency)


def _float(value: float | None) -> float | None:
    # SQLite's RETURNING hands back a whole REAL as an int.
    return None if value is None else float(value)


# Statements whose shape never changes. "Unfinished" is ``finished_at IS NULL``, the
# predicate of the partial indexes (see schema.py).
_UNFINISHED = _ex.c.finished_at.is_(None)
_LEASE_FREE = sa.or_(
    _ex.c.lease_owner.is_(None), sa.func.coalesce(_ex.c.lease_expires_at, 0) < _p("t")
)


def _stmt_lease_one(match: sa.ColumnElement[bool] | None = None) -> sa.Update:
    """Lease one candidate (still free: checked again in the statement); ``match``: the
    rows to lease instead of ``id = :id`` (several at once where the dialect can)."""
    return (
        sa.update(_ex)
        .where(_ex.c.id == _p("id") if match is None else match, _UNFINISHED, _LEASE_FREE)
        .values(lease_owner=_p("worker"), lease_expires_at=_p("expires"),
                lease_renewed_at=_p("t"), lease_token=_ex.c.lease_token + 1,
                first_claimed_at=sa.func.coalesce(_ex.c.first_claimed_at, _p("t")))
        .returning(*_ex.c)
    )


def _stmt_next_wake() -> sa.Select[Any]:
    return sa.select(sa.func.min(_ex.c.wake_at)).where(
        _UNFINISHED, _ex.c.wake_at > _p("t"), _LEASE_FREE,
        _ex.c.status != ExecutionStatus.BLOCKED.value)


def _in_queue(default: bool) -> sa.ColumnElement[bool]:
    """Rows of the queue named ``:queue``, or of the default one (stored as NULL)."""
    return _ex.c.queue.is_(None) if default else _ex.c.queue == _p("queue")


def _stmt_queue_running(default: bool = False) -> sa.Select[Any]:
    """A queue's executions held by a live lease, by concurrency key."""
    return (
        sa.select(_ex.c.concurrency_key, sa.func.count())
        .where(_UNFINISHED, _in_queue(default), _ex.c.lease_owner.is_not(None),
               _ex.c.lease_expires_at >= _p("t"))
        .group_by(_ex.c.concurrency_key)
    )


def _stmt_queue_started(default: bool = False) -> sa.Select[Any]:
    """How many of a queue's executions were first claimed since ``since``."""
    return sa.select(sa.func.count()).where(_in_queue(default),
                                            _ex.c.first_claimed_at > _p("since"))


def _stmt_set_concurrency_key() -> sa.Update:
    """The concurrency key of an execution queued before its queue had one (read from
    its tag by ``claim``), so that it counts against its key while it runs."""
    return sa.update(_ex).where(_ex.c.id == _p("id"), _ex.c.concurrency_key.is_(None)).values(
        concurrency_key=_p("key"))


def _stmt_backfill_keys(default: bool, tag: sa.ColumnElement[Any]) -> sa.Update:
    """A queue given a per-key limit: its unfinished executions without a key take the
    value of its tag (``tag``, from ``_tag_value``) (``set_queue``)."""
    return (sa.update(_ex)
            .where(_UNFINISHED, _in_queue(default), _ex.c.concurrency_key.is_(None))
            .values(concurrency_key=tag))


def _tag(tags: Any, name: str) -> str | None:
    """The value of tag ``name`` from a row's tags (a dict, or JSON text on SQLite)."""
    if isinstance(tags, str | bytes):
        tags = msgspec.json.decode(tags)
    value = tags.get(name) if isinstance(tags, dict) else None
    return value if isinstance(value, str) else None


def _stmt_queue_load() -> sa.Select[Any]:
    """Per queue: unfinished executions waiting for a worker, running, sleeping."""
    live = sa.and_(_ex.c.lease_owner.is_not(None), _ex.c.lease_expires_at >= _p("t"))
    blocked = sa.and_(sa.not_(live), _ex.c.status == ExecutionStatus.BLOCKED.value)
    sleeping = sa.and_(sa.not_(live), sa.not_(blocked), _ex.c.wake_at.is_not(None),
                       _ex.c.wake_at > _p("t"))
    one = sa.literal(1)
    waiting = sa.and_(sa.not_(live), sa.not_(sleeping), sa.not_(blocked))
    return (
        sa.select(
            _ex.c.queue,
            sa.func.sum(sa.case((waiting, one), else_=0)),
            sa.func.sum(sa.case((live, one), else_=0)),
            sa.func.sum(sa.case((sleeping, one), else_=0)),
            sa.func.sum(sa.case((blocked, one), else_=0)),
        )
        .where(_UNFINISHED, _ex.c.parent_id.is_(None))
        .group_by(_ex.c.queue)
    )


def _stmt_get() -> sa.Select[Any]:
    return sa.select(*_ex.c).where(_ex.c.id == _p("id"))


def _stmt_get_by_key() -> sa.Select[Any]:
    return sa.select(*_ex.c).where(_ex.c.idempotency_key == _p("key"))


def _stmt_append_check() -> sa.Select[Any]:
    return sa.select(
        _ex.c.last_seq, _ex.c.lease_owner, _ex.c.lease_expires_at, _ex.c.lease_token,
        _ex.c.last_chain,
    ).where(_ex.c.id == _p("id"))


def _stmt_insert_events() -> sa.Insert:
    return sa.insert(_ev)


def _stmt_load() -> sa.Select[Any]:
    return (
        sa.select(_ev.c.seq, _ev.c.type, _ev.c.data, _ev.c.chain)
        .where(_ev.c.execution_id == _p("id"), _ev.c.seq >= _p("from"))
        .order_by(_ev.c.seq)
    )


def _stmt_log_end() -> sa.Select[Any]:
    return sa.select(_ex.c.last_seq, _ex.c.last_chain).where(_ex.c.id == _p("id"))


def _stmt_load_with_end() -> sa.CompoundSelect[Any]:
    """``_stmt_load``'s rows, then one row of the execution's (last_seq, NULL, NULL,
    last_chain): the log and its end in one statement, so from one snapshot, and one
    round trip instead of two."""
    log = sa.select(_ev.c.seq, _ev.c.type, _ev.c.data, _ev.c.chain).where(
        _ev.c.execution_id == _p("id"), _ev.c.seq >= _p("from"))
    end = sa.select(_ex.c.last_seq, sa.null().cast(sa.Text), sa.null().cast(sa.LargeBinary),
                    _ex.c.last_chain).where(_ex.c.id == _p("id"))
    # an event's type is never NULL: that marks the end row, at or next to the last
    return sa.union_all(log, end).order_by(sa.literal_column("seq"))


def _stmt_chain_before() -> sa.Select[Any]:
    """The last chain value up to a seq (for a load after an event written without one)."""
    return (
        sa.select(_ev.c.chain)
        .where(_ev.c.execution_id == _p("id"), _ev.c.seq <= _p("seq"), _ev.c.chain.is_not(None))
        .order_by(_ev.c.seq.desc())
        .limit(1)
    )


#: how many times a load reads on while appends land between its reads of the log and row
_REREADS = 10


def read_log(tx: Tx, stmts: tuple[Prepared, Prepared, Prepared, Prepared], execution_id: str,
             after_seq: int) -> tuple[list[Row], tuple[int, str | None] | None]:
    """The log's rows from ``after_seq`` (from 1 when 0) and the row's (last_seq,
    last_chain), read together; read on if the log ends before the row says (a database
    that gave the two parts different snapshots), until it ends or a tail is missing."""
    load, log_end, chain_before, load_with_end = stmts
    start = after_seq or 1
    rows = tx.rows(load_with_end, {"id": execution_id, "from": start})
    end: Row | None = None
    for i in range(len(rows) - 1, -1, -1):  # the end row: last or next to it, normally
        if rows[i][1] is None:
            end = rows.pop(i)
            end = (end[0], end[3])
            break
    for _ in range(_REREADS):
        last = rows[-1][0] if rows else start - 1
        if end is None or end[0] <= last:
            break
        more = tx.rows(load, {"id": execution_id, "from": last + 1})
        if not more:
            break  # a cut tail: ``verified`` says so
        rows.extend(more)
        end = tx.first(log_end, {"id": execution_id})
    if after_seq and rows and rows[0][0] == after_seq and rows[0][3] is None:
        found = tx.first(chain_before, {"id": execution_id, "seq": after_seq})
        rows[0] = (*rows[0][:3], None if found is None else found[0])
    return rows, None if end is None else (end[0], end[1])


def _stmt_appended() -> sa.Select[Any]:
    """The events at seqs ``first``..``last`` of an execution, with its cancel flag."""
    return (
        sa.select(_ev.c.data, _ex.c.cancel_requested)
        .join_from(_ev, _ex, _ex.c.id == _ev.c.execution_id)
        .where(_ev.c.execution_id == _p("id"), _ev.c.seq.between(_p("first"), _p("last")))
        .order_by(_ev.c.seq)
    )


def _stmt_cancel(announce: Sequence[sa.ColumnElement[Any]]) -> sa.Update:
    return (
        sa.update(_ex)
        .where(_ex.c.id == _p("id"), _UNFINISHED)
        .values(cancel_requested=sa.true(), updated_at=_p("t"),
                # the first reason stays: the run may already have recorded it
                cancel_reason=sa.case((_ex.c.cancel_requested, _ex.c.cancel_reason),
                                      else_=_p("reason", type_=sa.Text)))
        .returning(_ex.c.id, *announce)
    )


def _stmt_renew() -> sa.Update:
    return (
        sa.update(_ex)
        # An expired lease nobody took over is still the holder's (the fencing token did
        # not change): after a store outage longer than the lease, the holder carries on.
        .where(_ex.c.id == _p("id"), _ex.c.lease_owner == _p("worker"))
        .values(lease_expires_at=_p("expires"), lease_renewed_at=_p("t"))
        .returning(_ex.c.id)
    )


def _stmt_acquire() -> sa.Update:
    """Take the lease if it is free, expired, ours, or held by a holder known to be dead."""
    return (
        sa.update(_ex)
        .where(
            _ex.c.id == _p("id"),
            _UNFINISHED,
            sa.or_(
                _LEASE_FREE,
                _ex.c.lease_owner == _p("worker"),
                _ex.c.lease_owner == _p("takeover"),
            ),
        )
        .values(
            lease_owner=_p("worker"),
            lease_expires_at=_p("expires"),
            lease_renewed_at=_p("t"),
            lease_token=_ex.c.lease_token + 1,
        )
        .returning(*_ex.c)
    )


def _stmt_release(announce: Sequence[sa.ColumnElement[Any]]) -> sa.Update:
    return (
        sa.update(_ex)
        .where(_ex.c.id == _p("id"), _ex.c.lease_owner == _p("worker"))
        .values(lease_owner=sa.null(), lease_expires_at=sa.null())
        .returning(_ex.c.id, *announce)
    )


def _stmt_expire_leases(announce: Sequence[sa.ColumnElement[Any]]) -> sa.Update:
    """End the live leases of one owner (a dead process): expired, the owner kept, so that
    the next claim takes them over from it."""
    return (
        sa.update(_ex)
        .where(_ex.c.lease_owner == _p("owner"), _UNFINISHED, _ex.c.lease_expires_at >= _p("t"))
        .values(lease_expires_at=_p("expired"))
        .returning(_ex.c.id, *announce)
    )


def _stmt_wake(announce: Sequence[sa.ColumnElement[Any]]) -> sa.Update:
    """Make a suspended execution due now (only if its wake-up time is later)."""
    return (
        sa.update(_ex)
        .where(_ex.c.id == _p("id"), _UNFINISHED, _ex.c.wake_at > _p("t"))
        .values(wake_at=_p("t"))
        .returning(_ex.c.id, *announce)
    )


def _stmt_due() -> sa.Select[Any]:
    return (
        sa.select(_ex.c.id, _ex.c.wake_at)
        .where(_UNFINISHED, _ex.c.wake_at.is_not(None), _ex.c.wake_at <= _p("t"))
        .order_by(_ex.c.id)
    )


def _stmt_append_update(
    announce: Sequence[sa.ColumnElement[Any]],
    has_status: bool,
    terminal: bool,
    has_error: bool,
    set_wake: bool,
    leased: bool,
    fenced: bool = False,
    chained: bool = False,
) -> sa.Update:
    """The guarded row update of an append: matches only if the seq (and lease) still hold,
    and, when it adds events, if the history still ends at the chain value they chain from."""
    values: dict[str, Any] = {"last_seq": _p("new_last"), "updated_at": _p("t")}
    if chained:
        values["last_chain"] = _p("last_chain")
    if has_status:
        values["status"] = _p("status")
        if terminal:
            values["finished_at"] = _p("t")
            values["wake_at"] = sa.null()
            # the end releases the lease (no separate release: one transaction less per run)
            values["lease_owner"] = sa.null()
            values["lease_expires_at"] = sa.null()
    if has_error:
        values["error"] = _p("error")
    if set_wake and not terminal:
        values["wake_at"] = _p("wake_at")
    where = [_ex.c.id == _p("id"), _ex.c.last_seq == _p("prev_last")]
    if leased:
        where += [_ex.c.lease_owner == _p("lease_owner"), _ex.c.lease_expires_at >= _p("t")]
    if fenced:  # the fencing token: refuses a runner whose lease someone else acquired since
        where.append(_ex.c.lease_token == _p("lease_token"))
    if chained:  # a stale chain cache can never write a broken chain
        where.append(_ex.c.last_chain.is_not_distinct_from(_p("prev_chain")))
    return sa.update(_ex).where(*where).values(values).returning(_ex.c.cancel_requested, *announce)


class SQLEventStore(EventStore):
    """An :class:`EventStore` on SQLAlchemy Core; subclasses supply connections and dialect."""

    #: seconds an operation is retried through an outage before it fails (0: never)
    retry_for: float = DEFAULT_RETRY_FOR

    def __init__(self) -> None:
        super().__init__()
        self._dialect: sa.Dialect | None = None
        self._prepared: dict[Hashable, Prepared] = {}
        #: (last seq, last chain) of executions this store appended to or loaded lately
        self._chains = ChainCache()

    # hooks for the dialects -------------------------------------------------------------
    @abstractmethod
    async def _write(
        self, op: Callable[[Tx], T], *, resolve: Callable[[], Awaitable[T | None]] | None = None
    ) -> T:
        """Run ``op`` in a write transaction and commit; ``op``'s exception rolls it back.

        Transient failures are retried (:meth:`_ride_out`, which calls ``resolve``).
        """

    async def _write_one(self, op: Callable[[Tx], T]) -> T:
        """Run ``op``, a write whose every change is made by one statement (the others
        only read), so that a backend may run it without a transaction of its own."""
        return await self._write(op)

    def _insert_new(
        self,
        tx: Tx,
        insert: Prepared,
        insert_events: Prepared,
        row: Mapping[str, Any],
        first: Mapping[str, Any],
    ) -> bool:
        """Insert a new execution's row (if its id and key are free) and its first event;
        whether it was new."""
        if tx.first(insert, row) is None:
            return False
        tx.executemany(insert_events, [first])
        return True

    @abstractmethod
    async def _read(self, op: Callable[[Tx], T]) -> T:
        """Run ``op`` on a read-only connection."""

    async def _read_core(self, op: Callable[[sa.Connection], T]) -> T:
        """Run ``op`` with a SQLAlchemy ``Connection`` (for statements built per call).

        Used by the default :meth:`_select_executions`; a backend overriding that need not
        provide it.
        """
        raise TypeError(
            f"{type(self).__name__} must override _read_core or _select_executions"
        )

    @abstractmethod
    def _insert_ignore(self) -> sa.Insert:
        """``INSERT INTO flow_executions ... ON CONFLICT DO NOTHING``, returning ``id`` and
        :meth:`_announce`."""

    def _announce(self, always: bool = True, *,
                  cancel: bool = False) -> list[sa.ColumnElement[Any]]:
        """Extra ``RETURNING`` columns of statements that change an execution's row.

        Postgres returns ``pg_notify(...)`` there: other processes learn of the change at
        commit, without another round trip. ``always=False`` (an append that changes
        neither status nor timer): only if someone follows the execution (``watch``).
        ``cancel``: the change is a cancel request (told apart, see ``cancel_listeners``).
        """
        return []


    def _tag_is(self, key: str, value: str) -> sa.ColumnElement[bool]:
        """The execution has tag ``key`` set to ``value``."""
        matches: sa.ColumnElement[bool] = _ex.c.tags[key].as_string() == value
        return matches

    @abstractmethod
    def _is_unique_violation(self, exc: BaseException) -> bool:
        """Whether a driver exception is a primary-key or unique-constraint violation."""

    # statements -------------------------------------------------------------------------
    def _stmt(self, key: Hashable, build: Callable[[], sa.ClauseElement]) -> Prepared:
        """The statement ``build`` makes, compiled for this dialect once."""
        prepared = self._prepared.get(key)
        if prepared is None:
            if self._dialect is None:
                raise StoreError("the store is not open: use `async with store:` first")
            prepared = self._prepared[key] = Prepared(build(), self._dialect)
        return prepared

    # executions -------------------------------------------------------------------------
    async def create_execution(
        self, new: NewExecution, started: ExecutionStarted
    ) -> tuple[ExecutionRecord, bool]:
        t = now()
        type_name, data = event_type_name(started), encode_event(started)
        chain = chain_of(None, 1, type_name, data)
        row: dict[str, Any] = {
            "id": new.id,
            "workflow_name": new.workflow_name,
            "workflow_version": new.workflow_version,
            "status": ExecutionStatus.PENDING.value,
            "created_at": t,
            "updated_at": t,
            "finished_at": None,
            "tags": msgspec.json.encode(dict(new.tags)).decode(),
            "idempotency_key": new.idempotency_key,
            "parent_id": new.parent_id,
            "last_seq": 1,
            "cancel_requested": False,
            "wake_at": None,
            "error": None,
            "secrets": new.secrets,
            "lease_owner": new.lease_owner,
            "lease_expires_at": t + new.lease_seconds if new.lease_owner else None,
            "lease_token": 1 if new.lease_owner else 0,
            "lease_renewed_at": t if new.lease_owner else None,
            "last_chain": chain,
            "queue": new.queue,
            "priority": new.priority,
            "concurrency_key": new.concurrency_key,
            "first_claimed_at": None,
            "cancel_reason": None,
        }
        first = {
            "execution_id": new.id,
            "seq": 1,
            "type": type_name,
            "encoding": ENCODING,
            "data": data,
            "created_at": t,
            "chain": chain,
        }
        insert = self._stmt("insert_ignore", self._insert_ignore)
        insert_events = self._stmt("insert_events", _stmt_insert_events)
        get = self._stmt("get", _stmt_get)
        get_by_key = self._stmt("get_by_key", _stmt_get_by_key)

        def op(tx: Tx) -> tuple[ExecutionRecord, bool]:
            # Insert first: a new execution is the common case, and ON CONFLICT makes a
            # concurrent create with the same id or key wait, then do nothing.
            if self._insert_new(tx, insert, insert_events, row, first):
                return new.record(t, chain), True
            existing = tx.first(get, {"id": new.id})
            if existing is None and new.idempotency_key is not None:
                existing = tx.first(get_by_key, {"key": new.idempotency_key})
            if existing is None:  # the conflicting row was deleted meanwhile
                raise StoreError(f"could not create execution {new.id!r}; try again")
            return record_from_row(existing), False

        record, created = await self._write_one(op)
        if created:
            self._chains.put(new.id, 1, chain)
            self._notify(new.id)
        return record, created

    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        get = self._stmt("get", _stmt_get)

        def op(tx: Tx) -> ExecutionRecord | None:
            row = tx.first(get, {"id": execution_id})
            return None if row is None else record_from_row(row)

        return await self._read(op)

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
        query = sa.select(*_ex.c)
        if workflow_name is not None:
            query = query.where(_ex.c.workflow_name == workflow_name)
        if id_prefix is not None:
            # substr, not LIKE: SQLite's LIKE ignores case, and ids may hold % or _
            query = query.where(sa.func.substr(_ex.c.id, 1, len(id_prefix)) == id_prefix)
        if statuses is not None:
            query = query.where(_ex.c.status.in_([ExecutionStatus(s).value for s in statuses]))
        for key, value in (tags or {}).items():
            query = query.where(self._tag_is(key, value))
        if parent_id is not None:
            query = query.where(_ex.c.parent_id == parent_id)
        if created_after is not None:
            query = query.where(_ex.c.created_at >= created_after)
        if updated_after is not None:
            query = query.where(_ex.c.updated_at >= updated_after)
        if created_before is not None:
            query = query.where(_ex.c.created_at < created_before)
        if before is not None:
            created, last_id = before
            query = query.where(sa.or_(
                _ex.c.created_at < created,
                sa.and_(_ex.c.created_at == created, _ex.c.id < last_id)))
        query = query.order_by(_ex.c.created_at.desc(), _ex.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        return await self._select_executions(query)

    async def _select_executions(self, query: sa.Select[Any]) -> list[ExecutionRecord]:
        """Run a query for whole ``flow_executions`` rows that was built for this call."""

        def op(conn: sa.Connection) -> list[ExecutionRecord]:
            return [record_from_row(row) for row in conn.execute(query)]

        return await self._read_core(op)

    async def request_cancel(self, execution_id: str, reason: str = "") -> bool:
        cancel = self._stmt("cancel", lambda: _stmt_cancel(self._announce(cancel=True)))

        def op(tx: Tx) -> bool:
            values = {"id": execution_id, "t": now(), "reason": reason or None}
            return tx.first(cancel, values) is not None

        flagged = await self._write(op)
        if flagged:
            self._notify(execution_id)
        return flagged

    # the log ----------------------------------------------------------------------------
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
        terminal = status is not None and status.is_terminal
        shape = (status is not None, terminal, error is not None, wake_at is not UNSET)
        leased = lease_owner is not None
        fenced = lease_token is not None
        chained = bool(events)
        update = self._stmt(
            ("append", *shape, leased, fenced, chained),
            lambda: _stmt_append_update(
                self._announce(always=shape[0] or shape[3]), *shape, leased, fenced, chained
            ),
        )
        check = self._stmt("append_check", _stmt_append_check)
        insert_events = self._stmt("insert_events", _stmt_insert_events)
        new_last = expected_seq + len(events) - 1
        values: dict[str, Any] = {
            "id": execution_id,
            "prev_last": expected_seq - 1,
            "new_last": new_last,
            "status": None if status is None else status.value,
            "error": error,
            "wake_at": None if wake_at is UNSET else wake_at,
            "lease_owner": lease_owner,
            "lease_token": lease_token,
        }
        # Encode before entering the transaction: on SQLite it holds the database's only
        # write lock, on Postgres the row lock.
        encoded = [
            (expected_seq + i, event_type_name(e), encode_event(e)) for i, e in enumerate(events)
        ]
        # Chained from the cached end of the log, else from the row's (read in the transaction).
        known, prev = self._chains.prev(execution_id, expected_seq - 1)
        cached = chain_all(prev, encoded) if known and encoded else None
        appended: list[str] = []  # the new last chain, once the guarded update matched

        def op(tx: Tx) -> AppendResult:
            t = values["t"] = now()
            chains: list[str] = []
            if encoded:
                prev_chain = prev
                if cached is None:
                    found = tx.first(check, {"id": execution_id})
                    prev_chain = None if found is None else found[4]
                chains = cached or chain_all(prev_chain, encoded)
                values["prev_chain"], values["last_chain"] = prev_chain, chains[-1]
            row = tx.first(update, values)
            if row is None:
                # if only the chain differs (a stale cache), chain from the row's, once
                prev_chain = self._append_failed(
                    tx, check, execution_id, expected_seq, lease_owner, lease_token, t,
                    retry=chained,
                )
                chains = chain_all(prev_chain, encoded)
                values["prev_chain"], values["last_chain"] = prev_chain, chains[-1]
                row = tx.first(update, values)
                if row is None:
                    self._append_failed(
                        tx, check, execution_id, expected_seq, lease_owner, lease_token, t
                    )
            if encoded:
                try:
                    tx.executemany(
                        insert_events,
                        [
                            {
                                "execution_id": execution_id,
                                "seq": seq,
                                "type": type_,
                                "encoding": ENCODING,
                                "data": data,
                                "created_at": t,
                                "chain": chain,
                            }
                            for (seq, type_, data), chain in zip(encoded, chains, strict=True)
                        ],
                    )
                except Exception as exc:
                    if self._is_unique_violation(exc):
                        raise AppendConflictError(
                            execution_id, expected_seq, expected_seq - 1
                        ) from None
                    raise
                appended[:] = chains[-1:]
            assert row is not None
            return AppendResult(new_last, bool(row[0]))

        result = await self._write(
            op,
            resolve=lambda: self._committed_append(
                execution_id, expected_seq, [data for _, _, data in encoded]
            ),
        )
        self._appended(execution_id, new_last, appended, status)
        self._notify(execution_id)
        return result

    def _appended(
        self, execution_id: str, last_seq: int, chains: list[str], status: ExecutionStatus | None
    ) -> None:
        """Remember where an execution's log ends after an append, to chain the next one."""
        if status is not None and status.is_terminal:
            self._chains.forget(execution_id)
        elif chains:
            self._chains.put(execution_id, last_seq, chains[-1])

    @staticmethod
    def _append_failed(
        tx: Tx,
        check: Prepared,
        execution_id: str,
        expected_seq: int,
        lease_owner: str | None,
        lease_token: int | None,
        t: float,
        *,
        retry: bool = False,
    ) -> str | None:
        """Raise why the guarded update matched nothing, checked in the memory store's order.

        With ``retry``, when the seq and the lease hold (so only the chain guard can have
        failed: the caller chained from a stale cache), return the row's last chain instead.
        """
        row = tx.first(check, {"id": execution_id})
        if row is None:
            raise ExecutionNotFoundError(execution_id)
        last_seq, owner, expires, token, last_chain = row
        if expected_seq != last_seq + 1:
            raise AppendConflictError(execution_id, expected_seq, last_seq)
        if lease_owner is not None and (owner != lease_owner or (expires or 0) < t):
            raise LeaseLostError(
                f"worker {lease_owner} no longer holds the lease on execution {execution_id}"
            )
        if lease_token is not None and token != lease_token:
            raise LeaseLostError(
                f"execution {execution_id}: the lease was taken over by {owner or 'nobody'} "
                f"(fencing token {token}, this runner has {lease_token}); it stops here"
            )
        if retry:
            chain: str | None = last_chain
            return chain
        raise AppendConflictError(execution_id, expected_seq, last_seq)  # raced; retry later

    def _log_statements(self) -> tuple[Prepared, Prepared, Prepared, Prepared]:
        return (
            self._stmt("load", _stmt_load),
            self._stmt("log_end", _stmt_log_end),
            self._stmt("chain_before", _stmt_chain_before),
            self._stmt("load_with_end", _stmt_load_with_end),
        )

    async def load(self, execution_id: str, after_seq: int = 0) -> list[StoredEvent]:
        stmts = self._log_statements()

        def op(tx: Tx) -> tuple[list[StoredEvent], tuple[int, str | None] | None]:
            rows, end = read_log(tx, stmts, execution_id, after_seq)
            return verified(execution_id, after_seq, rows, end)

        events, last = await self._read(op)
        if last is not None:
            self._chains.put_if_newer(execution_id, *last)
        return events

    async def audit(self, execution_id: str) -> list[AuditedEvent]:
        stmts = self._log_statements()

        def op(tx: Tx) -> list[AuditedEvent]:
            rows, end = read_log(tx, stmts, execution_id, 0)
            return audited(execution_id, rows, end)

        return await self._read(op)

    # workers ----------------------------------------------------------------------------
    async def claim(
        self, worker_id: str, *, lease_seconds: float, limit: int = 1,
        queues: Sequence[str] | None = None,
    ) -> list[ExecutionRecord]:
        if limit <= 0:
            return []
        serve: list[str | None] | None = (
            None if queues is None else
            list(dict.fromkeys(None if q == DEFAULT_QUEUE else q for q in queues)))
        lock_limits = self._stmt("queue_limits", self._queue_limits_statement)
        candidates_all = self._stmt("candidates_all", lambda: self._candidates(None))
        candidates_one = self._stmt("candidates_one", lambda: self._candidates(True))
        candidates_none = self._stmt("candidates_none", lambda: self._candidates(False))
        running = {d: self._stmt(("queue_running", d), partial(_stmt_queue_running, d))
                   for d in (False, True)}
        started = {d: self._stmt(("queue_started", d), partial(_stmt_queue_started, d))
                   for d in (False, True)}
        set_key = self._stmt("set_concurrency_key", _stmt_set_concurrency_key)

        def op(tx: Tx) -> list[ExecutionRecord]:
            t = now()
            # the limits of the queues served, their rows locked: claimers of a limited
            # queue take turns, so the counts below stay true until this commits
            limits = {row[0]: _queue_config(row) for row in tx.rows(lock_limits, {})
                      if serve is None or (None if row[0] == DEFAULT_QUEUE else row[0]) in serve}
            limited = {q for q, c in limits.items()
                       if c.concurrency is not None or c.rate_count is not None
                       or c.key_concurrency is not None}
            busy: dict[tuple[str, str | None], int] = {}
            recent: dict[str, int] = {}
            for q in limited:
                default = q == DEFAULT_QUEUE
                for key, count in tx.rows(running[default], {"t": t, "queue": q}):
                    busy[(q, None)] = busy.get((q, None), 0) + count
                    if key is not None:
                        busy[(q, key)] = count
                window = limits[q].rate_seconds
                if limits[q].rate_count is not None and window:
                    found = tx.first(started[default], {"queue": q, "since": t - window})
                    recent[q] = int(found[0]) if found else 0
            room = limit + (50 if limited else 0)  # some candidates may be over a limit
            rows: list[Row] = []
            if serve is None:
                rows = tx.rows(candidates_all, {"t": t, "limit": room})
            else:
                for q in serve:
                    rows += (tx.rows(candidates_none, {"t": t, "limit": room}) if q is None
                             else tx.rows(candidates_one, {"t": t, "limit": room, "queue": q}))
            rows.sort(key=lambda r: (-(r[2] or 0), r[4], r[0]))
            chosen: list[str] = []
            keys: dict[str, str] = {}  # a key read from the tags, for a row without one
            held_by: dict[str, str | None] = {}  # an expired lease's holder: taken over
            seen: set[str] = set()

            def choose(rows: list[Row]) -> bool:
                """Admit rows in order until ``limit``; whether a limit turned one away."""
                turned_away = False
                for id_, queue, _priority, key, _created, first, holder, tags in rows:
                    if len(chosen) >= limit:
                        break
                    if id_ in seen:
                        continue
                    seen.add(id_)
                    name = queue or DEFAULT_QUEUE
                    if name in limited:
                        config = limits[name]
                        if key is None and config.key_tag is not None:
                            # queued before the queue had its key: the key is its tag's
                            key = _tag(tags, config.key_tag)
                            if key is not None:
                                keys[id_] = key
                        if not admit_to_queue(config, name, key, busy, recent,
                                              starts=first is None):
                            turned_away = True
                            continue
                    chosen.append(id_)
                    held_by[id_] = holder
                return turned_away

            turned_away, looks = choose(rows), 0
            while turned_away and len(chosen) < limit and len(rows) >= room and looks < 8:
                # the most urgent candidates are over their queues' limits and may hide
                # others behind them (a limited queue's backlog, one tenant's): look again
                # without the queues and keys that are full now
                looks += 1
                shape, values = self._past_full(serve, limits, limited, busy, recent)
                past = self._stmt(("candidates_past_full", shape),
                                  partial(self._candidates_past_full, shape))
                room = limit - len(chosen) + 50
                rows = tx.rows(past, {**values, "t": t, "limit": room})
                turned_away = choose(rows)
            leased = self._lease(tx, chosen, {"worker": worker_id, "t": t,
                                              "expires": t + lease_seconds})
            for id_, key in keys.items():
                if id_ in chosen:
                    tx.execute(set_key, {"id": id_, "key": key})
            return [dataclasses.replace(record, taken_over_from=held_by.get(record.id),
                                        concurrency_key=record.concurrency_key
                                        or keys.get(record.id))
                    for record in map(record_from_row, leased)]

        return await self._write(op)

    def _past_full(
        self, serve: list[str | None] | None, limits: dict[str, QueueConfig],
        limited: set[str], busy: dict[tuple[str, str | None], int], recent: dict[str, int],
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """What a second look at the candidates leaves out (``claim``): the shape of the
        statement (for ``_candidates_past_full``) and its values."""
        values: dict[str, Any] = {}
        served: list[bool] = []  # per served queue: whether it is the default one
        for i, q in enumerate(serve or ()):
            served.append(q is None)
            values[f"sq{i}"] = q
        # per limited queue: (default, whole queue full, new ones held back, key tag, keys)
        excluded: list[tuple[bool, bool, bool, str | None, int]] = []
        for i, q in enumerate(sorted(limited)):
            config = limits[q]
            values[f"fq{i}"] = q
            whole = config.concurrency is not None and busy.get((q, None), 0) >= config.concurrency
            new = config.rate_count is not None and recent.get(q, 0) >= config.rate_count
            full: list[str] = []
            if config.key_concurrency is not None and config.key_tag is not None:
                full = sorted(k for (name, k), n in busy.items()
                              if name == q and k is not None and n >= config.key_concurrency)
            for j, k in enumerate(full):
                values[f"fk{i}_{j}"] = k
            excluded.append((q == DEFAULT_QUEUE, whole, new, config.key_tag if full else None,
                             len(full)))
        return (None if serve is None else tuple(served), tuple(excluded)), values

    def _candidates_past_full(self, shape: tuple[Any, ...]) -> sa.Select[Any]:
        """The candidates of ``_candidates`` from the served queues, without the queues at
        their concurrency limit, the new executions of queues at their rate limit, and the
        executions whose concurrency key is at its limit (the key read from the tag where
        the row has none)."""
        served, excluded = shape

        def in_queue(name: str, default: bool) -> sa.ColumnElement[bool]:
            # never NULL, so that NOT of it is never NULL either
            if default:
                return _ex.c.queue.is_(None)
            return sa.and_(_ex.c.queue.is_not(None), _ex.c.queue == _p(name))

        stmt = self._candidates_select()
        if served is not None:
            stmt = stmt.where(sa.or_(*(in_queue(f"sq{i}", d) for i, d in enumerate(served))))
        for i, (default, whole, new, tag, n) in enumerate(excluded):
            queue = in_queue(f"fq{i}", default)
            if whole:
                stmt = stmt.where(sa.not_(queue))
                continue
            if new:
                stmt = stmt.where(sa.not_(sa.and_(queue, _ex.c.first_claimed_at.is_(None))))
            if n:
                key = sa.func.coalesce(_ex.c.concurrency_key, self._tag_value(tag))
                stmt = stmt.where(sa.not_(sa.and_(
                    queue, key.is_not(None), key.in_([_p(f"fk{i}_{j}") for j in range(n)]))))
        stmt = stmt.order_by(_ex.c.priority.desc(), _ex.c.created_at, _ex.c.id).limit(
            _p("limit"))
        return self._skip_locked(stmt)

    def _lease(self, tx: Tx, ids: list[str], values: Mapping[str, Any]) -> list[Row]:
        """Lease the chosen candidates (locked by this transaction, or with writers
        serialised: still free), in the order given: their rows after the update."""
        lease = self._stmt("lease_one", _stmt_lease_one)
        out: list[Row] = []
        for id_ in ids:
            row = tx.first(lease, {**values, "id": id_})
            if row is not None:
                out.append(row)
        return out

    def _tag_value(self, tag: str) -> sa.ColumnElement[Any]:
        """The value of tag ``tag`` of an execution, as text (``NULL`` without it)."""
        path = '$."' + tag.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return sa.func.json_extract(_ex.c.tags, sa.literal(path, sa.Text))

    def _candidates_select(self) -> sa.Select[Any]:
        """Claimable rows (id, queue, priority, key, created_at, first claim, the holder of
        an expired lease, tags), in no order."""
        return sa.select(_ex.c.id, _ex.c.queue, _ex.c.priority, _ex.c.concurrency_key,
                         _ex.c.created_at, _ex.c.first_claimed_at, _ex.c.lease_owner,
                         _ex.c.tags).where(
            _UNFINISHED,
            _ex.c.status != ExecutionStatus.BLOCKED.value,
            sa.or_(_ex.c.wake_at.is_(None), _ex.c.wake_at <= _p("t")),
            _LEASE_FREE,
        )

    def _candidates(self, one_queue: bool | None) -> sa.Select[Any]:
        """Claimable rows (``_candidates_select``), most urgent first: of every queue
        (``None``), of one (``True``), of none (``False``). Postgres skips rows another
        claimer has locked."""
        stmt = self._candidates_select()
        if one_queue is True:
            stmt = stmt.where(_ex.c.queue == _p("queue"))
        elif one_queue is False:
            stmt = stmt.where(_ex.c.queue.is_(None))
        stmt = stmt.order_by(_ex.c.priority.desc(), _ex.c.created_at, _ex.c.id).limit(
            _p("limit"))
        return self._skip_locked(stmt)

    def _skip_locked(self, stmt: sa.Select[Any]) -> sa.Select[Any]:
        """``stmt`` locking its rows for the claim (a no-op where writers are serialised)."""
        return stmt

    def _queue_limits_statement(self) -> sa.Select[Any]:
        """Every queue's limits, locked for this transaction where the dialect can."""
        return sa.select(*_q.c).order_by(_q.c.name)

    async def next_wake(self) -> float | None:
        stmt = self._stmt("next_wake", _stmt_next_wake)
        row = await self._read(lambda tx: tx.first(stmt, {"t": now()}))
        return None if row is None or row[0] is None else float(row[0])

    async def heartbeat(self, worker: WorkerInfo, *, gone: bool = False) -> None:
        if gone:
            forget = self._stmt("worker_delete",
                                lambda: sa.delete(_w).where(_w.c.id == _p("id")))
            await self._write(lambda tx: tx.execute(forget, {"id": worker.id}))
            return
        upsert = self._stmt("worker_upsert", lambda: self._upsert(_w))
        values = {"id": worker.id, "name": worker.name, "host": worker.host,
                  "pid": worker.pid, "queues": ",".join(worker.queues),
                  "concurrency": worker.concurrency, "held": worker.held,
                  "started_at": worker.started_at, "heartbeat_at": now()}
        await self._write(lambda tx: tx.execute(upsert, values))

    @abstractmethod
    def _dialect_insert(self, table: sa.Table) -> Any:
        """The dialect's ``INSERT`` construct (one with ``on_conflict_do_update``)."""

    def _upsert(self, table: sa.Table) -> sa.ClauseElement:
        """Insert a row, or update its other columns where its primary key exists."""
        stmt = self._dialect_insert(table)
        upsert: sa.ClauseElement = stmt.on_conflict_do_update(
            index_elements=list(table.primary_key.columns),
            set_={c.name: stmt.excluded[c.name] for c in table.c if not c.primary_key})
        return upsert

    async def list_workers(self) -> list[WorkerInfo]:
        stmt = self._stmt("workers", lambda: sa.select(*_w.c).order_by(
            _w.c.heartbeat_at.desc()))

        def op(tx: Tx) -> list[WorkerInfo]:
            out = []
            for id_, name, host, pid, served, conc, held, started, beat in tx.rows(stmt, {}):
                out.append(WorkerInfo(id=id_, name=name, host=host, pid=pid,
                                      queues=tuple(q for q in served.split(",") if q),
                                      concurrency=conc, held=held,
                                      started_at=float(started), heartbeat_at=float(beat)))
            return out

        return await self._read(op)

    async def set_queue(self, config: QueueConfig) -> None:
        upsert = self._stmt("queue_upsert", lambda: self._upsert(_q))
        values = {"name": config.name, "concurrency": config.concurrency,
                  "rate_count": config.rate_count, "rate_seconds": config.rate_seconds,
                  "key_tag": config.key_tag, "key_concurrency": config.key_concurrency,
                  "updated_at": now()}
        default, tag = config.name == DEFAULT_QUEUE, config.key_tag

        def op(tx: Tx) -> None:
            tx.execute(upsert, values)
            if tag is not None:
                backfill = self._stmt(("backfill_keys", default, tag), partial(
                    _stmt_backfill_keys, default, self._tag_value(tag)))
                tx.execute(backfill, {"queue": config.name})

        await self._write(op)

    async def list_queues(self) -> list[QueueStats]:
        configs = self._stmt("queue_configs", lambda: sa.select(*_q.c).order_by(_q.c.name))
        load = self._stmt("queue_load", _stmt_queue_load)

        def op(tx: Tx) -> list[QueueStats]:
            t = now()
            found = {row[0]: _queue_config(row) for row in tx.rows(configs, {})}
            counts: dict[str, dict[str, int]] = {}
            for queue, pending, running, sleeping, blocked in tx.rows(load, {"t": t}):
                name = queue or DEFAULT_QUEUE
                counts[name] = {"pending": int(pending or 0), "running": int(running or 0),
                                "sleeping": int(sleeping or 0), "blocked": int(blocked or 0)}
                found.setdefault(name, QueueConfig(name=name))
            return [QueueStats(config=found[n], **counts.get(n, {})) for n in sorted(found)]

        return await self._read(op)

    async def acquire(
        self,
        execution_id: str,
        owner: str,
        *,
        lease_seconds: float,
        takeover_from: str | None = None,
    ) -> ExecutionRecord | None:
        acquire = self._stmt("acquire", _stmt_acquire)

        def op(tx: Tx) -> ExecutionRecord | None:
            t = now()
            values = {"id": execution_id, "worker": owner, "t": t, "expires": t + lease_seconds,
                      "takeover": takeover_from}
            row = tx.first(acquire, values)
            return None if row is None else record_from_row(row)

        return await self._write(op)

    async def renew_lease(
        self, worker_id: str, execution_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        if not execution_ids:
            return []
        renew = self._stmt("renew", _stmt_renew)

        def op(tx: Tx) -> list[str]:
            t = now()
            values = {"worker": worker_id, "t": t, "expires": t + lease_seconds}
            return [
                eid for eid in execution_ids if tx.first(renew, {**values, "id": eid}) is not None
            ]

        return await self._write(op)

    async def release(self, worker_id: str, execution_id: str) -> None:
        release = self._stmt("release", lambda: _stmt_release(self._announce()))
        released = await self._write(
            lambda tx: tx.first(release, {"id": execution_id, "worker": worker_id}) is not None
        )
        if released:  # a worker waiting for work, or a follower waiting to take over
            self._notify(execution_id)

    async def expire_leases(self, owner: str) -> list[str]:
        expire = self._stmt("expire_leases", lambda: _stmt_expire_leases(self._announce()))

        def op(tx: Tx) -> list[str]:
            t = now()
            return [row[0] for row in tx.rows(expire, {"owner": owner, "t": t,
                                                       "expired": t - 1})]

        expired = await self._write(op)
        for execution_id in expired:  # a worker of this process waiting for work
            self._notify(execution_id)
        return expired

    async def wake(self, execution_id: str) -> bool:
        wake = self._stmt("wake", lambda: _stmt_wake(self._announce()))
        woken = await self._write(
            lambda tx: tx.first(wake, {"id": execution_id, "t": now()}) is not None)
        if woken:  # a worker of this process waiting for work
            self._notify(execution_id)
        return woken

    async def due_timers(self, now: float) -> list[tuple[str, float]]:
        due = self._stmt("due", _stmt_due)
        return await self._read(
            lambda tx: [(eid, float(at)) for eid, at in tx.rows(due, {"t": now})]
        )

    # tokens -----------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> bool:
        # a live token with this name (the partial unique index) or this hash: no insert;
        # one statement, so two concurrent creates of one name cannot both succeed
        insert = self._stmt("token_insert", lambda: self._dialect_insert(tokens)
                            .on_conflict_do_nothing().returning(tokens.c.id))
        values = {"id": token.id, "name": token.name, "scope": token.scope,
                  "hash": token.hash, "prefix": token.prefix, "created_at": token.created_at,
                  "last_used_at": token.last_used_at, "revoked_at": token.revoked_at}
        return await self._write(lambda tx: tx.first(insert, values) is not None)

    async def get_token(self, token_hash: str) -> TokenRecord | None:
        get = self._stmt("token_get", lambda: sa.select(*tokens.c).where(
            tokens.c.hash == _p("hash")))
        row = await self._read(lambda tx: tx.first(get, {"hash": token_hash}))
        return None if row is None else _token_from_row(row)

    async def list_tokens(self) -> list[TokenRecord]:
        every = self._stmt("token_list", lambda: sa.select(*tokens.c).order_by(
            tokens.c.created_at.desc(), tokens.c.id))
        return [_token_from_row(r) for r in await self._read(lambda tx: tx.rows(every, {}))]

    async def revoke_token(self, token_id: str) -> bool:
        revoke = self._stmt("token_revoke", lambda: sa.update(tokens).where(
            tokens.c.id == _p("id"), tokens.c.revoked_at.is_(None)).values(
            revoked_at=_p("t")).returning(tokens.c.id))
        return await self._write(
            lambda tx: tx.first(revoke, {"id": token_id, "t": now()}) is not None)

    async def touch_token(self, token_id: str, t: float) -> None:
        touch = self._stmt("token_touch", lambda: sa.update(tokens).where(
            tokens.c.id == _p("id")).values(last_used_at=_p("t")))
        await self._write(lambda tx: tx.execute(touch, {"id": token_id, "t": t}))
    # end of tokens ----------------------------------------------------------------------

    # riding out outages -----------------------------------------------------------------
    def _outage_message(self, reason: str, seconds: float) -> str:
        """What to say when an operation failed for ``seconds`` (0: retrying is off)."""
        waited = f" for {seconds:g} s" if seconds else " (retrying is off: retry_for=0)"
        return f"the store {self.url} stayed unavailable{waited}: {reason}"

    async def _ride_out(
        self,
        attempt: Callable[[], Awaitable[T]],
        error: TransientError,
        resolve: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Try ``attempt`` again (its first try failed with ``error``) with backoff, until
        it succeeds, fails for good, or ``retry_for`` seconds have passed.

        A write whose connection broke during its commit may have committed: when a retry
        then fails with ``AppendConflictError``, ``resolve`` tells whether that earlier try
        did what this one was to do (its result), or not (``None``: the conflict stands).
        """
        started = time.monotonic()
        delay = _BACKOFF_FIRST
        tries = 0
        while True:
            left = started + self.retry_for - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    self._outage_message(error.reason, self.retry_for)
                ) from error.__cause__
            tries += 1
            wait, delay = backoff(delay)
            wait = min(wait, left)
            log.warning("store_retrying", store=self.url, reason=error.reason, attempt=tries,
                        retry_in=round(wait, 3), retry_for=self.retry_for)
            await asyncio.sleep(wait)
            try:
                result = await attempt()
            except TransientError as exc:
                error = exc
                continue
            except AppendConflictError:
                resolved = None if resolve is None else await resolve()
                if resolved is None:
                    raise
                result = resolved
            log.info("store_recovered", store=self.url, attempts=tries,
                     seconds=round(time.monotonic() - started, 3))
            return result

    async def _committed_append(
        self, execution_id: str, first_seq: int, data: Sequence[bytes]
    ) -> AppendResult | None:
        """Whether an append retried after a broken connection had committed after all:
        the events at its seqs are, byte for byte, the ones it wrote. Then its result.

        Called only when such a retry found its seqs taken (:meth:`_ride_out`).
        """
        if not data:
            return None
        last = first_seq + len(data) - 1
        appended = self._stmt("appended", _stmt_appended)
        values = {"id": execution_id, "first": first_seq, "last": last}
        rows = await self._read(lambda tx: tx.rows(appended, values))
        if len(rows) != len(data) or any(
            bytes(row[0]) != bytes(sent) for row, sent in zip(rows, data, strict=True)
        ):
            return None
        log.info("store_append_resolved", store=self.url, execution_id=execution_id,
                 seqs=f"{first_seq}..{last}")
        return AppendResult(last, bool(rows[0][1]))


# tokens ----------------------------------------------------------------------------------
def _token_from_row(row: Row) -> TokenRecord:
    id_, name, scope, hash_, prefix, created_at, last_used_at, revoked_at = row
    return TokenRecord(id=id_, name=name, scope=scope, hash=hash_, prefix=prefix,
                       created_at=float(created_at), last_used_at=_float(last_used_at),
                       revoked_at=_float(revoked_at))
# end of tokens ---------------------------------------------------------------------------


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has finished."""
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


def settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    """Hand a worker's outcome to the caller waiting on ``future`` (on the caller's loop);
    a caller that was cancelled meanwhile gets nothing."""
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
