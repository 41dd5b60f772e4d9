"""Schema migrations: a migrated database equals a fresh ``create_all``, and reopening is
a no-op. On SQLite and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agentainer_flow.store import StoreError, create_store
from agentainer_flow.store import schema as flow_schema
from agentainer_flow.store.schema import SCHEMA_VERSION, metadata, schema_version


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def sync_engine(url: str) -> sa.Engine:
    """A plain synchronous engine on the store's database, for inspecting it."""
    parsed = sa.make_url(url)
    driver = "sqlite+pysqlite" if parsed.drivername.startswith("sqlite") else "postgresql+psycopg"
    return sa.create_engine(parsed.set(drivername=driver))


@pytest.fixture
def inspect_db(url: str) -> Iterator[sa.Engine]:
    engine = sync_engine(url)
    yield engine
    engine.dispose()


def snapshot(conn: sa.Connection, schema: str | None = None) -> dict[str, Any]:
    """Tables, columns, keys and indexes as reflected, comparable across databases."""
    insp = sa.inspect(conn)
    tables: dict[str, Any] = {}
    for table in sorted(insp.get_table_names(schema=schema)):
        tables[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"])
                for c in insp.get_columns(table, schema=schema)
            ],
            "primary_key": insp.get_pk_constraint(table, schema=schema)["constrained_columns"],
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in insp.get_unique_constraints(table, schema=schema)
            ),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(str(c) for c in i["column_names"]),
                    i["unique"],
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in insp.get_indexes(table, schema=schema)
            ),
        }
    if conn.dialect.name == "sqlite":  # what reflection does not show (WITHOUT ROWID...)
        tables["sqlite_master"] = sorted(
            (row.type, row.name, " ".join(str(row.sql).split()))
            for row in conn.execute(
                sa.text("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL")
            )
        )
    return tables


def versions(engine: sa.Engine) -> list[int]:
    with engine.connect() as conn:
        return [row.version for row in conn.execute(sa.select(schema_version.c.version))]


async def test_migrated_schema_equals_fresh_create_all(
    url: str, inspect_db: sa.Engine, tmp_path: Path
) -> None:
    async with create_store(url):
        pass
    with inspect_db.connect() as conn:
        migrated = snapshot(conn)
    if inspect_db.dialect.name == "sqlite":
        fresh_engine = sync_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
        try:
            with fresh_engine.begin() as conn:
                metadata.create_all(conn)
            with fresh_engine.connect() as conn:
                fresh = snapshot(conn)
        finally:
            fresh_engine.dispose()
    else:  # the same database, another schema: index names are per schema
        with inspect_db.begin() as conn:
            conn.execute(sa.text("CREATE SCHEMA fresh"))
            metadata.create_all(conn.execution_options(schema_translate_map={None: "fresh"}))
        with inspect_db.connect() as conn:
            fresh = snapshot(conn, schema="fresh")
    assert set(migrated) >= {"flow_executions", "flow_events", "flow_schema_version"}
    assert migrated == fresh
    assert versions(inspect_db) == [SCHEMA_VERSION]


def _count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record each migration step that runs."""
    ran: list[int] = []

    def counting(version: int, step: flow_schema.Migration) -> flow_schema.Migration:
        def run(conn: sa.Connection) -> None:
            ran.append(version)
            step(conn)

        return run

    monkeypatch.setattr(
        flow_schema, "MIGRATIONS", [(v, counting(v, s)) for v, s in flow_schema.MIGRATIONS]
    )
    return ran


async def test_opening_twice_is_a_noop(
    url: str, inspect_db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran = _count_steps(monkeypatch)
    async with create_store(url):
        pass
    assert ran == [v for v, _ in flow_schema.MIGRATIONS]
    with inspect_db.connect() as conn:
        before = snapshot(conn)
    async with create_store(url):
        pass
    assert ran == [v for v, _ in flow_schema.MIGRATIONS]  # nothing ran the second time
    with inspect_db.connect() as conn:
        assert snapshot(conn) == before
    assert versions(inspect_db) == [SCHEMA_VERSION]


async def test_a_new_migration_runs_once(
    url: str, inspect_db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with create_store(url):
        pass
    ran: list[str] = []

    def v2(conn: sa.Connection) -> None:
        ran.append("v2")
        conn.execute(sa.text("CREATE INDEX ix_test_status ON flow_executions (status)"))

    monkeypatch.setattr(flow_schema, "MIGRATIONS", [*flow_schema.MIGRATIONS, (2, v2)])
    monkeypatch.setattr(flow_schema, "SCHEMA_VERSION", 2)
    async with create_store(url):
        pass
    async with create_store(url):
        pass
    assert ran == ["v2"]
    assert versions(inspect_db) == [2]
    with inspect_db.connect() as conn:
        names = {i["name"] for i in sa.inspect(conn).get_indexes("flow_executions")}
    assert "ix_test_status" in names


async def test_a_newer_database_is_refused(url: str, inspect_db: sa.Engine) -> None:
    async with create_store(url):
        pass
    with inspect_db.begin() as conn:
        conn.execute(sa.update(schema_version).values(version=SCHEMA_VERSION + 1))
    store = create_store(url)
    with pytest.raises(StoreError, match="upgrade agentainer-flow"):
        await store.open()
    await store.close()


async def test_concurrent_opens_migrate_once(url: str, inspect_db: sa.Engine) -> None:
    stores = [create_store(url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.open() for s in stores))
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert versions(inspect_db) == [SCHEMA_VERSION]
