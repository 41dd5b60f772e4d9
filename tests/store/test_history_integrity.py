"""Damaged histories are detected on load, never replayed, and shown with the damage marked.

A small real workflow runs on SQLite and Postgres; then its rows are changed with plain SQL
(an event deleted, duplicated, changed, garbled, the tail cut) and every way in (the store,
``resume``, ``flow replay``, ``flow history``) must name the execution and the damaged seq,
and no step body may run again.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from agentainer_flow import (
    Context,
    ExecutionMode,
    HistoryCorruptedError,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.history import ExecutionState
from agentainer_flow.engine.spec import get_workflow_spec
from agentainer_flow.store import MemoryEventStore, NewExecution, StoreError, create_store
from agentainer_flow.store.chain import chain_of
from agentainer_flow.store.events import (
    AgentStarted,
    Event,
    ExecutionCompleted,
    ExecutionStarted,
    StepCompleted,
    StepFailed,
    StepStarted,
    TimerStarted,
)

RUNS: Counter[str] = Counter()


@workflow(name="integrity_steps")
class Steps:
    @step()
    async def a(self, ctx: Context) -> int:
        RUNS["a"] += 1
        return 1

    @step(depends_on=["a"])
    async def b(self, ctx: Context, a_result: int) -> int:
        RUNS["b"] += 1
        return a_result + 1

    @step(depends_on=["b"])
    async def c(self, ctx: Context, b_result: int) -> int:
        RUNS["c"] += 1
        await ctx.sleep("1h")
        return b_result + 1


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture
def db(url: str) -> Iterator[sa.Engine]:
    """A plain synchronous engine on the store's database, to damage it with SQL."""
    parsed = sa.make_url(url)
    driver = "sqlite+pysqlite" if parsed.drivername.startswith("sqlite") else "postgresql+psycopg"
    engine = sa.create_engine(parsed.set(drivername=driver))
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def _reset_runs() -> None:
    RUNS.clear()


# making histories ---------------------------------------------------------------------
async def unfinished(url: str) -> str:
    """Run ``Steps`` until ``c`` sleeps (a and b done), then stop: a resumable execution."""
    async with WorkflowClient(store=url, runtime="mock") as client:
        execution = await client.run_workflow(Steps(), ExecutionMode.ASYNC)
        for _ in range(1000):
            history = await client.store.load(execution.id)
            if any(isinstance(s.event, TimerStarted) for s in history):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("step c never started its timer")
    assert RUNS == {"a": 1, "b": 1, "c": 1}
    return execution.id


async def completed(url: str) -> str:
    async with WorkflowClient(store=url, runtime="mock", clock=VirtualClock()) as client:
        execution = await client.run_workflow(Steps())
        assert await execution.get_result() == 3
    return execution.id


Row = tuple[int, str, bytes, str | None]


def rows_of(db: sa.Engine, eid: str) -> list[Row]:
    with db.connect() as conn:
        return [
            (seq, type_, bytes(data), chain)
            for seq, type_, data, chain in conn.execute(
                sa.text("SELECT seq, type, data, chain FROM flow_events "
                        "WHERE execution_id = :e ORDER BY seq"), {"e": eid})
        ]


def find(rows: list[Row], type_name: str, step_name: str | None = None) -> Row:
    for row in rows:
        if row[1] == type_name and (step_name is None or json.loads(row[2]).get("step")
                                    == step_name):
            return row
    raise AssertionError(f"no {type_name} {step_name or ''} in {rows}")


def other_payload(data: bytes, result: object) -> bytes:
    """The same event with another result."""
    tree = json.loads(data)
    tree["result"] = result
    return json.dumps(tree, separators=(",", ":")).encode()


def insert(conn: sa.Connection, eid: str, seq: int, type_name: str, data: bytes,
           chain: str | None) -> None:
    conn.execute(sa.text(
        "INSERT INTO flow_events (execution_id, seq, type, encoding, data, created_at, chain) "
        "VALUES (:e, :s, :t, 1, :d, 0, :c)"), {"e": eid, "s": seq, "t": type_name, "d": data,
                                                "c": chain})


