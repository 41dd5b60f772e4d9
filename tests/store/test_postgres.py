"""What only the Postgres store does: writes that queue up are committed together (and undone
and run one by one when one of them fails or waits on a lock), and an append of up to 100
events is one statement (more go through the transaction of ``sql.py``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from agentainer_flow.store import (
    AppendConflictError,
    ExecutionStatus,
    LeaseLostError,
    NewExecution,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted, StepCompleted, StepStarted
from agentainer_flow.store.postgres import PostgresEventStore

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(postgres_url: str) -> AsyncIterator[PostgresEventStore]:
    """A store with one connection, so writes queue up behind whatever occupies it."""
    async with create_store(postgres_url, pool_size=1, max_overflow=0) as opened:
        assert isinstance(opened, PostgresEventStore)
        yield opened


async def new(store: PostgresEventStore, eid: str) -> None:
    await store.create_execution(
        NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")
    )


def steps(name: str) -> list[StepStarted | StepCompleted]:
    return [StepStarted(step=name, ts=1.0), StepCompleted(step=name, result=name, ts=2.0)]


async def occupy(store: PostgresEventStore, seconds: float) -> asyncio.Task[None]:
    """Keep the store's only connection busy for ``seconds``."""
    task = asyncio.create_task(store._read(lambda tx: time.sleep(seconds)))
    await asyncio.sleep(0.05)  # it has reached the worker
    return task


async def test_queued_writes_commit_together(store: PostgresEventStore) -> None:
    ids = [f"e{i}" for i in range(8)]
    for eid in ids:
        await new(store, eid)
    busy = await occupy(store, 0.3)
    results = await asyncio.gather(
        *(store.append(eid, 2, steps(eid), status=ExecutionStatus.RUNNING) for eid in ids),
        store.get_execution("e0"),  # a read among them is served on its own
        store.request_cancel("e7"),  # a write in a transaction of its own joins it too
    )
    await busy
    assert store.batch_count >= 1
    assert [r.last_seq for r in results[: len(ids)]] == [3] * len(ids)  # type: ignore[union-attr]
    for eid in ids:
        history = await store.load(eid)
        assert [s.seq for s in history] == [1, 2, 3]
        assert history[2].event == StepCompleted(step=eid, result=eid, ts=2.0)
        record = await store.get_execution(eid)
        assert record is not None and record.status == ExecutionStatus.RUNNING
        assert record.cancel_requested == (eid == "e7")


async def test_a_failing_write_fails_alone(store: PostgresEventStore) -> None:
    for eid in ("a", "b", "c"):
        await new(store, eid)
    busy = await occupy(store, 0.3)
    outcomes = await asyncio.gather(
        store.append("a", 2, steps("a")),
        store.append("b", 5, steps("b")),  # wrong seq
        store.append("c", 2, steps("c"), lease_owner="w1"),  # never leased
        store.append("c", 2, steps("c2")),
        return_exceptions=True,
    )
    await busy
    assert store.batch_count == 0  # undone, then run one by one
    assert [type(o).__name__ for o in outcomes] == [
        "AppendResult",
        "AppendConflictError",
        "LeaseLostError",
        "AppendResult",
    ]
    assert isinstance(outcomes[1], AppendConflictError) and outcomes[1].actual_last_seq == 1
    assert isinstance(outcomes[2], LeaseLostError)
    assert [s.seq for s in await store.load("a")] == [1, 2, 3]
    assert [s.seq for s in await store.load("b")] == [1]
    history = await store.load("c")
    assert [s.event.step for s in history[1:]] == ["c2", "c2"]  # type: ignore[attr-defined]


async def test_a_batch_waiting_on_a_lock_gives_way(
    store: PostgresEventStore, postgres_url: str
) -> None:
    """A batch that waits for a row lock is undone quickly (it holds other rows, and could
    be part of a lock cycle), and its writes then run one by one, waiting as long as needed."""
    for eid in ("locked", "free"):
        await new(store, eid)
    with psycopg.connect(postgres_url) as other:  # holds the row of "locked" until commit
        other.execute("SELECT 1 FROM flow_executions WHERE id = 'locked' FOR UPDATE")
        busy = await occupy(store, 0.2)
        started = time.monotonic()
        appends = asyncio.gather(
            store.append("free", 2, steps("f")), store.append("locked", 2, steps("l"))
        )
        await asyncio.sleep(0.6)
        assert not appends.done()  # "locked" waits for the lock, alone
        other.commit()
    results = await appends
    await busy
    assert time.monotonic() - started < 5  # no deadlock-detection delays
    assert [r.last_seq for r in results] == [3, 3]
    assert store.batch_count == 0


async def test_appends_of_many_events(store: PostgresEventStore) -> None:
    await new(store, "e1")
    seq = 2
    for size in (1, 2, 100, 101, 250):
        batch = [StepCompleted(step="s", instance=seq + i, result=i) for i in range(size)]
        result = await store.append("e1", seq, batch)
        seq += size
        assert result.last_seq == seq - 1
    history = await store.load("e1")
    assert [s.seq for s in history] == list(range(1, seq))
    assert [s.event.instance for s in history[1:]] == list(range(2, seq))  # type: ignore[attr-defined]
    with pytest.raises(AppendConflictError):
        await store.append("e1", seq - 1, [StepStarted(step="x")] * 101)
    assert [s.seq for s in await store.load("e1", seq - 2)] == [seq - 1]


async def test_an_event_already_at_the_seq_is_a_conflict(
    store: PostgresEventStore, postgres_url: str
) -> None:
    """The row guard passes but the insert collides (a stray event past ``last_seq``): the
    append is a conflict and changes nothing, in one statement or several."""
    await new(store, "e1")
    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute(
            "INSERT INTO flow_events (execution_id, seq, type, encoding, data, created_at) "
            "VALUES ('e1', 3, 'StepStarted', 1, '\\x00', 0)"
        )
    before = await store.get_execution("e1")
    for size in (2, 101):
        with pytest.raises(AppendConflictError) as info:
            await store.append("e1", 2, [StepStarted(step="x")] * size, error="no")
        assert (info.value.expected_seq, info.value.actual_last_seq) == (2, 1)
        assert await store.get_execution("e1") == before


def test_a_postgres_url_without_the_driver_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without psycopg (``import psycopg`` fails), the error says which extra to install and
    never shows the password."""
    import builtins
    import sys

    from agentainer_flow.store import StoreUnavailableError, create_store

    real_import = builtins.__import__

    def no_psycopg(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "psycopg" or name.startswith("psycopg."):
            raise ImportError("No module named 'psycopg'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "psycopg", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_psycopg)
    with pytest.raises(StoreUnavailableError,
                       match=r"pip install 'agentainer-flow\[postgres\]'") as err:
        create_store("postgresql://app:hunter2@db.example:5432/flow")
    assert "hunter2" not in str(err.value)


def test_pool_options_in_the_url() -> None:
    from agentainer_flow.store import StoreUnavailableError
    from agentainer_flow.store.postgres import PostgresEventStore

    store = PostgresEventStore("postgresql://app@db.example:5432/flow?pool_size=3&max_overflow=1"
                               "&retry_for=5")
    assert store._max_workers == 4 and store.retry_for == 5
    assert "pool_size" not in store.url and "retry_for" not in store.url
    with pytest.raises(StoreUnavailableError, match="pool_size in the store URL must be"):
        PostgresEventStore("postgresql://app@db.example/flow?pool_size=lots")
