"""The Postgres backend: psycopg 3 on worker threads, pooled, for production.

Every operation runs on a worker thread that alone uses one psycopg connection: a read in
autocommit, a write in its own short transaction, an append as one statement. Postgres runs
the workers in parallel and shares WAL flushes between concurrent commits; writes that queue
up while every worker is busy are committed together, one transaction per worker (group
commit). Why threads and the sync driver: measured on a 2-core machine, an operation's
round trips cost about half the CPU on a sync psycopg connection that they cost on psycopg's
async one; SQLAlchemy's async engine (greenlet adapter, pool, events) cost several times
more. A hand-off to a waiting thread does cost wall time (two thread wake-ups, about 0.1 ms
here), which a caller alone pays on every step: so a write runs on the caller's own thread,
on an idle worker's connection, when nothing else waits on its event loop and no other
operation is under way (``_serve_inline``); a watchdog cuts such a write's connection if
the server stops answering for ``inline_timeout`` seconds, so the loop is never held for
long. The appends and creates that several tasks make
in one turn of the event loop go to one worker together, as one transaction (``_dispatch``):
a worker process running many executions pays one thread wake-up and one commit for them
all. A batch of appends whose statements stand alone (their chains known) is sent at once
in pipeline mode, ``BEGIN`` to ``COMMIT``, in one round trip (``_serve_pipelined``).
Statements are
SQLAlchemy Core compiled once for the postgresql dialect, with bound parameters; psycopg
prepares each one on a connection after a few uses.

Workers claim with one statement (a ``FOR UPDATE SKIP LOCKED`` CTE, then
``UPDATE ... RETURNING``), so two workers never lease the same execution and never wait for
each other.

Changes are announced with ``NOTIFY flow_events, '<execution id>'`` inside the writing
transaction (delivered only if it commits): a new execution, a status or timer change, a
cancel, a released lease, and the appends of an execution someone follows (``watch``).
Not every append: the server serialises the commits of notifying transactions on its
notification queue, which cost the queue benchmark about a third of its throughput. One
dedicated connection LISTENs and wakes the waiters of this process; when it is down,
waiting falls back to polling.

Outages are ridden out: an operation that fails because the connection broke (server
restarted, backend terminated, connection refused meanwhile) is tried again on a new
connection, with backoff, for ``retry_for`` seconds (default 60). An append whose connection
broke during its commit may have committed: if its retry finds its seqs taken by the very
events it wrote, it succeeded (``SQLEventStore._committed_append``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .base import (
    UNSET,
    WATCH_SECONDS,
    AppendResult,
    ExecutionRecord,
    ExecutionStatus,
    StoredEvent,
    StoreNotFoundError,
    now,
)
from .chain import chain_all, verified
from .errors import AppendConflictError, HistoryCorruptedError, StoreError, StoreUnavailableError
from .events import ENCODING, Event, encode_event, event_type_name
from .schema import events as events_table
from .schema import executions, migrate, queues, watches
from .sql import (
    _BACKOFF_FIRST,
    _BACKOFF_MAX,
    Prepared,
    Row,
    SQLEventStore,
    TransientError,
    Tx,
    _stmt_append_check,
    _stmt_append_update,
    _stmt_lease_one,
    backoff,
    log,
    record_from_row,
    retry_for_option,
    settle,
)

__all__ = ["PostgresEventStore"]

# psycopg warns on its logger about what the store handles itself (a pipeline it could not
# end on a connection that broke): without a handler of the application's, Python's
# last-resort handler would print that on stderr, and the library prints nothing
logging.getLogger("psycopg").addHandler(logging.NullHandler())

T = TypeVar("T")

#: the ``flow_watches`` key of a follower of every execution
WATCH_ALL = "*"

#: the NOTIFY channel; the payload is the id of the execution that changed
CHANNEL = "flow_events"
#: the NOTIFY payload of a cancel request starts with this, then the execution's id
CANCEL_PREFIX = "cancel:"
#: advisory lock key serialising schema migrations ("flow" in ASCII)
_MIGRATION_LOCK = 0x666C6F77
_DRIVERS = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async")
_STOP = object()
#: most events an append writes in one statement (each size is a statement of its own)
_MAX_ROWS = 100
#: most writes committed together
_MAX_BATCH = 10
#: seconds a write on the caller's thread may hold its event loop (``inline_timeout``)
_INLINE_TIMEOUT = 5.0
#: how long a batch waits for a row lock before it is undone and its writes run one by one:
#: a batch locks many rows, so it must not sit in a lock cycle until deadlock detection
_BATCH_LOCK_TIMEOUT = "50ms"
#: a pipelined batch's lock timeout (the simple query above cannot be pipelined)
_LOCK_TIMEOUT_LOCAL = f"SELECT set_config('lock_timeout', '{_BATCH_LOCK_TIMEOUT}', true)".encode()
#: how a batch begins: its transaction and lock timeout in one round trip
_BEGIN_BATCH = f"BEGIN; SET LOCAL lock_timeout = '{_BATCH_LOCK_TIMEOUT}'".encode()
#: server errors that say the connection is gone or the server is going away or coming back
#: (admin shutdown, crash shutdown, cannot connect now); class 08 too: connection exception
_TRANSIENT_STATES = frozenset({"57P01", "57P02", "57P03"})
#: what a failed (re)connection says when retrying cannot help
_PERMANENT = ("does not exist", "authentication failed", "password", "pg_hba.conf",
              "permission denied")
# what a request runs as: a read (autocommit), a write (its own transaction), or a write of
# one statement (autocommit); both kinds of write can join a batch
_READ, _WRITE, _STATEMENT = 0, 1, 2


class _Tx(Tx):
    """A :class:`Tx` on a psycopg connection: results in binary (measured: a 10,000-event
    history loads ~5 ms faster than in text, bytea as hex), and statements compiled per
    call."""

    __slots__ = ()

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._cur = conn.cursor(binary=True)

    def executemany(self, stmt: Prepared, values: Sequence[Mapping[str, Any]]) -> None:
        if len(values) == 1:  # psycopg would enter pipeline mode even for one
            self._cur.execute(stmt.sql, stmt.bind(values[0]))
        else:
            super().executemany(stmt, values)

    def select(self, sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        self._cur.execute(sql, params)
        rows: list[tuple[Any, ...]] = self._cur.fetchall()
        return rows


class _Request:
    """One operation waiting for a worker."""

    __slots__ = ("future", "kind", "loop", "op")

    def __init__(
        self, op: Callable[[_Tx], Any], kind: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.op = op
        self.kind = kind
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


class _Pipelinable:
    """An operation that can also run as its one statement among others sent at once (a
    pipelined batch): ``values()`` gives the statement's parameters when it is sent,
    ``finish(row)`` the result from its row. No row: run the operation alone (it finds why).
    """

    __slots__ = ("finish", "op", "stmt", "values")

    def __init__(self, op: Callable[[_Tx], Any], stmt: Prepared,
                 values: Callable[[], Mapping[str, Any]], finish: Callable[[Row], Any]) -> None:
        self.op, self.stmt, self.values, self.finish = op, stmt, values, finish

    def __call__(self, tx: _Tx) -> Any:
        return self.op(tx)


class _Worker:
    """A thread and the connection only it uses (opened on first use, dropped when broken)."""

    __slots__ = ("conn", "inbox", "tx")

    def __init__(self) -> None:
        self.inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.conn: psycopg.Connection[Any] | None = None
        self.tx: _Tx | None = None

    def disconnect(self) -> None:
        conn, self.conn, self.tx = self.conn, None, None
        if conn is not None:
            conn.close()


class PostgresEventStore(SQLEventStore):
    """Executions and events in a PostgreSQL database.

    Args:
        url: ``postgresql://user:password@host:5432/dbname`` (``postgres://`` and
            ``postgresql+psycopg://`` work too).
        pool_size: connections (and worker threads) kept open; ``max_overflow`` more may be
            opened under load, and are closed when ``pool_size`` others are idle (0 by
            default: under a worker's bursty load they were opened and closed all the time,
            which cost Postgres more than waiting for a pooled connection). Both can
            be given in the URL too (``?pool_size=4&max_overflow=2``): many worker
            processes on one server share its ``max_connections``.
        listen: wake waiters with LISTEN/NOTIFY (else only polling).
        retry_for: seconds an operation is retried while the connection is lost (server
            restarting, backend terminated) before it fails; 0 fails at once. Also
            ``?retry_for=60`` in the URL. Default 60.
        create: create the schema in a database that has none; ``False`` makes that an
            error, so that reading from a mistyped database does not create a store.
        inline: let a write run on the caller's thread when nothing else waits on its
            event loop (one caller alone, e.g. a chain of steps), which saves a thread
            hand-off; ``?inline=0`` in the URL turns it off (an operation then never
            holds the event loop).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 0,
        connect_timeout: float = 10.0,
        listen: bool = True,
        retry_for: float | None = None,
        create: bool = True,
        inline: bool = True,
    ) -> None:
        super().__init__()
        self.create = create
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise StoreUnavailableError(
                "malformed PostgreSQL store URL: use postgresql://user:password@host:5432/dbname"
            ) from None
        if parsed.drivername not in _DRIVERS:
            raise StoreUnavailableError(
                f"{parsed.drivername}:// is not a PostgreSQL URL this store understands: use "
                "postgresql://user:password@host:5432/dbname"
            )
        self.retry_for = retry_for_option(
            retry_for, {k.lower(): v for k, v in parsed.query.items()}
        )
        query = {k.lower(): v for k, v in parsed.query.items()}
        for name in ("pool_size", "max_overflow"):  # ?pool_size=4&max_overflow=2 in the URL
            if name in query:
                raw = query[name]
                try:
                    number = int(raw if isinstance(raw, str) else raw[-1])
                except ValueError:
                    raise StoreUnavailableError(
                        f"{name} in the store URL must be a whole number, got {raw!r}"
                    ) from None
                if name == "pool_size":
                    pool_size = number
                else:
                    max_overflow = number
        if "inline" in query:
            raw = query["inline"]
            flag = (raw if isinstance(raw, str) else raw[-1]).lower()
            if flag not in ("0", "1", "true", "false"):
                raise StoreUnavailableError(
                    f"inline in the store URL must be 0 or 1, got {raw!r}"
                )
            inline = flag in ("1", "true")
        parsed = parsed.difference_update_query(
            [k for k in parsed.query
             if k.lower() in ("retry_for", "pool_size", "max_overflow", "inline")]
        )
        self._url = parsed.set(drivername="postgresql+psycopg")
        #: the URL with the password masked, for messages
        self.url = self._url.render_as_string(hide_password=True)
        self._conninfo = self._url.set(drivername="postgresql").render_as_string(
            hide_password=False
        )
        self._pool_size = max(1, pool_size)
        self._max_workers = self._pool_size + max(0, max_overflow)
        self._connect_timeout = max(1, round(connect_timeout))
        self._listen = listen
        self._open = False
        #: transactions that committed several writes, for tests and diagnostics
        self.batch_count = 0
        # The workers: all of them, the idle ones (the last to finish is reused first, so a
        # lone caller keeps one warm connection), and requests waiting for one. Shared with
        # the worker threads under ``_lock``.
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._backlog: deque[_Request] = deque()
        self._threads: list[threading.Thread] = []
        self._listener: threading.Thread | None = None
        self._listen_stop: tuple[socket.socket, socket.socket] | None = None
        self._listening = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listen_connects = 0  # how many times LISTEN (re)connected, for tests
        #: operations handed to worker threads and not yet answered (by this loop's callers)
        self._inflight = 0
        #: whether a write may run on the caller's thread when nothing else waits (see
        #: ``_serve_inline``); ``?inline=0`` in the URL turns it off
        self.inline = inline
        #: writes run on the caller's thread, for tests and diagnostics
        self.inline_count = 0
        #: seconds a write run on the caller's thread may hold its event loop: a server that
        #: stops answering without closing the connection (a network partition, a stopped
        #: host) then has the connection cut, and the write is tried again on a worker
        #: thread, so that the loop (its timers, its signal handlers) goes on meanwhile
        self.inline_timeout = _INLINE_TIMEOUT
        #: the write being run on a caller's thread: its worker and since when
        self._inline_running: tuple[_Worker, float] | None = None
        self._watchdog: threading.Thread | None = None
        #: inline writes whose connection the watchdog cut, for tests and diagnostics
        self.inline_cuts = 0
        #: whether the appends made in one turn of the event loop go to a worker together
        self.coalesce = True
        self._coalescing: dict[asyncio.AbstractEventLoop, list[_Request]] = {}

    # lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._open:
            return
        self._dialect = await asyncio.to_thread(self._migrate)
        with self._lock:
            self._workers, self._idle, self._backlog = [], [], deque()
            self._open = True
        self._loop = asyncio.get_running_loop()

    def listen(self) -> None:
        """LISTEN from now on (a connection and a thread of its own), if not yet: started
        by the first wait for another process's change, or by a worker as it starts. A
        process that never waits for one (it runs its executions itself) has no listener,
        and the NOTIFYs of its commits wake nobody here: measured, a small sequential
        workflow 5% faster on two cores than with a listener woken three times each."""
        if not self._listen or not self._open or self._listener is not None:
            return
        self._listen_stop = socket.socketpair()
        self._listener = threading.Thread(
            target=self._listen_thread,
            args=(self._loop or asyncio.get_running_loop(), self._listen_stop[0]),
            name="flow-pg-listen",
            daemon=True,
        )
        self._listener.start()

    def _migrate(self) -> sa.Dialect:
        """Create or migrate the schema; returns the dialect statements are compiled for.

        A server that is starting up or shutting down is waited for (up to ``retry_for``);
        any other failure (refused, unknown host, bad credentials) fails at once: opening
        a store is where a wrong URL shows.
        """
        engine = sa.create_engine(
            self._url,
            poolclass=sa.NullPool,
            connect_args={"connect_timeout": self._connect_timeout},
        )
        deadline = time.monotonic() + self.retry_for
        delay, tries = _BACKOFF_FIRST, 0
        try:
            while True:
                try:
                    with engine.begin() as conn:
                        # Concurrent openers wait here instead of racing to create the tables.
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                        if not self.create and not sa.inspect(conn).has_table(executions.name):
                            raise StoreNotFoundError(
                                f"no flow store in the PostgreSQL database "
                                f"{self._url.database!r} at {self._where()}: it has no flow "
                                "tables; check the URL (or start an execution there to create "
                                "the store)")
                        migrate(conn)
                    return engine.dialect
                except (sa.exc.DBAPIError, psycopg.Error, OSError) as exc:
                    reason = self._reason(exc)
                    if "the database system is" not in reason or time.monotonic() >= deadline:
                        raise StoreUnavailableError(self._unavailable_message(exc)) from None
                    tries += 1
                    wait, delay = backoff(delay)
                    log.warning("store_retrying", store=self.url, reason=reason, attempt=tries,
                                retry_in=round(wait, 3), retry_for=self.retry_for)
                    time.sleep(wait)
        finally:
            engine.dispose()

    async def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            backlog, self._backlog = list(self._backlog), deque()
            workers, self._workers, self._idle = self._workers, [], []
            threads, self._threads = self._threads, []
        for request in backlog:
            _resolve(request, False, StoreError("the PostgreSQL store was closed"))
        for worker in workers:  # busy ones stop after their request
            worker.inbox.put(_STOP)
        listener, self._listener = self._listener, None
        stop, self._listen_stop = self._listen_stop, None
        if stop is not None:
            stop[1].send(b"x")
        try:
            await asyncio.to_thread(_join, [*threads, *([listener] if listener else [])])
        finally:
            if stop is not None:
                stop[0].close()
                stop[1].close()

    def _reason(self, exc: BaseException) -> str:
        """The driver's message on one line, without the password."""
        orig = getattr(exc, "orig", None) or exc
        reason = " ".join(str(orig).split()) or type(orig).__name__
        password = self._url.password
        if password:
            reason = reason.replace(str(password), "***")
        return reason

    def _where(self) -> str:
        return f"{self._url.host or 'localhost'}:{self._url.port or 5432}"

    def _outage_message(self, reason: str, seconds: float) -> str:
        where = self._where()
        if not seconds:
            return (
                f"lost the connection to PostgreSQL at {where} (server restarting?): {reason}; "
                "retrying is off (retry_for=0 in the store URL)"
            )
        return (
            f"lost the connection to PostgreSQL at {where} (server restarting?) and could not "
            f"reconnect for {seconds:g} s: {reason}; check that the server is running, or "
            "wait longer with ?retry_for=SECONDS in the store URL"
        )

    def _unavailable_message(self, exc: BaseException) -> str:
        """Say what went wrong and how to fix it, without the password."""
        reason = self._reason(exc)
        where = self._where()
        lowered = reason.lower()
        if "does not exist" in lowered and "database" in lowered:
            hint = (
                f"create it (createdb -h {self._url.host or 'localhost'} "
                f"-U {self._url.username or 'postgres'} {self._url.database}) "
                "or fix the database name in the URL"
            )
        elif "password" in lowered or "authentication" in lowered:
            hint = "check the user name and password in the URL"
        else:
            hint = f"check that PostgreSQL is running and reachable at {where}"
        return f"cannot open the PostgreSQL store {self.url}: {reason}; {hint}"

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
        # One statement, in autocommit: the guarded row update of ``sql.py`` and the
        # events' insert in one data-modifying CTE (the insert selects from the update, so it
        # inserts nothing when the guard fails). One round trip instead of four (BEGIN,
        # update, insert, COMMIT); measured: ~0.3 ms less per append, and less than half the
        # CPU. Why it failed is then read as in ``sql.py``.
        if not 0 < len(events) <= _MAX_ROWS:
            return await super().append(
                execution_id,
                expected_seq,
                events,
                status=status,
                error=error,
                wake_at=wake_at,
                lease_owner=lease_owner,
                lease_token=lease_token,
            )
        terminal = status is not None and status.is_terminal
        shape = (status is not None, terminal, error is not None, wake_at is not UNSET)
        leased = lease_owner is not None
        fenced = lease_token is not None
        n = len(events)
        append = self._stmt(
            ("append_one", *shape, leased, fenced, n),
            lambda: self._append_statement(shape, leased, fenced, n),
        )
        check = self._stmt("append_check", _stmt_append_check)
        new_last = expected_seq + n - 1
        values: dict[str, Any] = {
            "id": execution_id,
            "prev_last": expected_seq - 1,
            "new_last": new_last,
            "status": None if status is None else status.value,
            "error": error,
            "wake_at": None if wake_at is UNSET else wake_at,
            "lease_owner": lease_owner,
            "lease_token": lease_token,
            "encoding": ENCODING,
        }
        encoded = [
            (expected_seq + i, event_type_name(e), encode_event(e)) for i, e in enumerate(events)
        ]
        for i, (seq, type_name, data) in enumerate(encoded):
            values[f"seq_{i}"] = seq
            values[f"type_{i}"] = type_name
            values[f"data_{i}"] = data

        def chain(prev_chain: str | None) -> None:
            chains = chain_all(prev_chain, encoded)
            values["prev_chain"], values["last_chain"] = prev_chain, chains[-1]
            for i, value in enumerate(chains):
                values[f"chain_{i}"] = value

        # Chained from the cached end of the log, else from the row's (read first).
        known, prev = self._chains.prev(execution_id, expected_seq - 1)
        if known:
            chain(prev)
        appended: list[str] = []  # the new last chain, once the guarded update matched

        def run(tx: _Tx) -> Any:
            try:
                return tx.first(append, values)
            except psycopg.Error as exc:
                if not self._is_unique_violation(exc):
                    raise
                raise AppendConflictError(execution_id, expected_seq, expected_seq - 1) from None

        def op(tx: _Tx) -> AppendResult:
            t = values["t"] = now()
            if not known:
                found = tx.first(check, {"id": execution_id})
                chain(None if found is None else found[4])
            row = run(tx)
            if row is None:
                # if only the chain differs (a stale cache), chain from the row's, once
                chain(self._append_failed(
                    tx, check, execution_id, expected_seq, lease_owner, lease_token, t,
                    retry=True,
                ))
                row = run(tx)
                if row is None:
                    self._append_failed(
                        tx, check, execution_id, expected_seq, lease_owner, lease_token, t
                    )
            appended[:] = [values["last_chain"]]
            assert row is not None
            return AppendResult(new_last, bool(row[0]))

        def send() -> dict[str, Any]:
            values["t"] = now()
            return values

        def finish(row: Row) -> AppendResult:
            appended[:] = [values["last_chain"]]
            return AppendResult(new_last, bool(row[0]))

        result: AppendResult = await self._run(
            _Pipelinable(op, append, send, finish) if known else op,
            _STATEMENT,
            lambda: self._committed_append(
                execution_id, expected_seq, [values[f"data_{i}"] for i in range(n)]
            ),
        )
        self._appended(execution_id, new_last, appended, status)
        self._notify(execution_id)  # in this process: always (it costs nothing)
        return result

    def _append_statement(
        self, shape: tuple[bool, bool, bool, bool], leased: bool, fenced: bool, n: int
    ) -> sa.Select[Any]:
        """``append`` of ``n`` events as one statement: the guarded update of ``sql.py``
        as a CTE, and an insert of the events from it."""
        appended = _stmt_append_update(
            self._announce(always=shape[0] or shape[3]), *shape, leased, fenced, chained=True
        ).cte("appended")
        new_events = sa.values(
            sa.column("seq", sa.Integer),
            sa.column("type", sa.Text),
            sa.column("data", sa.LargeBinary),
            sa.column("chain", sa.Text),
            name="new_events",
        ).data(
            [
                (
                    sa.bindparam(f"seq_{i}", type_=sa.Integer),
                    sa.bindparam(f"type_{i}", type_=sa.Text),
                    sa.bindparam(f"data_{i}", type_=sa.LargeBinary),
                    sa.bindparam(f"chain_{i}", type_=sa.Text),
                )
                for i in range(n)
            ]
        )
        rows = sa.select(
            sa.bindparam("id", type_=sa.Text),
            new_events.c.seq,
            new_events.c.type,
            sa.bindparam("encoding", type_=sa.Integer),
            new_events.c.data,
            sa.bindparam("t", type_=sa.Double),
            new_events.c.chain,
        ).select_from(appended)
        inserted = (
            sa.insert(events_table)
            .from_select(
                ["execution_id", "seq", "type", "encoding", "data", "created_at", "chain"], rows
            )
            .cte("inserted")
        )
        return sa.select(appended.c.cancel_requested).add_cte(inserted)

    # running operations -----------------------------------------------------------------
    async def _write(
        self, op: Callable[[Tx], T], *, resolve: Callable[[], Awaitable[T | None]] | None = None
    ) -> T:
        return await self._run(op, _WRITE, resolve)

    async def _read(self, op: Callable[[Tx], T]) -> T:
        return await self._run(op, _READ)

    async def _select_executions(self, query: sa.Select[Any]) -> list[ExecutionRecord]:
        # Compiled per call: the filters decide its shape. Values stay bound parameters
        # (``render_postcompile`` only expands ``IN`` into one parameter per item).
        if self._dialect is None:
            raise StoreError("the PostgreSQL store is not open: use `async with store:` first")
        compiled = query.compile(dialect=self._dialect, compile_kwargs={"render_postcompile": True})
        sql, params = compiled.string, compiled.params
        return await self._run(
            lambda tx: [record_from_row(row) for row in tx.select(sql, params)], _READ
        )

    async def _run(
        self,
        op: Callable[[_Tx], T],
        kind: int,
        resolve: Callable[[], Awaitable[T | None]] | None = None,
    ) -> T:
        """Run ``op`` on a worker; through an outage, again on a new connection until
        ``retry_for`` has passed (``resolve``: see ``SQLEventStore._ride_out``)."""
        try:
            return await self._submit(op, kind)
        except TransientError as exc:
            return await self._ride_out(lambda: self._submit(op, kind), exc, resolve)

    async def _submit(self, op: Callable[[_Tx], T], kind: int) -> T:
        """Run ``op`` once on an idle worker (started if there is none and the pool has
        room), or when one is free."""
        loop = asyncio.get_running_loop()
        request = _Request(op, kind, loop)
        if kind != _READ and self._inflight == 0 and self.inline and _loop_idle(loop):
            ok, value = self._serve_inline(request)
            if ok is not None:
                if ok:
                    result: T = value
                    return result
                raise value
        self._inflight += 1
        try:
            if kind == _STATEMENT and self.coalesce:
                # gathered until the callbacks ready now have run: the appends and creates
                # that other tasks make in this turn of the loop go to one worker together
                pending = self._coalescing.setdefault(loop, [])
                pending.append(request)
                if len(pending) == 1:
                    loop.call_soon(self._dispatch, loop)
                result = await request.future
            else:
                result = await self._submit_to_worker(request)
            return result
        finally:
            self._inflight -= 1

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand the writes gathered in this turn of ``loop`` to a worker: alone, or together
        in one transaction (one commit, one thread wake-up for all of them)."""
        pending = self._coalescing.pop(loop, [])
        pending = [r for r in pending if not r.future.done()]  # callers cancelled meanwhile
        if not pending:
            return
        chunk, rest = pending[:_MAX_BATCH], pending[_MAX_BATCH:]
        with self._lock:
            closed = not self._open
            if closed:
                worker: _Worker | None = None
            elif self._idle:
                worker = self._idle.pop()
            elif len(self._workers) < self._max_workers:
                worker = self._start_worker()
            else:
                worker, rest = None, pending
            if not closed:
                self._backlog.extend(rest)  # the next worker to finish takes them
        if worker is not None:
            worker.inbox.put(chunk if len(chunk) > 1 else chunk[0])
        if closed:
            for request in pending:
                _resolve(request, False, StoreError("the PostgreSQL store was closed"))

    def _serve_inline(self, request: _Request) -> tuple[bool | None, Any]:
        """Run a write on this thread with an idle worker's open connection: (ok, result),
        or (None, None) if no worker is idle with a connection.

        Only when nothing else waits on this event loop and no other operation of this
        store is under way (``_submit``): then blocking the loop for the write's round trip
        delays no one, and it saves the two thread wake-ups of a hand-off (measured: a
        sequential append 0.54 -> 0.38 ms, a chain of trivial steps 1,400 -> 2,300 steps/s).
        Reads are never run here: a long history would hold the loop.
        """
        with self._lock:
            worker = self._idle.pop() if self._open and self._idle else None
        if worker is None:
            return None, None
        try:
            if worker.tx is None:  # opening a connection takes a while: not on this thread
                return None, None
            self.inline_count += 1
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch_inline, name="flow-pg-watchdog", daemon=True)
                self._watchdog.start()
            self._inline_running = (worker, time.monotonic())
            try:
                return self._serve(worker, request)
            finally:
                self._inline_running = None
        finally:
            with self._lock:
                if self._open:  # else close() has told its thread to stop
                    self._idle.append(worker)

    def _watch_inline(self) -> None:
        """Cut the connection of a write that has held its caller's event loop for longer
        than ``inline_timeout`` (``_serve_inline``): its ``recv`` then fails at once, and
        the write goes the way of any broken connection (tried again on a worker thread,
        recognised there if it had committed)."""
        while self._open:
            time.sleep(min(0.25, self.inline_timeout / 4))
            running = self._inline_running
            if running is None or time.monotonic() - running[1] < self.inline_timeout:
                continue
            worker, _ = running
            conn = worker.conn
            if conn is None or conn.closed or self._inline_running is not running:
                continue
            try:
                # shut the socket down under psycopg (a duplicate descriptor, closed here;
                # psycopg's own is left for it to close when it finds the connection broken)
                with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, psycopg.Error):  # closed meanwhile
                continue
            self.inline_cuts += 1
            log.warning("store_inline_write_cut", store=self.url,
                        seconds=round(time.monotonic() - running[1], 3))

    async def _submit_to_worker(self, request: _Request) -> Any:
        with self._lock:
            if not self._open:
                raise StoreError("the PostgreSQL store is not open: use `async with store:` first")
            if self._idle:
                worker: _Worker | None = self._idle.pop()
            elif len(self._workers) < self._max_workers:
                worker = self._start_worker()
            else:
                worker = None
                self._backlog.append(request)
        if worker is not None:
            worker.inbox.put(request)
        return await request.future

    def _start_worker(self) -> _Worker:
        """A new worker and its thread (called under ``_lock``)."""
        worker = _Worker()
        self._workers.append(worker)
        self._threads = [t for t in self._threads if t.is_alive()]
        thread = threading.Thread(
            target=self._work, args=(worker,), name="flow-pg-worker", daemon=True
        )
        self._threads.append(thread)
        thread.start()
        return worker

    def _work(self, worker: _Worker) -> None:
        """A worker thread: serve requests until told to stop."""
        try:
            item = worker.inbox.get()
            while item is not _STOP:
                batch = item if isinstance(item, list) else [item]
                try:
                    outcomes = (self._serve_batch(worker, batch) if len(batch) > 1
                                else [self._serve(worker, item)])
                except BaseException as exc:  # a bug: its callers hear of it, the thread goes on
                    worker.disconnect()
                    outcomes = [(False, exc)] * len(batch)
                _resolve_all(batch, outcomes)
                item = self._next(worker)
                if item is None:
                    item = worker.inbox.get()
        finally:
            worker.disconnect()

    def _next(self, worker: _Worker) -> Any:
        """What ``worker`` does next: a waiting read, the waiting writes (a list), ``_STOP``,
        or ``None`` (wait in its inbox)."""
        with self._lock:
            backlog = self._backlog
            if backlog:
                first = backlog.popleft()
                if first.kind == _READ:
                    return first
                # Every waiting write: each comes from a caller awaiting it, so none of them
                # depends on another, nor on a read still waiting.
                batch, reads = [first], deque[_Request]()
                while backlog and len(batch) < _MAX_BATCH:
                    request = backlog.popleft()
                    (reads if request.kind == _READ else batch).append(request)
                reads.extend(backlog)
                self._backlog = reads
                return batch if len(batch) > 1 else first
            if not self._open:
                return _STOP
            if len(self._idle) >= self._pool_size:  # overflow: close when not needed
                self._workers.remove(worker)
                return _STOP
            self._idle.append(worker)
            return None

    def _serve_batch(self, worker: _Worker, batch: list[_Request]) -> list[tuple[bool, Any]]:
        """Run writes in one transaction: (True, result) each, or, if any of them fails
        (a conflict, a lock waited for too long), undo them all and run each alone."""
        if all(isinstance(request.op, _Pipelinable) for request in batch):
            return self._serve_pipelined(worker, batch)

        def op(tx: _Tx) -> list[Any]:
            return [request.op(tx) for request in batch]

        try:
            values = _in_transaction(worker, op, self._connect(worker), begin=_BEGIN_BATCH)
        except Exception as exc:
            if not (isinstance(exc, psycopg.Error) and _lost(worker, exc)):
                return [self._serve(worker, request) for request in batch]
            # The connection failed, perhaps during COMMIT: the writes' fate is unknown.
            # Each is tried again alone (``_run``); an append that did commit is recognised.
            worker.disconnect()
            return [(False, self._store_error(exc, lost=True)) for _ in batch]
        with self._lock:
            self.batch_count += 1
        return [(True, value) for value in values]

    def _serve_pipelined(self, worker: _Worker, batch: list[_Request]) -> list[tuple[bool, Any]]:
        """Send a batch of single-statement writes at once, between BEGIN and COMMIT (one
        round trip for all, instead of one each and two more): (ok, result) each. If a
        statement fails (a unique violation, a lock waited for too long), all are undone
        and run one by one.

        A statement whose guard did not match changed nothing: the others commit, and it
        then runs alone to find out why (a conflict, a lost lease, a stale chain)."""
        pipes: list[_Pipelinable] = []
        cursors: list[psycopg.Cursor[Any]] = []
        conn: psycopg.Connection[Any] | None = None
        try:
            self._connect(worker)
            conn = worker.conn
            assert conn is not None
            with conn.pipeline():
                conn.execute(b"BEGIN")
                conn.execute(_LOCK_TIMEOUT_LOCAL)
                for request in batch:
                    pipe = request.op
                    assert isinstance(pipe, _Pipelinable)
                    cursor = conn.cursor(binary=True)
                    cursor.execute(pipe.stmt.sql, pipe.stmt.bind(pipe.values()))
                    pipes.append(pipe)
                    cursors.append(cursor)
                conn.execute(b"COMMIT")
        except Exception as exc:
            lost = isinstance(exc, psycopg.Error) and _lost(worker, exc)
            if conn is None:  # no connection (as ``_serve`` says why): nothing was sent
                error = (self._store_error(exc, lost=True) if isinstance(exc, psycopg.Error)
                         else exc)
                return [(False, error) for _ in batch]
            if not lost:
                try:
                    conn.execute(b"ROLLBACK")
                    return [self._serve(worker, request) for request in batch]
                except psycopg.Error as again:
                    exc = again
            # The connection failed, perhaps during COMMIT: the writes' fate is unknown.
            # Each is tried again alone (``_run``); an append that did commit is recognised.
            worker.disconnect()
            return [(False, self._store_error(exc, lost=True)) for _ in batch]
        with self._lock:
            self.batch_count += 1
        outcomes: list[tuple[bool, Any]] = []
        for request, pipe, cursor in zip(batch, pipes, cursors, strict=True):
            row = cursor.fetchone()
            if row is None:
                outcomes.append(self._serve(worker, request))
                continue
            try:
                outcomes.append((True, pipe.finish(row)))
            except Exception as exc:
                outcomes.append((False, exc))
        return outcomes

    def _serve(self, worker: _Worker, request: _Request) -> tuple[bool, Any]:
        """Run one request on the worker's connection: (True, result) or (False, error)."""
        try:
            tx = self._connect(worker)
            if request.kind == _WRITE:
                return True, _in_transaction(worker, request.op, tx)
            return True, request.op(tx)
        except psycopg.Error as exc:
            lost = _lost(worker, exc)
            if lost:
                # A dead connection (server restarted, backend killed): drop it rather than
                # hand it to the next caller.
                worker.disconnect()
            return False, self._store_error(exc, lost=lost)
        except Exception as exc:
            return False, exc

    def _connect(self, worker: _Worker) -> _Tx:
        """The worker's connection, opened if it has none (in autocommit)."""
        if worker.tx is None:
            worker.conn = psycopg.Connection.connect(
                self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
            )
            worker.tx = _Tx(worker.conn)
        return worker.tx

    def _store_error(self, exc: BaseException, *, lost: bool = False) -> StoreError:
        """A driver error as a ``StoreError``: a ``TransientError`` (retried) when the
        connection is gone or the server is going away or coming back."""
        orig = getattr(exc, "orig", None) or exc
        reason = self._reason(exc)
        if _transient(orig, lost):
            error: StoreError = TransientError(reason)
        elif isinstance(orig, psycopg.OperationalError):
            error = StoreUnavailableError(
                self._unavailable_message(exc).replace("cannot open", "cannot use", 1)
            )
        else:
            error = StoreError(f"PostgreSQL error: {reason}")
        error.__cause__ = exc
        return error

    async def _write_one(self, op: Callable[[Tx], T]) -> T:
        return await self._run(op, _STATEMENT)  # in autocommit: one round trip

    def _insert_new(
        self,
        tx: Tx,
        insert: Prepared,
        insert_events: Prepared,
        row: Mapping[str, Any],
        first: Mapping[str, Any],
    ) -> bool:
        # One statement (a CTE: the row's insert, and the first event's from it) in
        # autocommit instead of BEGIN, two inserts and COMMIT.
        columns = tuple(row)
        create = self._stmt(("create_one", columns), lambda: _create_statement(columns))
        values = {**row, "ev_type": first["type"], "ev_data": first["data"],
                  "encoding": first["encoding"], "t": row.get("created_at") or now()}
        return tx.first(create, values) is not None

    async def load_many(self, execution_ids: Sequence[str]) -> dict[str, list[StoredEvent]]:
        # One statement, one snapshot, for all: every event of the executions, and each
        # one's end row (as ``_stmt_load_with_end``), sorted by execution, then seq.
        ids = list(dict.fromkeys(execution_ids))
        if len(ids) < 2:
            return await super().load_many(ids)
        stmt = self._stmt("load_many", _stmt_load_many)

        def op(tx: Tx) -> list[Row]:
            return tx.rows(stmt, {"ids": ids})

        rows = await self._read(op)
        out: dict[str, list[StoredEvent]] = {}
        for execution_id, rows_of, end in _split_logs(rows):
            try:
                events, last = verified(execution_id, 0, rows_of, end)
            except HistoryCorruptedError:
                continue  # its own ``load`` says what is wrong
            if not events:
                continue
            if last is not None:
                self._chains.put_if_newer(execution_id, *last)
            out[execution_id] = events
        return out

    def _lease(self, tx: Tx, ids: list[str], values: Mapping[str, Any]) -> list[Row]:
        if len(ids) < 2:
            return super()._lease(tx, ids, values)
        # one statement for all (``id = ANY(:ids)``) instead of one per execution
        lease = self._stmt("lease_many", lambda: _stmt_lease_one(
            executions.c.id == sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Text)))))
        order = {id_: i for i, id_ in enumerate(ids)}
        rows = tx.rows(lease, {**values, "ids": ids})
        return sorted(rows, key=lambda row: order[row[0]])  # column 0 is the id

    def _insert_ignore(self) -> sa.Insert:
        return (
            pg_insert(executions)
            .on_conflict_do_nothing()
            .returning(executions.c.id, *self._announce())
        )

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) == "23505"

    def _tag_value(self, tag: str) -> sa.ColumnElement[Any]:
        return executions.c.tags.op("->>")(sa.literal(tag, sa.Text))

    def _skip_locked(self, stmt: sa.Select[Any]) -> sa.Select[Any]:
        # lock the candidates, skipping rows another claimer holds
        return stmt.with_for_update(skip_locked=True)

    def _queue_limits_statement(self) -> sa.Select[Any]:
        # claimers of limited queues take turns: the counts they make stay true
        return sa.select(*queues.c).order_by(queues.c.name).with_for_update()

    def _dialect_insert(self, table: sa.Table) -> Any:
        return pg_insert(table)

    def _announce(self, always: bool = True, *,
                  cancel: bool = False) -> list[sa.ColumnElement[Any]]:
        payload: sa.ColumnElement[Any] = executions.c.id
        if cancel:
            payload = sa.literal(CANCEL_PREFIX, sa.Text) + executions.c.id
        notify: sa.ColumnElement[Any] = sa.func.pg_notify(sa.literal(CHANNEL, sa.Text), payload)
        if not always:  # CASE evaluates pg_notify only when its condition holds
            notify = sa.case((_followed(), notify), else_=sa.null())
        return [notify.label("announced")]

    async def watch(self, execution_id: str | None, seconds: float = WATCH_SECONDS) -> None:
        upsert = self._stmt("watch", lambda: self._upsert(watches))
        expired = self._stmt(
            "watch_expired", lambda: sa.delete(watches).where(watches.c.until < sa.bindparam("t"))
        )
        key = WATCH_ALL if execution_id is None else execution_id

        def op(tx: Tx) -> None:
            t = now()
            tx.execute(expired, {"t": t})
            tx.execute(upsert, {"key": key, "until": t + seconds})

        await self._write(op)

    # change notification ----------------------------------------------------------------
    async def _wait_external(self, timeout: float) -> None:
        # The listener wakes waiters itself; polling only while it is down (or starting).
        self.listen()
        await asyncio.sleep(timeout if self._listening else min(timeout, self.poll_interval))

    def _listen_thread(self, loop: asyncio.AbstractEventLoop, stop: socket.socket) -> None:
        """LISTEN on a dedicated connection, reconnecting with backoff when it drops.

        A thread on the sync driver, like the workers: every append notifies, and this way
        a notification nobody in this process waits for costs no turn of the event loop.
        """
        delay = 0.5
        while True:
            try:
                with (
                    psycopg.Connection.connect(
                        self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
                    ) as conn,
                    selectors.DefaultSelector() as selector,
                ):
                    conn.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANNEL))
                    )
                    self._listening = True
                    self._listen_connects += 1
                    delay = 0.5
                    # changes made while we were not listening
                    _call_soon(loop, self._wake_all)
                    selector.register(conn.fileno(), selectors.EVENT_READ)
                    selector.register(stop, selectors.EVENT_READ)
                    while True:
                        if any(key.fileobj is stop for key, _ in selector.select()):
                            return
                        payloads = [notice.payload for notice in conn.notifies(timeout=0)]
                        cancels = [p[len(CANCEL_PREFIX):] for p in payloads
                                   if p.startswith(CANCEL_PREFIX)]
                        changed = [p[len(CANCEL_PREFIX):] if p.startswith(CANCEL_PREFIX)
                                   else p for p in payloads]
                        # Read from this thread; a waiter that starts watching just after
                        # this finds the change when it reads the store.
                        watched = self._changed
                        if changed and (None in watched or any(e in watched for e in changed)):
                            _call_soon(loop, self._notify_all, changed)
                        if cancels and self.cancel_listeners:
                            _call_soon(loop, self._cancel_heard, cancels)
            except Exception:  # whatever broke it: poll meanwhile, reconnect
                pass
            finally:
                self._listening = False
            _call_soon(loop, self._wake_all)
            stop.settimeout(delay)
            try:
                stop.recv(1)
                return
            except TimeoutError:
                pass
            delay = min(delay * 2, _BACKOFF_MAX)

    def _notify_all(self, execution_ids: list[str]) -> None:
        for execution_id in execution_ids:
            self._notify(execution_id)

    def _wake_all(self) -> None:
        """Wake every waiter: notifications may have been missed."""
        for key in list(self._changed):
            ev = self._changed.pop(key, None)
            if ev is not None:
                ev.set()