def set_data(conn: sa.Connection, eid: str, seq: int, data: bytes) -> None:
    conn.execute(sa.text("UPDATE flow_events SET data = :d WHERE execution_id = :e AND seq = :s"),
                 {"d": data, "e": eid, "s": seq})


def delete(conn: sa.Connection, eid: str, *seqs: int) -> None:
    for seq in seqs:
        conn.execute(sa.text("DELETE FROM flow_events WHERE execution_id = :e AND seq = :s"),
                     {"e": eid, "s": seq})


# the damage: each changes the database and returns the seq that must be named -----------
Damage = Callable[[sa.Connection, str, list[Row]], int]


def delete_an_event_in_the_middle(conn: sa.Connection, eid: str, rows: list[Row]) -> int:
    seq = find(rows, "StepCompleted", "a")[0]
    delete(conn, eid, seq)
    return seq


def duplicate_a_step_completed_at_the_end(conn: sa.Connection, eid: str,
                                          rows: list[Row]) -> int:
    _, type_name, data, chain = find(rows, "StepCompleted", "b")
    last = rows[-1][0]
    insert(conn, eid, last + 1, type_name, other_payload(data, 40), chain)
    return last + 1


def duplicate_a_step_completed_in_the_middle(conn: sa.Connection, eid: str,
                                             rows: list[Row]) -> int:
    """Renumber the events after a's outcome and slip a second one in (row included)."""
    seq, type_name, data, chain = find(rows, "StepCompleted", "a")
    for later in reversed([r[0] for r in rows if r[0] > seq]):
        conn.execute(sa.text("UPDATE flow_events SET seq = :n WHERE execution_id = :e "
                             "AND seq = :s"), {"n": later + 1, "e": eid, "s": later})
    insert(conn, eid, seq + 1, type_name, other_payload(data, 40), chain)
    conn.execute(sa.text("UPDATE flow_executions SET last_seq = last_seq + 1 WHERE id = :e"),
                 {"e": eid})
    return seq + 1


def change_a_payload_byte(conn: sa.Connection, eid: str, rows: list[Row]) -> int:
    seq, _, data, _ = find(rows, "StepCompleted", "a")
    at = data.index(b'"result":') + len(b'"result":')
    changed = data[:at] + (b"7" if data[at:at + 1] != b"7" else b"8") + data[at + 1:]
    set_data(conn, eid, seq, changed)
    return seq


def write_garbage_as_a_payload(conn: sa.Connection, eid: str, rows: list[Row]) -> int:
    seq = find(rows, "StepCompleted", "b")[0]
    set_data(conn, eid, seq, b"\x00\xff not an event \x80")
    return seq


def delete_the_tail(conn: sa.Connection, eid: str, rows: list[Row]) -> int:
    last = rows[-1][0]
    delete(conn, eid, last - 1, last)
    return last - 1


def cut_the_tail_and_move_the_row_back(conn: sa.Connection, eid: str, rows: list[Row]) -> int:
    """Only the row's checksum tells that its history went further."""
    last = rows[-1][0]
    delete(conn, eid, last)
    conn.execute(sa.text("UPDATE flow_executions SET last_seq = :s WHERE id = :e"),
                 {"s": last - 1, "e": eid})
    return last


DAMAGE: list[Damage] = [
    delete_an_event_in_the_middle,
    duplicate_a_step_completed_at_the_end,
    duplicate_a_step_completed_in_the_middle,
    change_a_payload_byte,
    write_garbage_as_a_payload,
    delete_the_tail,
    cut_the_tail_and_move_the_row_back,
]


def damage(db: sa.Engine, eid: str, how: Damage) -> int:
    rows = rows_of(db, eid)
    with db.begin() as conn:
        return how(conn, eid, rows)


def flow(*args: str) -> Any:
    """``flow ARGS`` in this process (the workflow is registered here)."""
    from agentainer_flow._cli import app

    return CliRunner().invoke(app, list(args))


def marks(entry_seq: int, problem: str | None, seq: int) -> bool:
    """Whether an audited entry marks damage at ``seq``: its own, or a gap before it."""
    return entry_seq == seq or (entry_seq > seq and problem is not None and (
        f"event {seq} is missing" in problem or f"events {seq} to" in problem))


