"""The Postgres backend: SQLAlchemy async and psycopg 3, pooled, for production.

Each write is its own short transaction on a pooled connection; Postgres runs them in
parallel and shares WAL flushes between concurrent commits. Workers claim with one
statement (a ``FOR UPDATE SKIP LOCKED`` CTE, then ``UPDATE ... RETURNING``), so two workers
never lease the same execution and never wait for each other.

Changes are announced with ``NOTIFY flow_events, '<execution id>'`` inside the writing
transaction (delivered only if it commits). One dedicated connection LISTENs and wakes the
waiters of this process; when it is down, waiting falls back to polling.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import FlowError, StoreError, StoreUnavailableError
from .schema import executions, migrate
from .sql import SQLEventStore, Tx, _claimable, cancel_and_wait

__all__ = ["PostgresEventStore"]

T = TypeVar("T")

#: the NOTIFY channel; the payload is the id of the execution that changed
CHANNEL = "flow_events"
#: advisory lock key serialising schema migrations ("flow" in ASCII)
_MIGRATION_LOCK = 0x666C6F77
_DRIVERS = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async")


class PostgresEventStore(SQLEventStore):
    """Executions and events in a PostgreSQL database.

    Args:
        url: ``postgresql://user:password@host:5432/dbname`` (``postgres://`` and
            ``postgresql+psycopg://`` work too).
        pool_size: connections kept open; ``max_overflow`` more may be opened under load.
        listen: wake waiters with LISTEN/NOTIFY (else only polling).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        max_overflow: int = 10,
        connect_timeout: float = 10.0,
        listen: bool = True,
    ) -> None:
        super().__init__()
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
        self._url = parsed.set(drivername="postgresql+psycopg")
        #: the URL with the password masked, for messages
        self.url = self._url.render_as_string(hide_password=True)
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._connect_timeout = connect_timeout
        self._listen = listen
        self._engine: AsyncEngine | None = None
        self._reader: AsyncEngine | None = None
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self._listen_connects = 0  # how many times LISTEN (re)connected, for tests

    # lifecycle --------------------------------------------------------------------------
    async def open(self) -> None:
        if self._engine is not None:
            return
        engine = create_async_engine(
            self._url,
            pool_size=self._pool_size,
            max_overflow=self._max_overflow,
            connect_args={"connect_timeout": max(1, round(self._connect_timeout))},
        )
        try:
            async with engine.begin() as conn:
                # Concurrent openers wait here instead of racing to create the tables.
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK)))
                await conn.run_sync(migrate)
        except (sa.exc.DBAPIError, psycopg.Error, OSError) as exc:
            await engine.dispose()
            raise StoreUnavailableError(self._unavailable_message(exc)) from None
        except BaseException:
            await engine.dispose()
            raise
        self._engine = engine
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._dialect = engine.dialect
        if self._listen:
            self._listener = asyncio.create_task(self._listen_loop(), name="flow-pg-listen")

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is None:
            return
        listener, self._listener = self._listener, None
        await cancel_and_wait(listener)
        self._reader = None
        await engine.dispose()

    def _unavailable_message(self, exc: BaseException) -> str:
        """Say what went wrong and how to fix it, without the password."""
        orig = getattr(exc, "orig", None) or exc
        reason = " ".join(str(orig).split()) or type(orig).__name__
        password = self._url.password
        if password:
            reason = reason.replace(str(password), "***")
        where = f"{self._url.host or 'localhost'}:{self._url.port or 5432}"
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

    # running operations -----------------------------------------------------------------
    def _require_open(self) -> AsyncEngine:
        if self._engine is None:
            raise StoreError("the PostgreSQL store is not open: use `async with store:` first")
        return self._engine

    async def _write(self, op: Callable[[Tx], T]) -> T:
        return await self._run(self._require_open(), lambda conn: _with_tx(conn, op), True)

    async def _read(self, op: Callable[[Tx], T]) -> T:
        self._require_open()
        assert self._reader is not None
        return await self._run(self._reader, lambda conn: _with_tx(conn, op), False)

    async def _read_core(self, op: Callable[[sa.Connection], T]) -> T:
        self._require_open()
        assert self._reader is not None
        return await self._run(self._reader, op, False)

    async def _run(
        self, engine: AsyncEngine, fn: Callable[[sa.Connection], T], transaction: bool
    ) -> T:
        """Run ``fn`` on a pooled connection (in a transaction that commits if asked)."""
        try:
            async with engine.connect() as conn:
                try:
                    if transaction:
                        async with conn.begin():
                            return await conn.run_sync(fn)
                    return await conn.run_sync(fn)
                except psycopg.OperationalError:
                    # Probably a dead connection (server restarted, backend killed): our
                    # statements bypass SQLAlchemy's disconnect detection, so drop it here
                    # rather than hand it to the next caller.
                    await conn.invalidate()
                    raise
        except FlowError:
            raise
        except (sa.exc.DBAPIError, psycopg.Error) as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: BaseException) -> StoreError:
        orig = getattr(exc, "orig", None) or exc
        if isinstance(orig, psycopg.OperationalError):
            return StoreUnavailableError(self._unavailable_message(exc))
        return StoreError(f"PostgreSQL error: {' '.join(str(orig).split())}")

    def _insert_ignore(self) -> sa.Insert:
        return (
            pg_insert(executions)
            .on_conflict_do_nothing()
            .returning(executions.c.id, *self._announce())
        )

    def _is_unique_violation(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) == "23505"

    def _claim_statement(self) -> sa.Update:
        # Lock the candidates, skipping rows another claimer holds, then lease them.
        candidates = _claimable().with_for_update(skip_locked=True).cte("claimable")
        ex = executions
        return (
            sa.update(ex)
            .where(ex.c.id == candidates.c.id)
            .values(lease_owner=sa.bindparam("worker"), lease_expires_at=sa.bindparam("expires"))
            .returning(*ex.c)
        )

    def _announce(self) -> list[sa.ColumnElement[Any]]:
        channel = sa.literal(CHANNEL, sa.Text)
        return [sa.func.pg_notify(channel, executions.c.id).label("announced")]

    # change notification ----------------------------------------------------------------
    async def _wait_external(self, timeout: float) -> None:
        # The listener wakes waiters itself; polling only while it is down.
        await asyncio.sleep(timeout if self._listening else min(timeout, self.poll_interval))

    async def _listen_loop(self) -> None:
        """LISTEN on a dedicated connection, reconnecting with backoff when it drops."""
        conninfo = self._url.set(drivername="postgresql").render_as_string(hide_password=False)
        delay = 0.5
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    conninfo, autocommit=True, connect_timeout=max(1, round(self._connect_timeout))
                )
                async with conn:
                    await conn.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(CHANNEL))
                    )
                    self._listening = True
                    self._listen_connects += 1
                    delay = 0.5
                    self._wake_all()  # changes made while we were not listening
                    async for notice in conn.notifies():
                        self._notify(notice.payload)
            except Exception:  # whatever broke it: poll meanwhile, reconnect
                pass
            finally:
                self._listening = False
            self._wake_all()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)

    def _wake_all(self) -> None:
        """Wake every waiter: notifications may have been missed."""
        for key in list(self._changed):
            ev = self._changed.pop(key, None)
            if ev is not None:
                ev.set()


def _with_tx(conn: sa.Connection, op: Callable[[Tx], T]) -> T:
    """Run ``op`` on the raw (greenlet-adapted) DBAPI connection behind ``conn``."""
    tx = Tx(conn.connection.dbapi_connection)
    try:
        return op(tx)
    finally:
        tx.close()
