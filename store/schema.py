"""The SQL schema, declared once in SQLAlchemy Core, and its versioned migrations.

Both SQL backends create and query these tables; dialect differences are types
(``JSONB``/``BYTEA`` on Postgres) and nothing else. Times are unix seconds as floats, the
same clock the in-memory backend uses, so the backends agree to the microsecond.

Migrations are a list of ``(version, step)`` run in order on ``open()`` for every version
above the one recorded in ``flow_schema_version``. A new database is created at the latest
version at once (``metadata.create_all``); the steps upgrade older databases. Each step is an
expand/contract step (add a nullable or defaulted column, backfill, drop in a later release),
tested by upgrading a frozen copy of the older schema (``tests/store/test_migrations.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

from .errors import StoreError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "events",
    "executions",
    "metadata",
    "migrate",
    "queues",
    "schema_version",
    "tokens",
    "watches",
    "workers",
]

metadata = sa.MetaData()

_Json = sa.JSON().with_variant(JSONB(), "postgresql")
_Time: sa.Double[float] = sa.Double()

executions = sa.Table(
    "flow_executions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("workflow_name", sa.Text, nullable=False),
    sa.Column("workflow_version", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("created_at", _Time, nullable=False),
    sa.Column("updated_at", _Time, nullable=False),
    sa.Column("finished_at", _Time, nullable=True),
    sa.Column("tags", _Json, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=True),
    sa.Column("parent_id", sa.Text, nullable=True),
    sa.Column("last_seq", sa.Integer, nullable=False),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("lease_owner", sa.Text, nullable=True),
    sa.Column("lease_expires_at", _Time, nullable=True),
    sa.Column("wake_at", _Time, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("secrets", sa.LargeBinary, nullable=True),
    # version 2: fenced leases and chained history checksums
    sa.Column("lease_token", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("lease_renewed_at", _Time, nullable=True),
    sa.Column("last_chain", sa.Text, nullable=True),
    # version 3: queues (``None``: run where it was started, or by any worker)
    sa.Column("queue", sa.Text, nullable=True),
    sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")),
    sa.Column("concurrency_key", sa.Text, nullable=True),
    sa.Column("first_claimed_at", _Time, nullable=True),
    # version 6: why a cancel was asked for, for the process that runs the execution
    sa.Column("cancel_reason", sa.Text, nullable=True),
    sa.UniqueConstraint("idempotency_key", name="uq_flow_executions_idempotency_key"),
)

# "Unfinished" is ``finished_at IS NULL``: appending a terminal status is the only way to
# finish and always sets ``finished_at``. Unlike ``status IN (...)`` it needs no parameter,
# so both planners can match a query's predicate to the partial indexes below.
_unfinished = executions.c.finished_at.is_(None)

sa.Index("ix_flow_executions_workflow_created", executions.c.workflow_name, executions.c.created_at)
sa.Index("ix_flow_executions_created", executions.c.created_at)
sa.Index("ix_flow_executions_parent", executions.c.parent_id)
# Claim and due_timers look only at unfinished executions: partial indexes keep the finished
# ones (nearly all, in a long-lived store) out of their way. Claim walks them oldest first,
# due_timers by wake-up time.
sa.Index(
    "ix_flow_executions_unfinished_created",
    executions.c.created_at,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)
sa.Index(
    "ix_flow_executions_unfinished_wake",
    executions.c.wake_at,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)

# A worker walks the unfinished executions (of its queue, or of every queue) most urgent
# first, in the index's order: no sort of the whole backlog per claim.
sa.Index(
    "ix_flow_executions_unfinished_queue",
    executions.c.queue,
    executions.c.priority.desc(),
    executions.c.created_at,
    executions.c.id,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)
sa.Index(
    "ix_flow_executions_unfinished_urgent",
    executions.c.priority.desc(),
    executions.c.created_at,
    executions.c.id,
    sqlite_where=_unfinished,
    postgresql_where=_unfinished,
)

#: version 3: queue limits, enforced by ``claim`` across every worker
queues = sa.Table(
    "flow_queues",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("concurrency", sa.Integer, nullable=True),
    sa.Column("rate_count", sa.Integer, nullable=True),
    sa.Column("rate_seconds", _Time, nullable=True),
    sa.Column("key_tag", sa.Text, nullable=True),
    sa.Column("key_concurrency", sa.Integer, nullable=True),
    sa.Column("updated_at", _Time, nullable=False),
)

#: version 3: live workers, by heartbeat (``flow workers``)
workers = sa.Table(
    "flow_workers",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # the lease owner id of its claims
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("host", sa.Text, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("queues", sa.Text, nullable=False),  # comma-separated; "" = every queue
    sa.Column("concurrency", sa.Integer, nullable=False),
    sa.Column("held", sa.Integer, nullable=False),
    sa.Column("started_at", _Time, nullable=False),
    sa.Column("heartbeat_at", _Time, nullable=False),
)

#: version 4: who follows which execution's appends live (``key``: an execution id, or
#: ``"*"`` for every execution), until when. Postgres announces an append with NOTIFY only
#: when it changes status or timer, or when a row here asks for it: a NOTIFY serialises the
#: committing transactions on the server's notification queue, so it is not paid per step.
watches = sa.Table(
    "flow_watches",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("until", _Time, nullable=False),
)

# tokens --------------------------------------------------------------------------------
#: version 5: API tokens of ``flow server``. Only the SHA-256 of a token is kept (``hash``,
#: hex); ``prefix`` is its first characters, for people to tell tokens apart in lists. A
#: name belongs to one live token at a time (revoked ones keep theirs, for the record).
tokens = sa.Table(
    "flow_tokens",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("prefix", sa.Text, nullable=False),
    sa.Column("created_at", _Time, nullable=False),
    sa.Column("last_used_at", _Time, nullable=True),
    sa.Column("revoked_at", _Time, nullable=True),
    sa.UniqueConstraint("hash", name="uq_flow_tokens_hash"),
)
_live_token = tokens.c.revoked_at.is_(None)
sa.Index("ix_flow_tokens_live_name", tokens.c.name, unique=True,
         sqlite_where=_live_token, postgresql_where=_live_token)
# end of tokens -------------------------------------------------------------------------

events = sa.Table(
    "flow_events",
    metadata,
    sa.Column("execution_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("type", sa.Text, nullable=False),
    sa.Column("encoding", sa.Integer, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("created_at", _Time, nullable=False),
    # version 2: checksum chained over the previous event's (see ``store.chain``)
    sa.Column("chain", sa.Text, nullable=True),
    # Clustered on (execution_id, seq) on SQLite: one B-tree to write per append instead of a
    # table plus its primary-key index, and a history loads as one contiguous range.
    sqlite_with_rowid=False,
)

schema_version = sa.Table(
    "flow_schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

Migration = Callable[[sa.Connection], None]


def _v1_create_all(conn: sa.Connection) -> None:
    """Version 1 (for databases created before version 2; a new one gets ``create_all``)."""
    metadata.create_all(conn)


def _v2_fencing_and_chain(conn: sa.Connection) -> None:
    """Version 2 (expand only): lease fencing tokens, lease renewal time, history checksums.

    Columns are added nullable or with a default, so a running version-1 process keeps
    working until it is upgraded; events written before have no checksum and are verified
    from the first event that has one.
    """
    insp = sa.inspect(conn)
    have = {c["name"] for c in insp.get_columns(executions.name)}
    added = [
        ("lease_token", "INTEGER DEFAULT 0 NOT NULL"),
        ("lease_renewed_at", "DOUBLE PRECISION" if conn.dialect.name == "postgresql" else "FLOAT"),
        ("last_chain", "TEXT"),
    ]
    for name, ddl in added:
        if name not in have:
            conn.execute(sa.text(f"ALTER TABLE {executions.name} ADD COLUMN {name} {ddl}"))
    if "chain" not in {c["name"] for c in insp.get_columns(events.name)}:
        conn.execute(sa.text(f"ALTER TABLE {events.name} ADD COLUMN chain TEXT"))


def _v3_queues(conn: sa.Connection) -> None:
    """Version 3 (expand only): executions get a queue, a priority, a concurrency key and
    their first claim time; queue limits get a table."""
    insp = sa.inspect(conn)
    have = {c["name"] for c in insp.get_columns(executions.name)}
    real = "DOUBLE PRECISION" if conn.dialect.name == "postgresql" else "FLOAT"
    added = [("queue", "TEXT"), ("priority", "INTEGER DEFAULT 0 NOT NULL"),
             ("concurrency_key", "TEXT"), ("first_claimed_at", real)]
    for name, ddl in added:
        if name not in have:
            conn.execute(sa.text(f"ALTER TABLE {executions.name} ADD COLUMN {name} {ddl}"))
    queues.create(conn, checkfirst=True)
    workers.create(conn, checkfirst=True)
    for index in executions.indexes:
        if index.name in ("ix_flow_executions_unfinished_queue",
                          "ix_flow_executions_unfinished_urgent"):
            index.create(conn, checkfirst=True)


def _v4_watches(conn: sa.Connection) -> None:
    """Version 4 (expand only): the table of live followers. A version-3 process keeps
    notifying on every append, which a version-4 reader only ignores."""
    watches.create(conn, checkfirst=True)


def _v5_tokens(conn: sa.Connection) -> None:
    """Version 5 (expand only): the API tokens of ``flow server``."""
    tokens.create(conn, checkfirst=True)


def _v6_cancel_reason(conn: sa.Connection) -> None:
    """Version 6 (expand only): the reason given with a cancel, so that a worker that
    notices the cancel in the row records the caller's reason, not a generic one. A
    version-5 process leaves it empty; a version-6 one then records ``requested``."""
    have = {c["name"] for c in sa.inspect(conn).get_columns(executions.name)}
    if "cancel_reason" not in have:
        conn.execute(sa.text(f"ALTER TABLE {executions.name} ADD COLUMN cancel_reason TEXT"))


#: (version, step) in ascending order; each step runs inside the migrating transaction.
#: A new database is created at the latest version directly (``metadata.create_all``).
MIGRATIONS: list[tuple[int, Migration]] = [
    (1, _v1_create_all),
    (2, _v2_fencing_and_chain),
    (3, _v3_queues),
    (4, _v4_watches),
    (5, _v5_tokens),
    (6, _v6_cancel_reason),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn: sa.Connection) -> tuple[int, int]:
    """Run the migrations the database lacks; returns (version before, version after).

    The caller runs this inside one transaction that serialises concurrent openers (SQLite's
    ``BEGIN IMMEDIATE``, a Postgres advisory lock), so a half-migrated schema never commits.
    """
    if sa.inspect(conn).has_table(schema_version.name):
        current = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    else:
        current = 0
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {current}, newer than this agentainer-flow "
            f"understands ({SCHEMA_VERSION}); upgrade agentainer-flow to open it"
        )
    if current == 0 and not sa.inspect(conn).has_table(executions.name):
        metadata.create_all(conn)  # a new database: the latest schema at once
        conn.execute(sa.delete(schema_version))
        conn.execute(sa.insert(schema_version).values(version=SCHEMA_VERSION))
        return current, SCHEMA_VERSION
    for version, step in MIGRATIONS:
        if version > current:
            step(conn)
            conn.execute(sa.delete(schema_version))
            conn.execute(sa.insert(schema_version).values(version=version))
    return current, SCHEMA_VERSION
