"""The storage layer: event types and codec, the ``EventStore`` interface and its backends.

``open_store(url)`` picks the backend from the URL:

- ``memory://``: in-memory, for tests
- ``sqlite:///path/to/flow.db`` (or ``sqlite+aiosqlite://``): the embedded default
- ``postgresql://user@host:port/db`` (or ``postgresql+psycopg://``): production
"""

from __future__ import annotations

from .base import (
    DEFAULT_QUEUE,
    TERMINAL_STATUSES,
    WATCH_SECONDS,
    AppendResult,
    AuditedEvent,
    EventStore,
    ExecutionRecord,
    ExecutionStatus,
    NewExecution,
    QueueConfig,
    QueueStats,
    StoredEvent,
    WorkerInfo,
)
from .errors import (
    AmbiguousExecutionIdError,
    AppendConflictError,
    ExecutionNotFoundError,
    FlowError,
    HistoryCorruptedError,
    LeaseLostError,
    StoreError,
    StoreNotFoundError,
    StoreUnavailableError,
)
from .memory import MemoryEventStore

__all__ = [
    "DEFAULT_QUEUE",
    "TERMINAL_STATUSES",
    "WATCH_SECONDS",
    "AmbiguousExecutionIdError",
    "AppendConflictError",
    "AppendResult",
    "AuditedEvent",
    "EventStore",
    "ExecutionNotFoundError",
    "ExecutionRecord",
    "ExecutionStatus",
    "FlowError",
    "HistoryCorruptedError",
    "LeaseLostError",
    "MemoryEventStore",
    "NewExecution",
    "QueueConfig",
    "QueueStats",
    "StoreError",
    "StoreNotFoundError",
    "StoreUnavailableError",
    "StoredEvent",
    "WorkerInfo",
    "create_store",
]


def create_store(url: str, **options: object) -> EventStore:
    """Build (but do not open) the backend the URL names.

    Raises ``StoreUnavailableError`` for a URL no backend understands.
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        return MemoryEventStore()
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        from .sqlite import SQLiteEventStore

        return SQLiteEventStore(url, **options)  # type: ignore[arg-type]
    if scheme in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg_async"):
        try:
            import psycopg  # noqa: F401 - the driver; missing unless the extra is installed
        except ImportError:
            raise StoreUnavailableError(
                f"the store {_safe_url(url)!r} is a PostgreSQL URL, but the PostgreSQL driver "
                "(psycopg) is not installed: pip install 'agentainer-flow[postgres]'"
            ) from None
        from .postgres import PostgresEventStore

        return PostgresEventStore(url, **options)  # type: ignore[arg-type]
    raise StoreUnavailableError(
        f"unsupported store URL {_safe_url(url)!r}: use sqlite:///path/to/flow.db, "
        "postgresql://user@host:5432/dbname or memory://"
    )


def _safe_url(url: str) -> str:
    """The URL with any password masked, for error messages."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url