# the tests ------------------------------------------------------------------------------
async def test_an_undamaged_history_loads_and_resumes(url: str, db: sa.Engine) -> None:
    eid = await unfinished(url)
    rows = rows_of(db, eid)
    assert all(chain is not None for *_, chain in rows)
    async with WorkflowClient(store=url, runtime="mock", clock=VirtualClock()) as client:
        record = await client.describe(eid)
        assert record.last_chain == rows[-1][3]
        audit = await client.store.audit(eid)
        assert [(e.seq, e.problem) for e in audit] == [(r[0], None) for r in rows]
        execution = await client.resume(eid)
        assert await execution.get_result() == 3
    assert RUNS == {"a": 1, "b": 1, "c": 2}  # c was in flight: its body runs again
    replayed = await asyncio.to_thread(flow, "replay", eid, "--store", url)
    assert replayed.exit_code == 0, replayed.output


@pytest.mark.parametrize("how", DAMAGE, ids=[d.__name__ for d in DAMAGE])
async def test_damage_is_detected_and_never_replayed(url: str, db: sa.Engine,
                                                     how: Damage) -> None:
    eid = await unfinished(url)
    seq = damage(db, eid, how)
    runs = dict(RUNS)

    async with create_store(url) as store:
        with pytest.raises(HistoryCorruptedError) as info:
            await store.load(eid)
        assert (info.value.execution_id, info.value.seq) == (eid, seq), str(info.value)
        assert isinstance(info.value, StoreError) and info.value.code == "history_corrupted"
        message = str(info.value)
        assert f"execution {eid}: history damaged at seq {seq}: " in message
        assert f"flow history {eid}" in message
        if seq > 1:  # a load from a later seq is checked too
            with pytest.raises(HistoryCorruptedError):
                await store.load(eid, after_seq=seq - 1)
        audit = await store.audit(eid)
    damaged = [e for e in audit if e.problem]
    assert damaged and marks(damaged[0].seq, damaged[0].problem, seq), audit
    assert all(e.event is not None for e in audit if not e.problem)

    async with WorkflowClient(store=url, runtime="mock", clock=VirtualClock()) as client:
        with pytest.raises(HistoryCorruptedError) as resumed:
            await client.resume(eid)
        assert (resumed.value.execution_id, resumed.value.seq) == (eid, seq)
    assert dict(RUNS) == runs  # no step body ran again

    replayed = await asyncio.to_thread(flow, "replay", eid, "--store", url)
    assert replayed.exit_code == 1, replayed.output
    assert f"history damaged at seq {seq}" in replayed.stderr
    assert "Traceback" not in replayed.output and "internal error" not in replayed.output

    shown = await asyncio.to_thread(flow, "history", eid, "--store", url)
    assert shown.exit_code == 1, shown.output
    assert "workflow_started" in shown.stdout  # what can be read is shown
    assert "DAMAGED" in shown.stdout
    assert f"history damaged at seq {seq}" in shown.stderr

    as_json = await asyncio.to_thread(flow, "history", eid, "--store", url, "--json")
    assert as_json.exit_code == 1, as_json.output
    entries = json.loads(as_json.stdout)
    assert all("problem" in e for e in entries)
    first = next(e for e in entries if e["problem"])
    assert marks(first["seq"], first["problem"], seq), entries
    assert entries[0]["type"] == "workflow_started" and entries[0]["problem"] is None


@pytest.mark.parametrize("how", [delete_an_event_in_the_middle, change_a_payload_byte,
                                 delete_the_tail, cut_the_tail_and_move_the_row_back],
                         ids=lambda d: d.__name__)
async def test_load_many_reads_each_history_as_load_and_leaves_out_a_damaged_one(
        url: str, db: sa.Engine, how: Damage) -> None:
    """What a worker reads for a claim's executions (``load_many``): each history as
    ``load`` gives it, a damaged one left out, for its own run's ``load`` to refuse."""
    good = await unfinished(url)
    RUNS.clear()
    bad = await unfinished(url)
    RUNS.clear()
    done = await completed(url)
    damage(db, bad, how)
    async with create_store(url) as store:
        histories = await store.load_many([good, bad, done, "no-such-execution", good])
        assert set(histories) == {good, done}
        for eid in (good, done):
            assert histories[eid] == await store.load(eid)
        assert await store.load_many([]) == {}
        assert await store.load_many([good]) == {good: await store.load(good)}
        with pytest.raises(HistoryCorruptedError):
            await store.load(bad)


