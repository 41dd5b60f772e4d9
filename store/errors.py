"""Errors raised by the store layer.

The root of every agentainer-flow error, ``FlowError``, lives here because the store is the
lowest layer: the engine and the SDK derive their errors from it.

    FlowError
    ├── StoreError                  the store could not do what was asked
    │   ├── StoreUnavailableError   the database cannot be reached (URL, server down)
    │   │   └── StoreNotFoundError  a store opened without creating it is not there
    │   ├── AppendConflictError     another writer already extended this history
    │   ├── LeaseLostError          this worker's lease on the execution expired
    │   ├── ExecutionNotFoundError  no execution with that id
    │   │   └── AmbiguousExecutionIdError  an id prefix several executions share
    │   └── HistoryCorruptedError   a stored history is damaged; it is never replayed
    └── (engine and SDK errors, see ``agentainer_flow.errors``)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AmbiguousExecutionIdError",
    "AppendConflictError",
    "ExecutionNotFoundError",
    "FlowError",
    "HistoryCorruptedError",
    "LeaseLostError",
    "StoreError",
    "StoreNotFoundError",
    "StoreUnavailableError",
]


class FlowError(Exception):
    """Base class of every error agentainer-flow raises on purpose."""

    code: str = "flow_error"


class StoreError(FlowError):
    """The event store could not complete an operation."""

    code = "store_error"


class StoreUnavailableError(StoreError):
    """The store URL is malformed or its database cannot be reached."""

    code = "store_unavailable"


class AppendConflictError(StoreError):
    """An append's expected sequence number was already taken by another writer."""

    code = "append_conflict"

    def __init__(self, execution_id: str, expected_seq: int, actual_last_seq: int) -> None:
        self.execution_id = execution_id
        self.expected_seq = expected_seq
        self.actual_last_seq = actual_last_seq
        super().__init__(
            f"execution {execution_id}: tried to append at seq {expected_seq} but the history "
            f"already ends at seq {actual_last_seq}; another worker is running this execution"
        )


class LeaseLostError(StoreError):
    """The worker's lease on an execution expired or was taken by another worker."""

    code = "lease_lost"


class ExecutionNotFoundError(StoreError):
    """No execution with the given id exists in the store."""

    code = "execution_not_found"

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"no execution with id {execution_id!r} in this store")


class HistoryCorruptedError(StoreError):
    """An execution's stored history is damaged (a gap, a changed or undecodable event, a cut
    tail, an event that cannot follow the ones before it); it is never replayed."""

    code = "history_corrupted"

    def __init__(self, execution_id: str, seq: int, problem: str) -> None:
        self.execution_id = execution_id
        self.seq = seq
        self.problem = problem
        super().__init__(
            f"execution {execution_id}: history damaged at seq {seq}: {problem}; it will not "
            f"be replayed (restore the database from a backup, or inspect it with "
            f"flow history {execution_id})"
        )


class StoreNotFoundError(StoreUnavailableError):
    """A store opened with ``create=False`` is not there: no SQLite file at the path, or
    no flow tables in the PostgreSQL database."""

    code = "store_not_found"


class AmbiguousExecutionIdError(ExecutionNotFoundError):
    """An id prefix that several executions' ids start with (a kind of "not found": no one
    execution is named). ``candidates`` lists some of them, newest first."""

    code = "ambiguous_execution_id"

    def __init__(self, prefix: str, candidates: Sequence[str], *, more: bool = False) -> None:
        self.execution_id = prefix
        self.candidates = tuple(candidates)
        listed = ", ".join(self.candidates) + (", ..." if more else "")
        count = f"more than {len(self.candidates)}" if more else str(len(self.candidates))
        StoreError.__init__(
            self,
            f"the id prefix {prefix!r} matches {count} executions ({listed}); "
            "give more characters of the id",
        )
