"""The SQLite backend: the embedded default, one file, durable by default.

One writer thread owns the only write connection and commits in groups: it takes every
append (and other write) waiting for it, runs each under its own SAVEPOINT in one
``BEGIN IMMEDIATE`` transaction, commits once and answers each caller. A durable commit
(WAL, ``synchronous=FULL``) costs one fsync, so a hundred executions stepping at once pay
for about one fsync per batch instead of one each, and a conflicting request fails alone.

Reads run on a small thread pool with their own connections; WAL lets them proceed while the
writer commits. SQLAlchemy provides the schema, the statements and the connection pool; the
sync ``pysqlite`` driver runs them, because a whole transaction in one thread hop is several
times faster than one aiosqlite hop per statement. ``sqlite+aiosqlite://`` URLs are accepted.

A database locked beyond ``busy_timeout`` or a disk I/O error fails the operation's try, not
the operation: it is tried again with backoff for ``retry_for`` seconds (default 60). A file
this process cannot write is refused before SQLite opens it, naming which of the database,
its ``-wal`` and ``-shm`` files or the directory is at fault: SQLite would otherwise open
it read-only and create ``-wal``/``-shm`` files as read-only as the database, which would
break the next open even once the database is writable again.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shlex
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.pool import QueuePool

from .errors import StoreError, StoreNotFoundError, StoreUnavailableError
from .schema import executions, migrate
from .sql import SQLEventStore, TransientError, Tx, retry_for_option, settle

__all__ = ["SQLiteEventStore"]

T = TypeVar("T")

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
_PRAGMAS = ("journal_mode", "synchronous", "busy_timeout", "data_version")
_MAX_BATCH = 1000
_STOP = object()
#: SQLite result codes (and their extended codes) that may pass: busy or locked beyond
#: ``busy_timeout``, a disk I/O error, a full disk
_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL")


class _Request:
    """One operation waiting for a writer or reader thread."""

    __slots__ = ("future", "loop", "op")

    def __init__(self, op: Callable[..., Any], loop: asyncio.AbstractEventLoop) -> None:
        self.op = op
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


class SQLiteEventStore(SQLEventStore):
    """Executions and events in one SQLite file (``sqlite:///path/to/flow.db``).

    Args:
        url: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``; the query
            may carry ``synchronous`` and ``busy_timeout`` too.
        synchronous: ``FULL`` (default: a commit survives power loss) or ``NORMAL`` (faster;
            the last commits may be lost on power loss, never on a process crash).
        busy_timeout: seconds to wait for another process's write lock.
        readers: threads (and connections) serving reads.
        writer: ``"inline"`` (default) commits on the event loop's thread: every write
            requested in one turn of the loop goes into one transaction, with no thread
            hop (measured: a third of the cost of a step). The loop is blocked for the
            commit (an fsync, a fraction of a millisecond). ``"thread"`` commits on a
            writer thread instead, for applications that must never block their loop.
        retry_for: seconds an operation is retried while the database stays locked or
            the disk fails, before it fails; 0 fails at once. Also ``?retry_for=60``.
        create: make the database file (and its folder) when missing; ``False`` makes a
            missing file an error, so that reading a mistyped path does not create a store.
    """

    def __init__(
        self,
        url: str,
        *,
        synchronous: str | None = None,
        busy_timeout: float | None = None,
        readers: int = 2,
        writer: str | None = None,
        retry_for: float | None = None,
        create: bool = True,
    ) -> None:
        super().__init__()
        self.url = url
        self.create = create
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            raise StoreUnavailableError(
                f"malformed SQLite store URL {url!r}: use sqlite:///path/to/flow.db"
            ) from None
        query = {k.lower(): v for k, v in parsed.query.items()}
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise StoreUnavailableError(
                f"SQLite store URL {url!r} names no database file: use "
                "sqlite:///path/to/flow.db, or memory:// for a store that lives in memory"
            )
        self.path = Path(database).expanduser().absolute()
        mode = str(synchronous or query.get("synchronous", "FULL")).upper()
        if mode not in _SYNCHRONOUS:
            raise StoreUnavailableError(
                f"synchronous={mode.lower()} is not a SQLite synchronous mode: "
                "use full (durable, the default) or normal"
            )
        self.synchronous = mode
        timeout = busy_timeout if busy_timeout is not None else query.get("busy_timeout", 10.0)
        self.busy_timeout = float(str(timeout))
        self._readers = max(1, readers)
        self.retry_for = retry_for_option(retry_for, query)
        self.writer = str(writer or query.get("writer", "inline")).lower()
        if self.writer not in ("inline", "thread"):
            raise StoreUnavailableError(
                f"writer={self.writer} is not a SQLite writer mode: use inline or thread"
            )
        self._inline: tuple[sqlite3.Connection, Tx, sqlite3.Cursor, Any] | None = None
        self._pending: list[_Request] = []
        self._flush_scheduled = False
        self._engine: sa.Engine | None = None
        self._threads: list[threading.Thread] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._read_queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: commits and write requests the writer made: fewer commits means group commit
        self.commit_count = 0
        self.write_count = 0

    # lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._engine is not None:
            return
        if not self.create and not self.path.is_file():
            raise StoreNotFoundError(
                f"no SQLite store at {str(self.path)!r} (from {self.url!r}): the file does not "
                "exist; check the path (or start an execution there to create the store)"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot create the directory {str(self.path.parent)!r} for the SQLite store "
                f"{self.url!r}: {exc.strerror or exc}; choose a writable path, e.g. "
                "sqlite:///.flow/flow.db"
            ) from None
        problem = self._unwritable()
        if problem is not None:
            raise StoreUnavailableError(problem)
        engine = sa.create_engine(
            sa.URL.create("sqlite+pysqlite", database=str(self.path)),
            poolclass=QueuePool,
            pool_size=self._readers + 1,
            max_overflow=4,
            connect_args={"check_same_thread": False, "timeout": self.busy_timeout},
        )
        sa.event.listen(engine, "connect", self._on_connect)
        try:
            writer_conn = await asyncio.to_thread(self._open_sync, engine)
        except Exception:
            engine.dispose()
            raise
        self._engine = engine
        self._dialect = engine.dialect
        self._queue = queue.SimpleQueue()
        self._read_queue = queue.SimpleQueue()
        writers = []
        if self.writer == "thread":
            writers = [
                threading.Thread(
                    target=self._write_loop, args=(writer_conn,), name="flow-sqlite-writer",
                    daemon=True,
                )
            ]
        else:
            conn: sqlite3.Connection = writer_conn.dbapi_connection
            self._inline = (conn, Tx(conn), conn.cursor(), writer_conn)
        self._threads = writers + [
            threading.Thread(
                target=self._read_loop, args=(engine,), name=f"flow-sqlite-read-{i}", daemon=True
            )
            for i in range(self._readers)
        ]
        for thread in self._threads:
            thread.start()

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        threads, self._threads = self._threads, []
        if self._inline is not None:
            pending, self._pending = self._pending, []
            _settle([(r, False, StoreError("the SQLite store was closed")) for r in pending])
            _, tx, cur, raw = self._inline
            self._inline = None
            cur.close()
            tx.close()
            raw.close()
        else:
            self._queue.put(_STOP)
        for _ in range(self._readers):
            self._read_queue.put(_STOP)
        for thread in threads:
            await asyncio.to_thread(thread.join)
        _fail_queued(self._queue)
        _fail_queued(self._read_queue)
        engine.dispose()

    def _on_connect(self, dbapi_connection: sqlite3.Connection, _record: object) -> None:
        # Autocommit at the driver: the writer issues BEGIN IMMEDIATE / SAVEPOINT / COMMIT
        # itself (pysqlite's implicit transactions would defer the write lock and break
        # savepoints), and a read is one statement in its own snapshot.
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        cur.execute(f"PRAGMA synchronous={self.synchronous}")  # validated constant
        cur.close()

    def _open_sync(self, engine: sa.Engine) -> Any:
        """Connect, switch to WAL, migrate; returns the writer's raw connection."""
        try:
            raw = engine.raw_connection()
        except (sa.exc.DBAPIError, sqlite3.Error) as exc:
            raise StoreUnavailableError(
                f"cannot open the SQLite database {str(self.path)!r}: "
                f"{getattr(exc, 'orig', exc)}; check that the path names a flow database "
                "(or a new file) in a writable directory on a local filesystem"
            ) from None
        try:
            self._wal_and_migrate(engine, raw)
        except (sa.exc.DBAPIError, sqlite3.Error) as exc:
            raw.close()
            problem = self._unwritable() if "readonly" in str(exc).lower() else None
            if problem is not None:  # made read-only since the check in ``open``
                raise StoreUnavailableError(problem) from None
            raise StoreUnavailableError(
                f"cannot open the SQLite database {str(self.path)!r}: "
                f"{getattr(exc, 'orig', exc)}; check that it is a flow database on a writable "
                "local filesystem"
            ) from None
        except BaseException:
            raw.close()
            raise
        return raw

    def _wal_and_migrate(self, engine: sa.Engine, raw: Any) -> None:
        """Switch to WAL and migrate, retrying while another process does the same.

        SQLite reports some lock conflicts of concurrent first opens (the journal-mode
        switch, a read lock that cannot be upgraded) at once instead of through its busy
        handler, so they are retried here until ``busy_timeout``.
        """
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                cur = raw.cursor()
                try:
                    mode = cur.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                finally:
                    cur.close()
                if str(mode).lower() != "wal":
                    raise StoreUnavailableError(
                        f"cannot put the SQLite database {str(self.path)!r} in WAL mode "
                        f"(it stays in {mode!r}); use a local filesystem"
                    )
                with engine.connect() as conn:
                    conn.exec_driver_sql("BEGIN IMMEDIATE")
                    migrate(conn)
                    conn.commit()
                return
            except (sa.exc.OperationalError, sqlite3.OperationalError) as exc:
                message = str(getattr(exc, "orig", exc)).lower()
                if ("locked" not in message and "busy" not in message) or (
                        time.monotonic() >= deadline):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.1)

    def _unwritable(self) -> str | None:
        """Why this process could not write the database, or ``None``.

        Checked before SQLite opens the file: it would open an unwritable one read-only,
        and create its ``-wal`` and ``-shm`` files with the database's (read-only) mode.
        """
        db = self.path
        files = [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
        blocked = [f for f in files if f.exists() and not _writable(f)]
        directory = db.parent
        if not all(f.exists() for f in files) and not _writable(directory, os.X_OK):
            blocked.append(directory)  # where SQLite creates what is missing
        if not blocked:
            return None
        where = f"cannot open the SQLite store {str(db)!r}"
        if _read_only_fs(directory):
            return (
                f"{where}: {str(directory)!r} is on a read-only filesystem; remount it "
                "read-write or choose a store path on a writable one"
            )
        described = ", ".join(
            (f"the directory {str(f)!r}" if f == directory else f.name) + _mode_and_owner(f)
            for f in blocked
        )
        verb = "is" if len(blocked) == 1 else "are"
        fixes = "; ".join(_fix(f) for f in blocked)
        note = (
            " (SQLite creates the -wal and -shm files next to the database)"
            if directory in blocked else ""
        )
        return (
            f"{where}: {described} {verb} not writable by this process{note}; fix it with: "
            f"{fixes}; then open the store again"
        )

    # running operations -----------------------------------------------------------------
    def _require_open(self) -> sa.Engine:
        if self._engine is None:
            raise StoreError("the SQLite store is not open: use `async with store:` first")
        return self._engine

    async def _write(
        self, op: Callable[[Tx], T], *, resolve: Callable[[], Awaitable[T | None]] | None = None
    ) -> T:
        try:
            return await self._write_once(op)
        except TransientError as exc:
            return await self._ride_out(lambda: self._write_once(op), exc, resolve)

    async def _write_once(self, op: Callable[[Tx], T]) -> T:
        self._require_open()
        loop = asyncio.get_running_loop()
        request = _Request(op, loop)
        if self._inline is None:
            self._queue.put(request)
        else:
            self._pending.append(request)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush_inline)
        result: T = await request.future
        return result

    def _flush_inline(self) -> None:
        """Commit every write requested during this turn of the loop, in one transaction."""
        self._flush_scheduled = False
        batch, self._pending = self._pending, []
        if self._inline is None:
            _settle([(r, False, StoreError("the SQLite store was closed")) for r in batch])
            return
        conn, tx, cur, _ = self._inline
        for start in range(0, len(batch), _MAX_BATCH):
            self._commit_batch(conn, tx, cur, batch[start : start + _MAX_BATCH])

    async def _read(self, op: Callable[[Tx], T]) -> T:
        try:
            return await self._read_once(lambda tx, conn: op(tx))
        except TransientError as exc:
            return await self._ride_out(lambda: self._read_once(lambda tx, conn: op(tx)), exc)

    async def _read_once(self, op: Callable[[Tx, sa.Connection], T]) -> T:
        self._require_open()
        request = _Request(op, asyncio.get_running_loop())
        self._read_queue.put(request)
        result: T = await request.future
        return result

    async def _read_core(self, op: Callable[[sa.Connection], T]) -> T:
        try:
            return await self._read_core_once(op)
        except TransientError as exc:
            return await self._ride_out(lambda: self._read_core_once(op), exc)

    async def _read_core_once(self, op: Callable[[sa.Connection], T]) -> T:
        self._require_open()

        def run(tx: Tx, conn: sa.Connection) -> T:
            try:
                return op(conn)
            finally:
                conn.rollback()  # end SQLAlchemy's autobegun transaction (a no-op in SQLite)

        request = _Request(run, asyncio.get_running_loop())
        self._read_queue.put(request)
        result: T = await request.future
        return result

    def _outage_message(self, reason: str, seconds: float) -> str:
        waited = f"for {seconds:g} s" if seconds else "(retrying is off: retry_for=0)"
        if "LOCKED" in reason or "BUSY" in reason:
            what = (
                f"stayed locked {waited} (another process writing to it, or holding a "
                "transaction open?)"
            )
        else:
            what = f"could not be read or written {waited} (disk failing or full?)"
        return (
            f"the SQLite database {str(self.path)!r} {what}: {reason}; wait longer with "
            "?retry_for=SECONDS in the store URL"
        )

    def _insert_ignore(self) -> sa.Insert:
        return sqlite_insert(executions).on_conflict_do_nothing().returning(executions.c.id)

    def _dialect_insert(self, table: sa.Table) -> Any:
        return sqlite_insert(table)

    def _tag_is(self, key: str, value: str) -> sa.ColumnElement[bool]:
        # json_each compares the key as data; a JSON path (json_extract) cannot name every
        # key (a double quote or a backslash in it breaks the path).
        pairs = sa.func.json_each(executions.c.tags).table_valued("key", "value")
        return sa.exists().where(pairs.c.key == key, pairs.c.value == value)

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError) and getattr(exc, "sqlite_errorname", "") in (
            "SQLITE_CONSTRAINT_PRIMARYKEY",
            "SQLITE_CONSTRAINT_UNIQUE",
        )

    async def _pragma(self, name: str) -> Any:
        """Read a pragma on the writer's connection (for tests and diagnostics)."""
        if name not in _PRAGMAS:
            raise ValueError(f"unknown pragma {name!r}")
        stmt = f"PRAGMA {name}"  # from the fixed list above

        def op(tx: Tx) -> Any:
            cur = tx._cur
            return cur.execute(stmt).fetchone()[0]

        return await self._write(op)

    # the threads ------------------------------------------------------------------------
    def _read_loop(self, engine: sa.Engine) -> None:
        """Serve reads on this thread's own connection until told to stop."""
        try:
            conn = engine.connect()
        except Exception as exc:  # keep answering, or callers would wait forever
            error = exc
            while (request := self._read_queue.get()) is not _STOP:
                _settle([(request, False, StoreError(f"SQLite store cannot read: {error}"))])
            return
        tx = Tx(conn.connection.dbapi_connection)
        try:
            while True:
                request = self._read_queue.get()
                if request is _STOP:
                    break
                try:
                    outcome = (request, True, request.op(tx, conn))
                except Exception as exc:
                    outcome = (request, False, _store_error(exc))
                _settle([outcome])
        finally:
            tx.close()
            conn.close()

    def _write_loop(self, raw: Any) -> None:
        """Commit waiting writes in groups until told to stop."""
        conn: sqlite3.Connection = raw.dbapi_connection
        tx = Tx(conn)
        cur = conn.cursor()
        stop = False
        try:
            while not stop:
                batch: list[_Request] = []
                item = self._queue.get()
                while True:
                    if item is _STOP:
                        stop = True
                    else:
                        batch.append(item)
                    if len(batch) >= _MAX_BATCH:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._commit_batch(conn, tx, cur, batch)
        finally:
            cur.close()
            tx.close()
            raw.close()

    def _commit_batch(
        self, conn: sqlite3.Connection, tx: Tx, cur: sqlite3.Cursor, batch: list[_Request]
    ) -> None:
        """Run ``batch`` in one transaction, a savepoint per request, and commit once."""
        outcomes: list[tuple[_Request, bool, Any]] = []
        try:
            cur.execute("BEGIN IMMEDIATE")
            if len(batch) == 1:  # no savepoint needed: a failure rolls back everything
                request = batch[0]
                try:
                    outcomes.append((request, True, request.op(tx)))
                except Exception as exc:
                    conn.rollback()
                    _settle([(request, False, _store_error(exc))])
                    return
            else:
                # Optimistically without savepoints (two statements fewer per request);
                # if any request fails, undo the batch and redo it a savepoint each, so
                # that the failing request fails alone.
                one_by_one = batch
                try:
                    values = [request.op(tx) for request in batch]
                except Exception:
                    conn.rollback()
                    cur.execute("BEGIN IMMEDIATE")
                else:
                    outcomes.extend(zip(batch, [True] * len(batch), values, strict=True))
                    one_by_one = []
                for request in one_by_one:
                    cur.execute("SAVEPOINT flow_request")
                    try:
                        value = request.op(tx)
                    except Exception as exc:
                        # A failed request is undone alone; if even that fails, so does
                        # the whole batch (below).
                        cur.execute("ROLLBACK TO flow_request")
                        cur.execute("RELEASE flow_request")
                        outcomes.append((request, False, _store_error(exc)))
                    else:
                        cur.execute("RELEASE flow_request")
                        outcomes.append((request, True, value))
            cur.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                try:
                    conn.rollback()
                except sqlite3.Error:
                    pass
            _settle([(request, False, _store_error(exc)) for request in batch])
            return
        self.commit_count += 1
        self.write_count += len(batch)
        _settle(outcomes)