def _followed() -> sa.ColumnElement[bool]:
    """Someone follows the execution, or every execution (``watch``), at ``:t``."""
    return sa.exists().where(
        watches.c.key.in_([executions.c.id, sa.literal(WATCH_ALL, sa.Text)]),
        watches.c.until >= sa.bindparam("t", type_=sa.Double),
    )


def _announce_created() -> sa.ColumnElement[Any]:
    """A new execution's NOTIFY: always for one nobody holds (workers claim it), else only
    if someone follows (one created with its creator's lease runs in its creator's process:
    a NOTIFY would wake every worker to claim nothing)."""
    notify = sa.func.pg_notify(sa.literal(CHANNEL, sa.Text), executions.c.id)
    return sa.case((sa.or_(executions.c.lease_owner.is_(None), _followed()), notify),
                   else_=sa.null())


def _create_statement(columns: tuple[str, ...]) -> sa.Select[Any]:
    """A new execution's row (``ON CONFLICT DO NOTHING``, announced) and its first event,
    in one statement: the event is inserted only if the row was."""
    created = (
        pg_insert(executions)
        .values({name: sa.bindparam(name, type_=executions.c[name].type) for name in columns})
        .on_conflict_do_nothing()
        .returning(executions.c.id, executions.c.created_at, executions.c.last_chain,
                   _announce_created())
        .cte("created")
    )
    first = sa.select(
        created.c.id,
        sa.literal(1, sa.Integer),
        sa.bindparam("ev_type", type_=sa.Text),
        sa.bindparam("encoding", type_=sa.Integer),
        sa.bindparam("ev_data", type_=sa.LargeBinary),
        created.c.created_at,
        created.c.last_chain,
    ).select_from(created)
    inserted = (
        sa.insert(events_table)
        .from_select(["execution_id", "seq", "type", "encoding", "data", "created_at", "chain"],
                     first)
        .cte("first_event")
    )
    return sa.select(created.c.id).add_cte(inserted)


