"""Postgres writes on the caller's thread (``PostgresEventStore._serve_inline``): used only
when the caller is alone, never while other work waits on the event loop, off with
``?inline=0``, and as safe as the threaded path through cut connections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from agentainer_flow.store import (
    AppendConflictError,
    ExecutionStatus,
    LeaseLostError,
    NewExecution,
    StoreUnavailableError,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted, StepCompleted, StepStarted
from agentainer_flow.store.postgres import PostgresEventStore

from .test_outages import Proxy, captured_logs, named
from .test_outages import proxy as proxy  # the fixture

pytestmark = pytest.mark.postgres


async def _create(store: Any, eid: str) -> None:
    await store.create_execution(
        NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")
    )


def _step(i: int) -> list[Any]:
    return [StepStarted(step=f"s{i}"), StepCompleted(step=f"s{i}", result=i)]


async def _append_steps(store: Any, eid: str, n: int) -> None:
    seq = 2
    for i in range(n):
        await store.append(eid, seq, _step(i), status=ExecutionStatus.RUNNING)
        seq += 2


async def _check_history(store: Any, eid: str, n: int) -> None:
    history = await store.load(eid)  # load verifies the hash chain
    assert [s.seq for s in history] == list(range(1, 2 * n + 2))
    assert [s.event for s in history[1:]] == [e for i in range(n) for e in _step(i)]
    record = await store.get_execution(eid)
    assert record is not None and record.last_seq == 2 * n + 1


async def test_a_lone_caller_writes_on_its_own_thread(postgres_url: str) -> None:
    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        await _create(store, "warm")  # opens a worker's connection (never inline)
        before = store.inline_count
        await _create(store, "x")
        await _append_steps(store, "x", 20)
        # the create and every append, but the one or two that a wake-up of the listener
        # thread (the create's NOTIFY) found with its callback ready on the loop
        assert store.inline_count - before >= 19
        await _check_history(store, "x", 20)


async def test_inline_off_in_the_url(postgres_url: str) -> None:
    url = sa.make_url(postgres_url).update_query_dict({"inline": "0"})
    async with create_store(url.render_as_string(hide_password=False)) as store:
        assert isinstance(store, PostgresEventStore) and store.inline is False
        await _create(store, "x")
        await _append_steps(store, "x", 10)
        assert store.inline_count == 0
        await _check_history(store, "x", 10)
    bad = sa.make_url(postgres_url).update_query_dict({"inline": "maybe"})
    with pytest.raises(StoreUnavailableError, match="inline in the store URL must be 0 or 1"):
        PostgresEventStore(bad.render_as_string(hide_password=False))


async def test_never_while_other_work_is_ready(postgres_url: str) -> None:
    """A callback ready on the loop (another task, an I/O event) keeps the write off it."""
    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        await _create(store, "x")
        await _append_steps(store, "x", 1)
        before = store.inline_count
        ran: list[int] = []
        loop = asyncio.get_running_loop()
        for i in range(1, 6):
            loop.call_soon(ran.append, i)  # ready before the append is submitted
            await store.append("x", 2 * i + 2, _step(i))
        assert store.inline_count == before and ran == [1, 2, 3, 4, 5]
        await _check_history(store, "x", 6)


async def test_many_callers_at_once_share_the_threads(postgres_url: str) -> None:
    """Fifty executions appending together: all land, in order, once; most writes go to
    the worker threads (and some commit together)."""
    async with create_store(postgres_url + "?pool_size=2") as store:
        assert isinstance(store, PostgresEventStore)
        ids = [f"c{i}" for i in range(50)]
        await asyncio.gather(*(_create(store, eid) for eid in ids))
        before = store.inline_count
        await asyncio.gather(*(_append_steps(store, eid, 10) for eid in ids))
        for eid in ids:
            await _check_history(store, eid, 10)
        assert store.inline_count - before < 250  # of 500 appends
        assert store.batch_count > 0


async def test_appends_of_one_loop_turn_commit_together(postgres_url: str) -> None:
    """Ten appends started in the same turn of the loop reach one worker as one batch (one
    transaction); with coalescing off they are still all written, once and in order."""
    for coalesce in (True, False):
        async with create_store(postgres_url) as store:
            assert isinstance(store, PostgresEventStore)
            store.coalesce = coalesce
            ids = [f"t{coalesce}{i}" for i in range(10)]
            for eid in ids:
                await _create(store, eid)
            batches = store.batch_count
            await asyncio.gather(*(_append_steps(store, eid, 1) for eid in ids))
            if coalesce:
                assert store.batch_count - batches == 1
            for eid in ids:
                await _check_history(store, eid, 1)
            # a second round, chained on the first: seq 4 for each
            await asyncio.gather(
                *(store.append(eid, 4, _step(1), status=ExecutionStatus.RUNNING) for eid in ids)
            )
            for eid in ids:
                assert [s.seq for s in await store.load(eid)] == [1, 2, 3, 4, 5]


async def test_a_failing_append_in_a_batch_fails_alone(postgres_url: str) -> None:
    """Ten appends sent together (one pipelined transaction), one at a taken seq and one
    under a stale lease token: those two fail with their own errors, the others commit."""
    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        ids = [f"f{i}" for i in range(10)]
        for eid in ids:
            await _create(store, eid)
        [held] = await store.claim("w1", lease_seconds=60, limit=1)
        ids.remove(held.id)
        ids.append(held.id)  # the leased one last
        async with create_store(postgres_url) as other:  # another process's append: this
            await _append_steps(other, ids[0], 1)      # store's cache still ends at seq 1
        batches = store.batch_count

        async def one(eid: str) -> Any:
            token = held.lease_token - 1 if eid == held.id else None
            owner = "w1" if eid == held.id else None
            return await store.append(eid, 2, _step(0), lease_owner=owner, lease_token=token)

        results = await asyncio.gather(*(one(eid) for eid in ids), return_exceptions=True)
        assert store.batch_count - batches == 1
        assert isinstance(results[0], AppendConflictError)
        assert isinstance(results[-1], LeaseLostError)
        for eid, result in zip(ids[1:-1], results[1:-1], strict=True):
            assert not isinstance(result, BaseException), result
            await _check_history(store, eid, 1)
        await _check_history(store, ids[0], 1)  # its own first append, once
        assert [s.seq for s in await store.load(held.id)] == [1]


async def test_an_inline_append_cut_after_its_commit_is_recognised(
    postgres_url: str, proxy: Proxy
) -> None:
    """The connection drops after the server committed an append run inline: the retry
    (on a thread, with a new connection) recognises its own events; nothing is doubled."""
    async with create_store(proxy.url(postgres_url)) as store:
        assert isinstance(store, PostgresEventStore)
        await _create(store, "warm")
        await _create(store, "x")
        await _append_steps(store, "x", 3)
        before = store.inline_count
        proxy.arm(b"WITH appended AS")
        with captured_logs() as logs:
            result = await asyncio.wait_for(store.append("x", 8, _step(3)), 120)
        assert proxy.cut.is_set() and store.inline_count > before
        assert result.last_seq == 9
        assert named(logs, "store_append_resolved")
        await _check_history(store, "x", 4)
        await store.append("x", 10, _step(4))  # and it goes on from there
        await _check_history(store, "x", 5)


@pytest.mark.parametrize("after", [True, False], ids=["after-commit", "before-commit"])
async def test_a_pipelined_batch_cut_at_its_commit_lands_once(
    postgres_url: str, proxy: Proxy, after: bool
) -> None:
    """The connection drops once the server has answered a batch sent at once (BEGIN to
    COMMIT), or before the server got it: each append is tried again alone, and recognises
    its own events or writes them; none is lost or doubled."""
    async with create_store(proxy.url(postgres_url)) as store:
        assert isinstance(store, PostgresEventStore)
        ids = [f"p{i}" for i in range(6)]
        for eid in ids:
            await _create(store, eid)
        proxy.arm(b"COMMIT", after=after)
        with captured_logs() as logs:
            results = await asyncio.wait_for(
                asyncio.gather(*(store.append(eid, 2, _step(0)) for eid in ids)), 120)
        assert proxy.cut.is_set()
        assert [r.last_seq for r in results] == [3] * len(ids)
        assert len(named(logs, "store_append_resolved")) == (len(ids) if after else 0)
        for eid in ids:
            await _check_history(store, eid, 1)
        await asyncio.gather(*(store.append(eid, 4, _step(1)) for eid in ids))
        for eid in ids:
            await _check_history(store, eid, 2)


async def test_an_inline_write_to_a_server_that_stops_answering_lets_the_loop_go(
    postgres_url: str, proxy: Proxy
) -> None:
    """The server runs an inline append and then never answers, the connection left open
    (a partition): after ``inline_timeout`` the watchdog cuts the connection, the loop is
    free again, and the retry on a worker thread recognises the committed append."""
    async with create_store(proxy.url(postgres_url)) as store:
        assert isinstance(store, PostgresEventStore)
        store.inline_timeout = 1.0
        await _create(store, "warm")
        await _create(store, "x")
        await _append_steps(store, "x", 2)
        before = store.inline_count
        proxy.arm(b"WITH appended AS", hang=True)
        started = time.monotonic()
        with captured_logs() as logs:
            result = await asyncio.wait_for(store.append("x", 6, _step(2)), 60)
        took = time.monotonic() - started
        assert proxy.cut.is_set() and store.inline_count > before
        assert store.inline_cuts == 1 and named(logs, "store_inline_write_cut")
        assert 1.0 <= took < 10, took
        assert result.last_seq == 7
        await _check_history(store, "x", 3)


async def test_an_inline_create_cut_after_its_commit_exists_once(
    postgres_url: str, proxy: Proxy
) -> None:
    async with create_store(proxy.url(postgres_url)) as store:
        assert isinstance(store, PostgresEventStore)
        await _create(store, "warm")
        proxy.arm(b"WITH created AS")
        record, _ = await asyncio.wait_for(
            store.create_execution(
                NewExecution(id="x", workflow_name="wf"), ExecutionStarted(workflow_name="wf")
            ),
            120,
        )
        assert proxy.cut.is_set() and record.id == "x"
        assert [s.seq for s in await store.load("x")] == [1]
        await _append_steps(store, "x", 2)
        await _check_history(store, "x", 2)


async def test_terminated_backends_between_inline_writes(
    postgres_url: str, postgres_server: str
) -> None:
    admin = sa.make_url(postgres_server).set(drivername="postgresql")
    name = sa.make_url(postgres_url).database
    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        await _create(store, "x")
        seq = 2
        for i in range(12):
            if i % 3 == 0:
                with psycopg.connect(admin.render_as_string(hide_password=False),
                                     autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
            await store.append("x", seq, _step(i))
            seq += 2
        await _check_history(store, "x", 12)
