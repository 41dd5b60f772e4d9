"""The store's tokens, on every backend: created once per live name, found by hash,
listed, revoked, touched; and the schema version that adds them upgrades a version-4
database to the same schema a new one gets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from agentainer_flow._server.auth import Authenticator, create_token, find_token, hash_token
from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.store import EventStore, create_store
from agentainer_flow.store import schema as flow_schema
from agentainer_flow.store.base import TokenRecord
from tests.store.test_migrations import snapshot, sync_engine, versions


def record(name: str, token_hash: str = "", *, id: str = "") -> TokenRecord:
    return TokenRecord(id=id or f"tok_{name}", name=name, scope="read",
                       hash=token_hash or f"hash-{name}", prefix="afl_abcdef",
                       created_at=time.time())


async def test_a_live_name_is_taken_once_and_free_again_after_revoking(
        store: EventStore) -> None:
    assert await store.create_token(record("ci"))
    assert not await store.create_token(record("ci", "other-hash", id="tok_2"))
    assert [t.id for t in await store.list_tokens()] == ["tok_ci"]
    assert await store.revoke_token("tok_ci")
    assert not await store.revoke_token("tok_ci")  # revoked already
    assert not await store.revoke_token("tok_nope")
    assert await store.create_token(record("ci", "other-hash", id="tok_2"))
    listed = await store.list_tokens()
    assert sorted((t.id, t.revoked) for t in listed) == [("tok_2", False), ("tok_ci", True)]


async def test_tokens_are_found_by_hash_and_touched(store: EventStore) -> None:
    token, made = await create_token(store, "svc", "write")
    assert made.hash == hash_token(token) and token.startswith(made.prefix)
    found = await store.get_token(hash_token(token))
    assert found is not None and found.id == made.id and found.scope == "write"
    assert found.last_used_at is None and found.revoked_at is None
    assert await store.get_token(hash_token(token + "x")) is None
    await store.touch_token(made.id, 1234.5)
    touched = await store.get_token(made.hash)
    assert touched is not None and touched.last_used_at == 1234.5


async def test_the_authenticator_refuses_revoked_and_unknown_tokens(store: EventStore) -> None:
    token, made = await create_token(store, "svc", "admin")
    check = Authenticator(store)
    checked = await check.check(token)
    assert checked is not None and checked.id == made.id
    stored = await store.get_token(made.hash)  # the first use was recorded
    assert stored is not None and stored.last_used_at is not None
    assert await check.check(None) is None
    assert await check.check("afl_" + "x" * 43) is None
    assert await check.check(token[4:]) is None  # not even shaped like a token
    assert (await find_token(store, "svc")).id == made.id
    assert (await find_token(store, made.id)).name == "svc"
    await store.revoke_token(made.id)
    assert await check.check(token) is None
    with pytest.raises(ConfigurationError, match="no live token"):
        await find_token(store, "svc")


async def test_concurrent_creates_of_one_name_make_one_token(store: EventStore) -> None:
    made = await asyncio.gather(*(store.create_token(record("same", f"h{i}", id=f"tok_{i}"))
                                  for i in range(8)))
    assert made.count(True) == 1
    assert len(await store.list_tokens()) == 1


async def test_bad_scopes_and_names_are_refused(store: EventStore) -> None:
    with pytest.raises(ConfigurationError, match="unknown token scope 'root'"):
        await create_token(store, "x", "root")
    with pytest.raises(ConfigurationError, match="needs a name"):
        await create_token(store, "  ")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


async def test_a_version_4_database_gets_the_tokens_table(url: str, tmp_path: Path) -> None:
    engine = sync_engine(url)
    try:
        with engine.begin() as conn:  # the schema as version 4 left it
            flow_schema.metadata.create_all(
                conn, tables=[t for t in flow_schema.metadata.sorted_tables
                              if t.name != "flow_tokens"])
            conn.execute(sa.insert(flow_schema.schema_version).values(version=4))
        async with create_store(url) as store:
            assert await store.create_token(record("after-upgrade"))
        assert versions(engine) == [flow_schema.SCHEMA_VERSION]
        with engine.connect() as conn:
            upgraded = snapshot(conn)
        if engine.dialect.name == "sqlite":
            fresh_engine = sync_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
            try:
                with fresh_engine.begin() as conn:
                    flow_schema.metadata.create_all(conn)
                with fresh_engine.connect() as conn:
                    fresh = snapshot(conn)
            finally:
                fresh_engine.dispose()
        else:  # another schema of the same database: index names are per schema
            with engine.begin() as conn:
                conn.execute(sa.text("CREATE SCHEMA fresh"))
                flow_schema.metadata.create_all(
                    conn.execution_options(schema_translate_map={None: "fresh"}))
            with engine.connect() as conn:
                fresh = snapshot(conn, schema="fresh")
    finally:
        engine.dispose()
    assert "flow_tokens" in upgraded
    assert upgraded == fresh
