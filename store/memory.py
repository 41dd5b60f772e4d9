"""An in-memory ``EventStore``: the same contract as the SQL backends, nothing on disk.

Meant for tests (``WorkflowTestCase`` uses it) and for trying things out. Events are kept
encoded, as a real backend would, so a value that cannot round-trip fails here too.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence

from .base import (
    DEFAULT_QUEUE,
    UNSET,
    AppendResult,
    AuditedEvent,
    EventStore,
    ExecutionRecord,
    ExecutionStatus,
    NewExecution,
    QueueConfig,
    QueueStats,
    StoredEvent,
    TokenRecord,
    WorkerInfo,
    admit_to_queue,
    now,
)
from .chain import Row, audited, chain_all, verified
from .errors import AppendConflictError, LeaseLostError
from .events import Event, ExecutionStarted, encode_event, event_type_name

__all__ = ["MemoryEventStore"]


class MemoryEventStore(EventStore):
    """Executions and logs in dicts. ``url`` is ``memory://``."""

    url = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self._rows: dict[str, ExecutionRecord] = {}
        self._queues: dict[str, QueueConfig] = {}
        self._workers: dict[str, WorkerInfo] = {}
        #: each log as the SQL stores keep it: (seq, type name, encoded payload, chain)
        self._logs: dict[str, list[Row]] = {}
        self._keys: dict[str, str] = {}
        self._tokens: dict[str, TokenRecord] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _wait_external(self, timeout: float) -> None:
        # Nothing outside this process can change memory; only in-process notifications.
        import asyncio

        await asyncio.sleep(timeout)

    async def create_execution(
        self, new: NewExecution, started: ExecutionStarted
    ) -> tuple[ExecutionRecord, bool]:
        existing = self._rows.get(new.id)
        if existing is None and new.idempotency_key is not None:
            key_owner = self._keys.get(new.idempotency_key)
            existing = self._rows.get(key_owner) if key_owner else None
        if existing is not None:
            return existing, False
        t = now()
        first = (1, event_type_name(started), encode_event(started))
        (chain,) = chain_all(None, [first])
        record = new.record(t, chain)
        self._rows[new.id] = record
        self._logs[new.id] = [(*first, chain)]
        if new.idempotency_key is not None:
            self._keys[new.idempotency_key] = new.id
        self._notify(new.id)
        return record, True

    async def get_execution(self, execution_id: str) -> ExecutionRecord | None:
        return self._rows.get(execution_id)

    async def list_executions(
        self,
        *,
        workflow_name: str | None = None,
        statuses: Sequence[ExecutionStatus] | None = None,
        tags: dict[str, str] | None = None,
        parent_id: str | None = None,
        created_after: float | None = None,
        updated_after: float | None = None,
        limit: int | None = 100,
        id_prefix: str | None = None,
        created_before: float | None = None,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:
        rows = [
            r
            for r in self._rows.values()
            if (workflow_name is None or r.workflow_name == workflow_name)
            and (id_prefix is None or r.id.startswith(id_prefix))
            and (statuses is None or r.status in statuses)
            and (tags is None or all(r.tags.get(k) == v for k, v in tags.items()))
            and (parent_id is None or r.parent_id == parent_id)
            and (created_after is None or r.created_at >= created_after)
            and (updated_after is None or r.updated_at >= updated_after)
            and (created_before is None or r.created_at < created_before)
            and (before is None or (r.created_at, r.id) < before)
        ]
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return rows if limit is None else rows[:limit]

    async def request_cancel(self, execution_id: str, reason: str = "") -> bool:
        row = self._rows.get(execution_id)
        if row is None or row.status.is_terminal:
            return False
        self._rows[execution_id] = dataclasses.replace(
            row, cancel_requested=True, updated_at=now(),
            cancel_reason=row.cancel_reason if row.cancel_requested else (reason or None),
        )
        self._notify(execution_id)
        return True

    async def append(
        self,
        execution_id: str,
        expected_seq: int,
        events: Sequence[Event],
        *,
        status: ExecutionStatus | None = None,
        error: str | None = None,
        wake_at: float | None = UNSET,
        lease_owner: str | None = None,
        lease_token: int | None = None,
    ) -> AppendResult:
        row = self._rows.get(execution_id)
        if row is None:
            from .errors import ExecutionNotFoundError

            raise ExecutionNotFoundError(execution_id)
        log = self._logs[execution_id]
        if expected_seq != len(log) + 1:
            raise AppendConflictError(execution_id, expected_seq, len(log))
        t = now()
        if lease_owner is not None and (
            row.lease_owner != lease_owner or (row.lease_expires_at or 0) < t
        ):
            raise LeaseLostError(
                f"worker {lease_owner} no longer holds the lease on execution {execution_id}"
            )
        if lease_token is not None and row.lease_token != lease_token:
            raise LeaseLostError(
                f"execution {execution_id}: the lease was taken over by "
                f"{row.lease_owner or 'nobody'} (fencing token {row.lease_token}, this runner "
                f"has {lease_token}); it stops here"
            )
        encoded = [
            (expected_seq + i, event_type_name(e), encode_event(e)) for i, e in enumerate(events)
        ]
        chains = chain_all(row.last_chain, encoded)
        log.extend([(*e, c) for e, c in zip(encoded, chains, strict=True)])
        changes: dict[str, object] = {"last_seq": len(log), "updated_at": t}
        if chains:
            changes["last_chain"] = chains[-1]
        if status is not None:
            changes["status"] = status
            if status.is_terminal:
                changes["finished_at"] = t
                changes["wake_at"] = None
                # the end releases the lease: nothing is left to hold it for
                changes["lease_owner"] = None
                changes["lease_expires_at"] = None
        if error is not None:
            changes["error"] = error
        if wake_at is not UNSET and not (status is not None and status.is_terminal):
            changes["wake_at"] = wake_at
        self._rows[execution_id] = row = dataclasses.replace(row, **changes)  # type: ignore[arg-type]
        self._notify(execution_id)
        return AppendResult(len(log), row.cancel_requested)

    async def load(self, execution_id: str, after_seq: int = 0) -> list[StoredEvent]:
        rows, end = self._log(execution_id)
        if after_seq > 0:
            rows = _from_seq(rows, after_seq)
        return verified(execution_id, after_seq, rows, end)[0]

    async def audit(self, execution_id: str) -> list[AuditedEvent]:
        return audited(execution_id, *self._log(execution_id))

    def _log(self, execution_id: str) -> tuple[list[Row], tuple[int, str | None] | None]:
        row = self._rows.get(execution_id)
        return self._logs.get(execution_id, []), None if row is None else (
            row.last_seq, row.last_chain)

    async def claim(
        self, worker_id: str, *, lease_seconds: float, limit: int = 1,
        queues: Sequence[str] | None = None,
    ) -> list[ExecutionRecord]:
        t = now()
        serve = None if queues is None else {None if q == DEFAULT_QUEUE else q for q in queues}
        rows = [r for r in self._rows.values()
                if not (r.status.is_terminal or r.status is ExecutionStatus.BLOCKED)]
        busy: dict[tuple[str, str | None], int] = {}
        recent: dict[str, int] = {}
        for r in rows:
            if r.lease_live(t):
                name = r.queue or DEFAULT_QUEUE
                busy[(name, None)] = busy.get((name, None), 0) + 1
                if r.concurrency_key is not None:
                    pair = (name, r.concurrency_key)
                    busy[pair] = busy.get(pair, 0) + 1
        for name, config in self._queues.items():
            if config.rate_count is not None and config.rate_seconds:
                since = t - config.rate_seconds
                recent[name] = sum(1 for r in self._rows.values()
                                   if (r.queue or DEFAULT_QUEUE) == name
                                   and r.first_claimed_at is not None
                                   and r.first_claimed_at > since)
        claimed: list[ExecutionRecord] = []
        for row in sorted(rows, key=lambda r: (-r.priority, r.created_at, r.id)):
            if len(claimed) >= limit:
                break
            if serve is not None and row.queue not in serve:
                continue
            if row.lease_live(t) or (row.wake_at is not None and row.wake_at > t):
                continue
            name = row.queue or DEFAULT_QUEUE
            limits = self._queues.get(name)
            key = row.concurrency_key
            if key is None and limits is not None and limits.key_tag is not None:
                key = row.tags.get(limits.key_tag)  # queued before the queue had its key
            if limits is not None and not admit_to_queue(
                    limits, name, key, busy, recent, starts=row.first_claimed_at is None):
                continue
            new = dataclasses.replace(
                row, lease_owner=worker_id, lease_expires_at=t + lease_seconds,
                lease_token=row.lease_token + 1, lease_renewed_at=t,
                first_claimed_at=row.first_claimed_at or t, concurrency_key=key,
            )
            self._rows[row.id] = new
            claimed.append(dataclasses.replace(new, taken_over_from=row.lease_owner))
        return claimed

    async def next_wake(self) -> float | None:
        t = now()
        due = [r.wake_at for r in self._rows.values()
               if not r.status.is_terminal and r.status is not ExecutionStatus.BLOCKED
               and r.wake_at is not None and r.wake_at > t and not r.lease_live(t)]
        return min(due) if due else None

    async def heartbeat(self, worker: WorkerInfo, *, gone: bool = False) -> None:
        if gone:
            self._workers.pop(worker.id, None)
        else:
            self._workers[worker.id] = dataclasses.replace(worker, heartbeat_at=now())

    async def list_workers(self) -> list[WorkerInfo]:
        return sorted(self._workers.values(), key=lambda w: -w.heartbeat_at)

    async def set_queue(self, config: QueueConfig) -> None:
        self._queues[config.name] = config
        if config.key_tag is not None:  # its executions without a key take their tag's
            for row in list(self._rows.values()):
                if ((row.queue or DEFAULT_QUEUE) == config.name and row.concurrency_key is None
                        and not row.status.is_terminal and config.key_tag in row.tags):
                    self._rows[row.id] = dataclasses.replace(
                        row, concurrency_key=row.tags[config.key_tag])

    async def list_queues(self) -> list[QueueStats]:
        t = now()
        found = dict(self._queues)
        counts: dict[str, dict[str, int]] = {}
        for r in self._rows.values():
            if r.status.is_terminal or r.parent_id is not None:
                continue
            name = r.queue or DEFAULT_QUEUE
            found.setdefault(name, QueueConfig(name=name))
            c = counts.setdefault(name, {"pending": 0, "running": 0, "sleeping": 0,
                                         "blocked": 0})
            if r.lease_live(t):
                c["running"] += 1
            elif r.status is ExecutionStatus.BLOCKED:
                c["blocked"] += 1
            elif r.wake_at is not None and r.wake_at > t:
                c["sleeping"] += 1
            else:
                c["pending"] += 1
        return [QueueStats(config=found[n], **counts.get(n, {})) for n in sorted(found)]

    async def acquire(
        self,
        execution_id: str,
        owner: str,
        *,
        lease_seconds: float,
        takeover_from: str | None = None,
    ) -> ExecutionRecord | None:
        row = self._rows.get(execution_id)
        t = now()
        if row is None or row.status.is_terminal:
            return None
        if row.lease_live(t) and row.lease_owner not in (owner, takeover_from):
            return None
        new = dataclasses.replace(
            row, lease_owner=owner, lease_expires_at=t + lease_seconds,
            lease_token=row.lease_token + 1, lease_renewed_at=t,
        )
        self._rows[execution_id] = new
        return new

    async def renew_lease(
        self, worker_id: str, execution_ids: Sequence[str], lease_seconds: float
    ) -> list[str]:
        t = now()
        held = []
        for eid in execution_ids:
            row = self._rows.get(eid)
            if row and row.lease_owner == worker_id:  # expired but not taken: still its
                self._rows[eid] = dataclasses.replace(
                    row, lease_expires_at=t + lease_seconds, lease_renewed_at=t
                )
                held.append(eid)
        return held

    async def release(self, worker_id: str, execution_id: str) -> None:
        row = self._rows.get(execution_id)
        if row and row.lease_owner == worker_id:
            self._rows[execution_id] = dataclasses.replace(
                row, lease_owner=None, lease_expires_at=None
            )

    async def expire_leases(self, owner: str) -> list[str]:
        t = now()
        expired = [row.id for row in self._rows.values()
                   if row.lease_owner == owner and not row.status.is_terminal
                   and row.lease_live(t)]
        for execution_id in expired:
            self._rows[execution_id] = dataclasses.replace(
                self._rows[execution_id], lease_expires_at=t - 1)
            self._notify(execution_id)
        return expired

    async def wake(self, execution_id: str) -> bool:
        row = self._rows.get(execution_id)
        t = now()
        if row is None or row.status.is_terminal or row.wake_at is None or row.wake_at <= t:
            return False
        self._rows[execution_id] = dataclasses.replace(row, wake_at=t)
        self._notify(execution_id)
        return True

    async def due_timers(self, now: float) -> list[tuple[str, float]]:
        return sorted(
            (r.id, r.wake_at)
            for r in self._rows.values()
            if r.wake_at is not None and r.wake_at <= now and not r.status.is_terminal
        )

    # tokens -----------------------------------------------------------------------------
    async def create_token(self, token: TokenRecord) -> bool:
        if any(t.name == token.name and not t.revoked for t in self._tokens.values()):
            return False
        self._tokens[token.id] = token
        return True

    async def get_token(self, token_hash: str) -> TokenRecord | None:
        return next((t for t in self._tokens.values() if t.hash == token_hash), None)

    async def list_tokens(self) -> list[TokenRecord]:
        return sorted(self._tokens.values(), key=lambda t: (-t.created_at, t.id))

    async def revoke_token(self, token_id: str) -> bool:
        token = self._tokens.get(token_id)
        if token is None or token.revoked:
            return False
        self._tokens[token_id] = dataclasses.replace(token, revoked_at=now())
        return True

    async def touch_token(self, token_id: str, t: float) -> None:
        token = self._tokens.get(token_id)
        if token is not None:
            self._tokens[token_id] = dataclasses.replace(token, last_used_at=t)
    # end of tokens ----------------------------------------------------------------------


def _from_seq(rows: list[Row], seq: int) -> list[Row]:
    """The rows from ``seq`` on, with the last chain up to it (as the SQL stores read them)."""
    start = bisect.bisect_left(rows, seq, key=lambda r: r[0])
    tail = rows[start:]
    if tail and tail[0][0] == seq and tail[0][3] is None:
        chain = next((r[3] for r in reversed(rows[:start]) if r[3] is not None), None)
        tail[0] = (*tail[0][:3], chain)
    return tail
