"""Run the store contract on every backend, and check how stores open (URLs, errors)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from agentainer_flow.store import (
    EventStore,
    MemoryEventStore,
    NewExecution,
    StoreError,
    StoreUnavailableError,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted, StepStarted

from .contract import CASES, Case

T = TypeVar("T")


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
async def test_contract(store: EventStore, case: Case) -> None:
    await case(store)


async def _roundtrip(url: str) -> None:
    async with create_store(url) as store:
        record, created = await store.create_execution(
            NewExecution(id="x", workflow_name="wf"), ExecutionStarted(workflow_name="wf")
        )
        assert created
    async with create_store(url) as store:  # reopened: the data is still there
        assert await store.get_execution("x") == record
        await store.close()
        await store.close()  # closing twice is fine


def test_create_store_picks_the_backend(tmp_path: Path) -> None:
    from agentainer_flow.store.sqlite import SQLiteEventStore

    assert isinstance(create_store("memory://"), MemoryEventStore)
    assert isinstance(create_store(f"sqlite:///{tmp_path}/a.db"), SQLiteEventStore)
    assert isinstance(create_store(f"sqlite+aiosqlite:///{tmp_path}/a.db"), SQLiteEventStore)
    with pytest.raises(StoreUnavailableError, match=r"sqlite:///path/to/flow\.db"):
        create_store("sqlite://")
    with pytest.raises(StoreUnavailableError, match="memory://"):
        create_store("sqlite:///:memory:")


async def test_sqlite_url_forms(tmp_path: Path) -> None:
    await _roundtrip(f"sqlite:///{tmp_path}/plain.db")
    await _roundtrip(f"sqlite+aiosqlite:///{tmp_path}/aio.db")


async def test_store_used_before_open_says_so(sqlite_url: str) -> None:
    store = create_store(sqlite_url)
    with pytest.raises(StoreError, match="not open"):
        await store.get_execution("x")


async def test_sqlite_unwritable_directory_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = create_store(f"sqlite:///{blocker}/sub/flow.db")
    with pytest.raises(StoreUnavailableError, match="writable") as info:
        await store.open()
    assert str(blocker) in str(info.value)
    await store.close()


async def test_sqlite_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a sqlite database file at all" * 100)
    store = create_store(f"sqlite:///{path}")
    with pytest.raises(StoreUnavailableError, match=r"junk\.db"):
        await store.open()


@pytest.mark.postgres
async def test_postgres_url_forms(postgres_url: str) -> None:
    url = sa.make_url(postgres_url)
    for driver in ("postgresql", "postgres", "postgresql+psycopg"):
        await _roundtrip(url.set(drivername=driver).render_as_string(hide_password=False))
        async with create_store(postgres_url) as store:  # start over for the next form
            assert await store.get_execution("x") is not None
        await _drop_tables(postgres_url)


async def _drop_tables(postgres_url: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from agentainer_flow.store.schema import metadata

    engine = create_async_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.drop_all)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_down_is_unavailable_without_password(postgres_server: str) -> None:
    store = create_store("postgresql://flow:s3cret-pw@127.0.0.1:1/flow")
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    message = str(info.value)
    assert "s3cret-pw" not in message
    assert "127.0.0.1:1" in message and "running" in message
    await store.close()


@pytest.mark.postgres
async def test_postgres_missing_database_is_unavailable(postgres_url: str) -> None:
    url = sa.make_url(postgres_url).set(database="flow_no_such_db", password="hunter2x")
    store = create_store(url.render_as_string(hide_password=False))
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    message = str(info.value)
    assert "flow_no_such_db" in message and "createdb" in message
    assert "hunter2x" not in message


async def test_bad_host_is_unavailable() -> None:
    store = create_store("postgresql://u:topsecret@no-such-host.invalid:5432/db")
    with pytest.raises(StoreUnavailableError) as info:
        await store.open()
    assert "topsecret" not in str(info.value)
    assert "no-such-host.invalid" in str(info.value)


@pytest.mark.postgres
async def test_postgres_notify_wakes_another_process(postgres_url: str) -> None:
    """A change made through one store wakes a waiter of another within milliseconds."""
    from agentainer_flow.store.postgres import PostgresEventStore

    async with create_store(postgres_url) as writer, create_store(postgres_url) as watcher:
        assert isinstance(watcher, PostgresEventStore)
        watcher.listen()  # (else the first wait starts it)
        for _ in range(200):
            if watcher._listening:
                break
            await asyncio.sleep(0.01)
        assert watcher._listening
        for target, eid in (("x", "x"), (None, "y")):  # one execution, then any
            waiter = asyncio.create_task(watcher.wait_for_change(target, 30))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await writer.create_execution(
                NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")
            )
            await asyncio.wait_for(waiter, 5)
            assert time.monotonic() - started < 5  # polling is off while listening: NOTIFY


@pytest.mark.postgres
async def test_postgres_announces_appends_to_followers_only(postgres_url: str) -> None:
    """A step's append NOTIFYs nobody unless the execution is followed (``watch``); a
    status or timer change, a cancel and a released lease always do."""
    from agentainer_flow.store.postgres import PostgresEventStore

    async def woken(store: EventStore, eid: str | None,
                    change: Callable[[], Awaitable[Any]]) -> bool:
        waiter = asyncio.create_task(store.wait_for_change(eid, 1.5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await change()
        await waiter
        return time.monotonic() - started < 1.0

    async with create_store(postgres_url) as writer, create_store(postgres_url) as watcher:
        assert isinstance(watcher, PostgresEventStore)
        watcher.listen()  # (else the first wait starts it)
        for _ in range(200):
            if watcher._listening:
                break
            await asyncio.sleep(0.01)
        for eid in ("x", "y"):  # nobody holds them: workers are told
            assert await woken(watcher, None, lambda eid=eid: writer.create_execution(
                NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")))

        def held(eid: str) -> Callable[[], Awaitable[Any]]:
            return lambda: writer.create_execution(
                NewExecution(id=eid, workflow_name="wf", lease_owner="creator",
                             lease_seconds=30), ExecutionStarted(workflow_name="wf"))

        # created with its creator's lease, it runs there: no worker is woken for it...
        assert not await woken(watcher, None, held("held-1"))
        lease = await writer.acquire("x", "w1", lease_seconds=30)
        assert lease is not None
        seq = 1

        def step() -> Callable[[], Awaitable[Any]]:
            nonlocal seq
            seq += 1
            return lambda: writer.append("x", seq, [StepStarted(step=f"s{seq}")])

        assert not await woken(watcher, "x", step())  # nobody follows x
        assert await woken(watcher, "x", lambda: writer.append(
            "x", seq + 1, [StepStarted(step="t")], wake_at=time.time() + 60))
        seq += 1
        await watcher.watch("x")
        assert await woken(watcher, "x", step())  # followed now
        assert not await woken(watcher, "y", lambda: writer.append(
            "y", 2, [StepStarted(step="s")]))
        await watcher.watch(None)  # every execution
        assert await woken(watcher, "y", lambda: writer.append("y", 3, [StepStarted(step="t")]))
        assert await woken(watcher, None, held("held-2"))  # ...unless all are followed
        assert await woken(watcher, "x", lambda: writer.release("w1", "x"))
        assert await woken(watcher, "y", lambda: writer.request_cancel("y"))


@pytest.mark.postgres
async def test_postgres_recovers_when_its_connections_are_killed(
    postgres_url: str, postgres_server: str
) -> None:
    """Dead pooled connections fail one call each and are replaced; LISTEN reconnects."""
    import psycopg

    from agentainer_flow.store.postgres import PostgresEventStore

    async def eventually(call: Callable[[], Awaitable[T]]) -> T:
        for _ in range(20):
            try:
                return await call()
            except StoreUnavailableError:
                continue
        raise AssertionError("the store did not recover")

    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        store.listen()
        await store.create_execution(
            NewExecution(id="x", workflow_name="wf"), ExecutionStarted(workflow_name="wf")
        )
        await asyncio.gather(*(store.get_execution("x") for _ in range(5)))  # fill the pool
        name = sa.make_url(postgres_url).database
        admin = sa.make_url(postgres_server).set(drivername="postgresql")
        with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as c:
            c.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        assert await eventually(lambda: store.get_execution("x")) is not None
        result = await eventually(lambda: store.append("x", 2, [StepStarted(step="s")]))
        assert result.last_seq == 2
        for _ in range(1000):  # the listener noticed, and reconnected
            if store._listen_connects >= 2 and store._listening:
                break
            await asyncio.sleep(0.01)
        assert store._listen_connects >= 2 and store._listening
        async with create_store(postgres_url) as other:
            await store.watch("x")  # a plain append is announced to followers only
            waiter = asyncio.create_task(store.wait_for_change("x", 30))
            await asyncio.sleep(0.05)
            await other.append("x", 3, [StepStarted(step="t")])
            await asyncio.wait_for(waiter, 5)
