"""Schema migrations: a migrated database equals a fresh ``create_all``, and reopening is
a no-op. On SQLite and Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

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
    assert ran == []  # a new database is created at the latest version at once
    with inspect_db.connect() as conn:
        before = snapshot(conn)
    async with create_store(url):
        pass
    assert ran == []  # nothing ran the second time
    with inspect_db.connect() as conn:
        assert snapshot(conn) == before
    assert versions(inspect_db) == [SCHEMA_VERSION]


async def test_a_new_migration_runs_once(
    url: str, inspect_db: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with create_store(url):
        pass
    ran: list[str] = []
    nxt = SCHEMA_VERSION + 1

    def step(conn: sa.Connection) -> None:
        ran.append("next")
        conn.execute(sa.text("CREATE INDEX ix_test_status ON flow_executions (status)"))

    monkeypatch.setattr(flow_schema, "MIGRATIONS", [*flow_schema.MIGRATIONS, (nxt, step)])
    monkeypatch.setattr(flow_schema, "SCHEMA_VERSION", nxt)
    async with create_store(url):
        pass
    async with create_store(url):
        pass
    assert ran == ["next"]
    assert versions(inspect_db) == [nxt]
    with inspect_db.connect() as conn:
        names = {i["name"] for i in sa.inspect(conn).get_indexes("flow_executions")}
    assert "ix_test_status" in names


def _v1_metadata() -> sa.MetaData:
    """The schema as version 1 shipped it, frozen here to test the upgrade from it."""
    md = sa.MetaData()
    json_type = sa.JSON().with_variant(JSONB(), "postgresql")
    sa.Table(
        "flow_executions", md,
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("workflow_name", sa.Text, nullable=False),
        sa.Column("workflow_version", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double, nullable=True),
        sa.Column("tags", json_type, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=True),
        sa.Column("parent_id", sa.Text, nullable=True),
        sa.Column("last_seq", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("lease_owner", sa.Text, nullable=True),
        sa.Column("lease_expires_at", sa.Double, nullable=True),
        sa.Column("wake_at", sa.Double, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("secrets", sa.LargeBinary, nullable=True),
        sa.UniqueConstraint("idempotency_key", name="uq_flow_executions_idempotency_key"),
    )
    sa.Table(
        "flow_events", md,
        sa.Column("execution_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("type", sa.Text, nullable=False),
        sa.Column("encoding", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sqlite_with_rowid=False,
    )
    sa.Table("flow_schema_version", md, sa.Column("version", sa.Integer, nullable=False))
    return md


async def test_a_version_1_database_is_upgraded_with_its_data(
    url: str, inspect_db: sa.Engine
) -> None:
    from agentainer_flow.store.events import ExecutionStarted, StepStarted, encode_event

    md = _v1_metadata()
    with inspect_db.begin() as conn:
        md.create_all(conn)
        conn.execute(md.tables["flow_schema_version"].insert().values(version=1))
        conn.execute(md.tables["flow_executions"].insert().values(
            id="old", workflow_name="wf", workflow_version="1", status="running",
            created_at=1.0, updated_at=1.0, tags={}, last_seq=1, cancel_requested=False))
        conn.execute(md.tables["flow_events"].insert().values(
            execution_id="old", seq=1, type="ExecutionStarted", encoding=1,
            data=encode_event(ExecutionStarted(workflow_name="wf")), created_at=1.0))
    async with create_store(url) as store:
        record = await store.get_execution("old")
        assert record is not None and record.lease_token == 0
        leased = await store.acquire("old", "me", lease_seconds=30)
        assert leased is not None and leased.lease_token == 1
        await store.append("old", 2, [StepStarted(step="a")], lease_token=1)
        assert [s.seq for s in await store.load("old")] == [1, 2]
    assert versions(inspect_db) == [SCHEMA_VERSION]
    with inspect_db.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("flow_executions")}
    assert {"lease_token", "lease_renewed_at", "last_chain"} <= columns


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
