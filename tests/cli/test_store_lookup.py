"""The two store additions the CLI stands on, on every backend: finding an execution by a
unique prefix of its id, and opening a store for reading without creating it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentainer_flow.store import (
    AmbiguousExecutionIdError,
    EventStore,
    ExecutionNotFoundError,
    NewExecution,
    StoreUnavailableError,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted

IDS = ["abc-111", "abc-222", "abd-333", "ABC-444", "a%c-555", "x"]


async def _make(store: EventStore, ids: list[str]) -> None:
    for eid in ids:
        await store.create_execution(NewExecution(id=eid, workflow_name="wf"),
                                     ExecutionStarted(workflow_name="wf"))


async def test_a_unique_prefix_names_one_execution(store: EventStore) -> None:
    await _make(store, IDS)
    assert await store.resolve_execution_id("abd") == "abd-333"
    assert await store.resolve_execution_id("abc-2") == "abc-222"
    assert await store.resolve_execution_id("AB") == "ABC-444"  # case-sensitive
    assert await store.resolve_execution_id("a%") == "a%c-555"  # no LIKE wildcard
    assert await store.resolve_execution_id("x") == "x"  # a whole id
    found = await store.list_executions(id_prefix="abc")
    assert sorted(r.id for r in found) == ["abc-111", "abc-222"]
    assert [r.id for r in await store.list_executions(id_prefix="abc", workflow_name="other")
            ] == []  # with the other filters


async def test_an_ambiguous_or_unknown_prefix_is_an_error(store: EventStore) -> None:
    await _make(store, IDS)
    with pytest.raises(AmbiguousExecutionIdError) as ambiguous:
        await store.resolve_execution_id("abc")
    assert sorted(ambiguous.value.candidates) == ["abc-111", "abc-222"]
    assert "abc-111" in str(ambiguous.value) and "abc-222" in str(ambiguous.value)
    assert isinstance(ambiguous.value, ExecutionNotFoundError)  # no one execution is named
    for unknown in ("abz", "", "abc-1110"):
        with pytest.raises(ExecutionNotFoundError) as missing:
            await store.resolve_execution_id(unknown)
        assert not isinstance(missing.value, AmbiguousExecutionIdError)


async def test_many_matches_list_a_few(store: EventStore) -> None:
    await _make(store, [f"same-{i:02d}" for i in range(15)])
    with pytest.raises(AmbiguousExecutionIdError) as ambiguous:
        await store.resolve_execution_id("same")
    assert len(ambiguous.value.candidates) == 10
    assert "more than 10" in str(ambiguous.value)


async def test_sqlite_create_false_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "flow.db"
    store = create_store(f"sqlite:///{path}", create=False)
    with pytest.raises(StoreUnavailableError) as refused:
        await store.open()
    assert str(path) in str(refused.value) and "does not exist" in str(refused.value)
    assert not path.parent.exists()  # not even its folder
    async with create_store(f"sqlite:///{path}") as made:  # the default creates it
        await _make(made, ["one"])
    async with create_store(f"sqlite:///{path}", create=False) as existing:
        assert (await existing.get_execution("one")) is not None


@pytest.mark.postgres
async def test_postgres_create_false_refuses_a_database_without_a_store(
        postgres_url: str) -> None:
    import sqlalchemy as sa

    store = create_store(postgres_url, create=False)
    with pytest.raises(StoreUnavailableError) as refused:
        await store.open()
    name = sa.make_url(postgres_url).database
    assert "no flow store" in str(refused.value) and str(name) in str(refused.value)
    engine = sa.create_engine(sa.make_url(postgres_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            assert not sa.inspect(conn).has_table("flow_executions")  # nothing was created
    finally:
        engine.dispose()
    async with create_store(postgres_url) as made:
        await _make(made, ["one"])
    async with create_store(postgres_url, create=False) as existing:
        assert await existing.resolve_execution_id("o") == "one"