def _fail_queued(requests: queue.SimpleQueue[Any]) -> None:
    """Fail what is still queued when the store closes."""
    while True:
        try:
            item = requests.get_nowait()
        except queue.Empty:
            return
        if item is not _STOP:
            _settle([(item, False, StoreError("the SQLite store was closed"))])


def _settle(outcomes: list[tuple[_Request, bool, Any]]) -> None:
    """Hand results back to the callers' event loops (one wake-up per loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, bool, Any]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    for loop, items in by_loop.items():
        if loop is running:  # inline writer: we are on the caller's loop already
            _resolve(items)
            continue
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass


def _resolve(items: list[tuple[_Request, bool, Any]]) -> None:
    for request, ok, value in items:
        settle(request.future, ok, value)


def _store_error(exc: BaseException) -> BaseException:
    """A driver error as a ``StoreError`` (a ``TransientError``, retried, when it may pass);
    anything else (our own errors, bugs) unchanged."""
    if not isinstance(exc, sqlite3.Error | sa.exc.DBAPIError):
        return exc
    orig = getattr(exc, "orig", None) or exc
    name = str(getattr(orig, "sqlite_errorname", ""))
    error: StoreError
    if name.startswith(_TRANSIENT):
        error = TransientError(f"{orig} ({name})")
    else:
        error = StoreError(f"SQLite error: {orig}")
    error.__cause__ = exc
    return error


def _writable(path: Path, extra: int = 0) -> bool:
    """Whether this process may write ``path`` (as its effective user, where supported)."""
    effective = os.access in os.supports_effective_ids
    return os.access(path, os.R_OK | os.W_OK | extra, effective_ids=effective)


def _read_only_fs(directory: Path) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs (Windows)
        return False


def _user(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _mode_and_owner(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return ""
    return f" (mode {stat.filemode(info.st_mode)}, owner {_user(info.st_uid)})"


def _fix(path: Path) -> str:
    """The command that makes ``path`` writable for this process's user."""
    quoted = shlex.quote(str(path))
    me = os.geteuid()
    try:
        owner = path.stat().st_uid
    except OSError:
        owner = me
    if owner != me:
        return f"chown {shlex.quote(_user(me))} {quoted}"
    return f"chmod u+{'wx' if path.is_dir() else 'w'} {quoted}"