async def test_a_cut_tail_of_a_finished_execution(url: str, db: sa.Engine) -> None:
    eid = await completed(url)
    rows = rows_of(db, eid)
    last = rows[-1][0]
    assert rows[-1][1] == "ExecutionCompleted"
    with db.begin() as conn:
        delete(conn, eid, last)
    runs = dict(RUNS)
    async with WorkflowClient(store=url, runtime="mock", clock=VirtualClock()) as client:
        with pytest.raises(HistoryCorruptedError) as info:
            await client.resume(eid)
        assert (info.value.execution_id, info.value.seq) == (eid, last)
        audit = await client.store.audit(eid)
    assert dict(RUNS) == runs
    assert audit[-1].seq == last and audit[-1].event is None and audit[-1].problem
    assert "missing at the end" in audit[-1].problem
    for args in (["status", eid], ["logs", eid], ["replay", eid]):
        out = await asyncio.to_thread(flow, *args, "--store", url)
        assert out.exit_code == 1, (args, out.output)
        assert f"history damaged at seq {last}" in out.stderr, (args, out.output)
        assert "Traceback" not in out.output and "internal error" not in out.output


async def test_a_forged_duplicate_with_a_valid_chain_is_refused_by_the_fold(
    url: str, db: sa.Engine
) -> None:
    """Even a duplicate chained properly (and the row moved along) cannot be replayed: a
    second outcome of a finished step cannot follow the events before it."""
    eid = await unfinished(url)
    rows = rows_of(db, eid)
    _, type_name, data, _ = find(rows, "StepCompleted", "a")
    forged = other_payload(data, 40)
    last, last_chain = rows[-1][0], rows[-1][3]
    chain = chain_of(last_chain, last + 1, type_name, forged)
    with db.begin() as conn:
        insert(conn, eid, last + 1, type_name, forged, chain)
        conn.execute(sa.text("UPDATE flow_executions SET last_seq = :s, last_chain = :c "
                             "WHERE id = :e"), {"s": last + 1, "c": chain, "e": eid})
    async with WorkflowClient(store=url, runtime="mock", clock=VirtualClock()) as client:
        assert len(await client.store.load(eid)) == last + 1  # the chain itself is whole
        with pytest.raises(HistoryCorruptedError) as info:
            await client.resume(eid)
    assert (info.value.execution_id, info.value.seq) == (eid, last + 1)
    assert "second outcome" in info.value.problem
    assert RUNS == {"a": 1, "b": 1, "c": 1}
    replayed = await asyncio.to_thread(flow, "replay", eid, "--store", url)
    assert replayed.exit_code == 1 and f"damaged at seq {last + 1}" in replayed.stderr


async def test_histories_written_without_chains_load_and_are_chained_over(
    url: str, db: sa.Engine
) -> None:
    """Events of schema version 1 have no chain: accepted, and appends chain over them."""
    started = ExecutionStarted(workflow_name="wf")
    async with create_store(url) as store:
        await store.create_execution(NewExecution(id="old", workflow_name="wf"), started)
        await store.append("old", 2, [StepStarted(step="a"), StepCompleted(step="a", result=1)])
    with db.begin() as conn:  # as version 1 wrote them
        conn.execute(sa.text("UPDATE flow_events SET chain = NULL"))
        conn.execute(sa.text("UPDATE flow_executions SET last_chain = NULL"))
    async with create_store(url) as store:  # a new store: nothing cached
        assert [s.seq for s in await store.load("old")] == [1, 2, 3]
        assert [s.seq for s in await store.load("old", after_seq=2)] == [3]
        await store.append("old", 4, [StepStarted(step="b")])
    async with create_store(url) as store:
        await store.append("old", 5, [StepCompleted(step="b", result=2)])
        assert [s.seq for s in await store.load("old", after_seq=2)] == [3, 4, 5]
        assert [s.seq for s in await store.load("old", after_seq=4)] == [5]
        history = await store.load("old")
        assert [s.seq for s in history] == [1, 2, 3, 4, 5]
        record = await store.get_execution("old")
        assert record is not None and record.last_chain is not None
    rows = rows_of(db, "old")
    assert [r[3] is None for r in rows] == [True, True, True, False, False]
    assert rows[3][3] == chain_of(None, 4, rows[3][1], rows[3][2])
    with db.begin() as conn:  # the chained events are checked
        set_data(conn, "old", 4, rows[3][2].replace(b'"b"', b'"x"'))
    async with create_store(url) as store:
        with pytest.raises(HistoryCorruptedError) as info:
            await store.load("old")
        assert info.value.seq == 4