def _transient(exc: BaseException, lost: bool) -> bool:
    """Whether trying again may succeed: a server error saying the connection is gone or
    the server is restarting, or a lost connection (not a refused login)."""
    state = getattr(exc, "sqlstate", None)
    if state is not None and (state.startswith("08") or state in _TRANSIENT_STATES):
        return True
    if not lost:
        return False
    text = str(exc).lower()
    return not any(marker in text for marker in _PERMANENT)


def _lost(worker: _Worker, exc: psycopg.Error) -> bool:
    """Whether ``exc`` left the worker without a usable connection."""
    conn = worker.conn
    if conn is None or conn.closed or conn.broken:
        return True
    # an error psycopg raised itself, not the server (whose errors carry a SQLSTATE)
    return isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None


def _in_transaction(worker: _Worker, op: Callable[[_Tx], T], tx: _Tx, *,
                    begin: bytes = b"BEGIN") -> T:
    """Run ``op`` in a transaction and commit it, or roll it back if ``op`` raises.

    The connection stays in autocommit (a read is one round trip); the transaction is begun
    and ended by statements of its own. ``begin`` may carry settings for it in the same
    simple query (one round trip for ``BEGIN`` and a lock timeout). Measured, this is
    cheaper than ``Connection.transaction()``.
    """
    conn = worker.conn
    assert conn is not None
    conn.execute(begin)
    try:
        value = op(tx)
        conn.execute(b"COMMIT")
        return value
    except BaseException:
        try:
            conn.execute(b"ROLLBACK")
        except psycopg.Error:
            worker.disconnect()
        raise


