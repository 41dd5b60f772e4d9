"""SQLite is durable by default (WAL, ``synchronous=FULL``), faster only when asked, and its
group commit isolates a failing request from the rest of its batch."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agentainer_flow.store import (
    AppendConflictError,
    ExecutionStatus,
    NewExecution,
    StoreUnavailableError,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted, StepCompleted, StepStarted
from agentainer_flow.store.sqlite import SQLiteEventStore

FULL, NORMAL = 2, 1


def journal_mode(path: Path) -> str:
    """The journal mode recorded in the file, seen by a connection of our own."""
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


async def test_default_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with create_store(f"sqlite:///{path}") as store:
        assert isinstance(store, SQLiteEventStore)
        assert await store._pragma("journal_mode") == "wal"
        assert await store._pragma("synchronous") == FULL
        assert store.synchronous == "FULL"
    assert journal_mode(path) == "wal"


async def test_synchronous_normal_when_asked(tmp_path: Path) -> None:
    async with SQLiteEventStore(f"sqlite:///{tmp_path}/a.db", synchronous="NORMAL") as store:
        assert await store._pragma("synchronous") == NORMAL
    async with create_store(f"sqlite:///{tmp_path}/b.db", synchronous="normal") as store:
        assert await store._pragma("synchronous") == NORMAL
    async with create_store(f"sqlite:///{tmp_path}/c.db?synchronous=normal") as store:
        assert await store._pragma("synchronous") == NORMAL
        assert await store._pragma("journal_mode") == "wal"


def test_unknown_synchronous_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailableError, match="synchronous"):
        SQLiteEventStore(f"sqlite:///{tmp_path}/a.db", synchronous="sometimes")


async def test_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "flow.db"
    async with create_store(f"sqlite:///{path}"):
        pass
    assert path.exists()


async def test_one_conflict_fails_alone_in_a_group_commit(tmp_path: Path) -> None:
    async with SQLiteEventStore(f"sqlite:///{tmp_path}/flow.db") as store:
        ids = [f"e{i:02}" for i in range(50)]
        for eid in ids:
            await store.create_execution(
                NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")
            )
        commits = store.commit_count
        calls = [
            store.append(eid, 2, [StepStarted(step="s"), StepCompleted(step="s", result=eid)])
            for eid in ids
        ]
        calls.insert(25, store.append("e07", 9, [StepStarted(step="bad")]))  # wrong seq
        calls.insert(26, store.append("nope", 2, [StepStarted(step="bad")]))  # unknown
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(failures) == 2, failures
        assert isinstance(outcomes[25], AppendConflictError)
        assert store.commit_count - commits < len(calls)
        for eid in ids:
            assert [s.seq for s in await store.load(eid)] == [1, 2, 3]


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from agentainer_flow.store import NewExecution, ExecutionStatus, create_store
    from agentainer_flow.store.events import ExecutionStarted, StepCompleted

    async def main(url):
        store = create_store(url)
        await store.open()
        await store.create_execution(
            NewExecution(id="e1", workflow_name="wf"), ExecutionStarted(workflow_name="wf")
        )
        seq = 2
        for i in range(20):
            await store.append("e1", seq, [StepCompleted(step="s", result=i)],
                               status=ExecutionStatus.RUNNING)
            seq += 1
        print("appended", seq - 1, flush=True)
        await asyncio.sleep(3600)  # killed here, without closing anything

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_acknowledged_appends_survive_a_killed_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flow.db"
    proc = subprocess.Popen(  # noqa: ASYNC220 - killed below, never waited on while running
        [sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.split() == ["appended", "21"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    async with create_store(url) as store:
        history = await store.load("e1")
        assert [s.seq for s in history] == list(range(1, 22))
        record = await store.get_execution("e1")
        assert record is not None
        assert record.last_seq == 21 and record.status == ExecutionStatus.RUNNING