async def test_a_stale_chain_cache_never_writes_a_broken_chain(url: str) -> None:
    async with create_store(url) as store:
        await store.create_execution(NewExecution(id="e1", workflow_name="wf"),
                                     ExecutionStarted(workflow_name="wf"))
        await store.append("e1", 2, [StepStarted(step="a")])
        store._chains.put("e1", 2, "0" * 32)  # type: ignore[attr-defined]  # stale
        await store.append("e1", 3, [StepCompleted(step="a", result=1)])
        store._chains.forget("e1")  # type: ignore[attr-defined]
        await store.append("e1", 4, [StepStarted(step="b")])
        assert [s.seq for s in await store.load("e1")] == [1, 2, 3, 4]
        assert [(e.seq, e.problem) for e in await store.audit("e1")] == [
            (1, None), (2, None), (3, None), (4, None)]


async def test_the_memory_store_checks_its_histories_too() -> None:
    store = MemoryEventStore()
    await store.create_execution(NewExecution(id="e1", workflow_name="wf"),
                                 ExecutionStarted(workflow_name="wf"))
    await store.append("e1", 2, [StepStarted(step="a"), StepCompleted(step="a", result=1),
                                 StepStarted(step="b")])
    del store._logs["e1"][2]  # seq 3
    with pytest.raises(HistoryCorruptedError) as info:
        await store.load("e1")
    assert (info.value.execution_id, info.value.seq) == ("e1", 3)
    assert [(e.seq, e.problem) for e in await store.audit("e1")] == [
        (1, None), (2, None), (4, "event 3 is missing before it")]


def _fold(events: list[Event]) -> None:
    state = ExecutionState(get_workflow_spec("integrity_steps"), "e1")
    for seq, ev in enumerate(events, start=1):
        state.apply(seq, ev)


START = ExecutionStarted(workflow_name="integrity_steps")


@pytest.mark.parametrize(("events", "problem"), [
    ([START, START], "a second ExecutionStarted"),
    ([StepStarted(step="a")], "begins with StepStarted"),
    ([START, StepCompleted(step="a", result=1)], "never started"),
    ([START, StepStarted(step="a"), StepCompleted(step="a", attempt=2)], "never started"),
    ([START, StepStarted(step="a"),
      AgentStarted(step="a", attempt=2, index=0, agent_id="x")], "never started"),
    ([START, StepStarted(step="a"), StepCompleted(step="a", result=1),
      StepCompleted(step="a", result=2)], "second outcome"),
    ([START, StepStarted(step="a"), StepCompleted(step="a", result=1),
      StepFailed(step="a", error="x", final=True)], "second outcome"),
    ([START, StepStarted(step="a"), StepCompleted(step="a", result=1),
      StepStarted(step="a")], "started again"),
    ([START, ExecutionCompleted(result=1), StepStarted(step="a")], "after the execution ended"),
])
def test_the_fold_refuses_events_that_cannot_follow(events: list[Event], problem: str) -> None:
    with pytest.raises(HistoryCorruptedError) as info:
        _fold(events)
    assert info.value.execution_id == "e1"
    assert info.value.seq == len(events)
    assert problem in info.value.problem


def test_the_fold_accepts_retries() -> None:
    _fold([START, StepStarted(step="a"), StepFailed(step="a", error="x", final=False),
           StepStarted(step="a", attempt=2), StepCompleted(step="a", attempt=2, result=1)])