def _stmt_load_many() -> sa.CompoundSelect[Any]:
    """Every event of the executions ``ids`` (execution, seq, type, data, chain), and one
    row per execution with its (last_seq, last_chain) and a NULL type: after its events,
    or next to the last one when a write lands at the same seq (``_split_logs``)."""
    ids = sa.any_(sa.bindparam("ids", type_=ARRAY(sa.Text)))
    log = sa.select(events_table.c.execution_id, events_table.c.seq, events_table.c.type,
                    events_table.c.data, events_table.c.chain).where(
        events_table.c.execution_id == ids)
    end = sa.select(executions.c.id, executions.c.last_seq, sa.null().cast(sa.Text),
                    sa.null().cast(sa.LargeBinary), executions.c.last_chain).where(
        executions.c.id == ids)
    return sa.union_all(log, end).order_by(sa.literal_column("execution_id"),
                                           sa.literal_column("seq"))


def _split_logs(
    rows: Sequence[Row],
) -> list[tuple[str, list[Row], tuple[int, str | None] | None]]:
    """``_stmt_load_many``'s rows as (execution id, its log's rows, its end): the rows of
    ``read_log`` for each."""
    out: list[tuple[str, list[Row], tuple[int, str | None] | None]] = []
    current: str | None = None
    entries: list[Row] = []
    end: tuple[int, str | None] | None = None
    for execution_id, seq, type_name, data, chain in rows:
        if execution_id != current:
            if current is not None:
                out.append((current, entries, end))
            current, entries, end = execution_id, [], None
        if type_name is None:
            end = (seq, chain)
        else:
            entries.append((seq, type_name, data, chain))
    if current is not None:
        out.append((current, entries, end))
    return out


def _loop_idle(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether no callback is ready to run on ``loop`` but the current one (the asyncio
    event loop's own queue; an event loop without one, like uvloop's, never counts as idle)."""
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` on ``loop`` (from another thread), unless the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _resolve(request: _Request, ok: bool, value: Any) -> None:
    settle(request.future, ok, value)


def _resolve_all(batch: list[_Request], outcomes: list[tuple[bool, Any]]) -> None:
    """Settle each request's future on its loop, from a worker thread: one hand-off per
    loop (one wake-up of it), not one per request."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, bool, Any]]] = {}
    for request, (ok, value) in zip(batch, outcomes, strict=True):
        by_loop.setdefault(request.loop, []).append((request, ok, value))
    for loop, settled in by_loop.items():
        _call_soon(loop, _settle_all, settled)


def _settle_all(settled: list[tuple[_Request, bool, Any]]) -> None:
    for request, ok, value in settled:
        settle(request.future, ok, value)


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()
