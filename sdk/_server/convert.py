"""Between the store's records and the API's bodies: executions, events, step summaries,
and value trees (plain JSON for people, typed trees for Python clients).

Values sent to the server are value trees (``engine.values``): plain JSON is one. A tree may
name Python types (a dataclass, a pydantic model...); the server rebuilds only types of
modules it has already imported, and only of the kind the tree says, so a request can
never make it import a module or call an arbitrary class.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from agentainer_flow.engine import values
from agentainer_flow.engine.errors import SerializationError
from agentainer_flow.store import ExecutionRecord, ExecutionStatus, StoredEvent
from agentainer_flow.store.events import (
    ExecutionCancelled,
    ExecutionCompleted,
    ExecutionFailed,
    StepCompleted,
    StepFailed,
    StepSkipped,
    StepStarted,
)

from .._events import ExecutionEvent
from .schemas import EventOut, ExecutionOut, StepSummary

__all__ = [
    "blocked_on",
    "event_out",
    "execution_out",
    "load_value",
    "plain",
    "step_summaries",
    "to_datetime",
    "to_unix",
]

_TAG = "__flow__"
_TYPED = {"enum", "pydantic", "struct", "dataclass"}


def to_datetime(t: float | None) -> dt.datetime | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC)


def to_unix(when: dt.datetime | None) -> float | None:
    """A datetime as unix seconds (a naive one is taken as UTC)."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


# value trees -----------------------------------------------------------------------------
def plain(tree: Any) -> Any:
    """A value tree as plain JSON: envelopes become the data they hold (tuples and sets
    lists, datetimes ISO text, bytes base64 text, models their fields)."""
    if isinstance(tree, list):
        return [plain(x) for x in tree]
    if not isinstance(tree, dict):
        return tree
    kind = tree.get(_TAG)
    if kind is None:
        return {k: plain(v) for k, v in tree.items()}
    if kind in ("tuple", "set", "frozenset"):
        return [plain(x) for x in tree.get("items", [])]
    if kind == "dict":
        out: dict[str, Any] = {}
        for k, v in tree.get("items", []):
            key = plain(k)
            out[key if isinstance(key, str) else json.dumps(key)] = plain(v)
        return out
    if kind == "int":
        return int(tree["v"]) if "v" in tree else tree.get("hex")
    if kind == "timedelta":
        return tree.get("v")
    if kind == "enum":
        return plain(tree.get("v"))
    if kind in ("pydantic", "struct"):
        return plain(tree["tree"]) if "tree" in tree else tree.get("data")
    if kind == "dataclass":
        return {k: plain(v) for k, v in (tree.get("data") or {}).items()}
    return tree.get("v")  # float (nan, inf), bytes, datetime, date, time, uuid, decimal


def _known_type(name: Any, kind: str, where: str) -> None:
    """Refuse a type a request names unless it is loaded here already and of ``kind``."""
    module_name, _, qualname = str(name).partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split(".") if obj is not None and qualname else ():
        obj = getattr(obj, part, None)
    fits = isinstance(obj, type) and (
        (kind == "enum" and issubclass(obj, enum.Enum))
        or (kind == "pydantic" and hasattr(obj, "model_validate") and hasattr(obj, "model_fields"))
        or (kind == "struct" and issubclass(obj, msgspec.Struct))
        or (kind == "dataclass" and dataclasses.is_dataclass(obj)))
    if not fits:
        raise SerializationError(
            f"{where}: names the type {name!r} as a {kind}, which this server has not loaded "
            "as one; the server rebuilds only types of the workflow code it was started with "
            "(flow server -m)")


def _check(tree: Any, where: str, depth: int = 0) -> None:
    if depth > values.MAX_DEPTH + 2:
        raise SerializationError(f"{where}: nested more than {values.MAX_DEPTH} levels deep")
    if isinstance(tree, list):
        for x in tree:
            _check(x, where, depth + 1)
    elif isinstance(tree, dict):
        kind = tree.get(_TAG)
        if kind in _TYPED:
            _known_type(tree.get("type"), str(kind), where)
        for v in tree.values():
            _check(v, where, depth + 1)


def load_value(tree: Any, where: str) -> Any:
    """The Python value of a tree a client sent (see the module's docstring).

    Raises ``SerializationError`` naming ``where`` for a tree that is not one."""
    _check(tree, where)
    try:
        return values.load(tree)
    except SerializationError as exc:
        cause = exc.__cause__
        if cause is None or isinstance(cause, ImportError | AttributeError):
            raise  # e.g. a type that is not loaded: the error says which
        raise SerializationError(f"{where}: not a value tree ({type(cause).__name__}: "
                                 f"{cause})") from None
    except Exception as exc:
        raise SerializationError(f"{where}: not a value tree ({type(exc).__name__}: {exc})") \
            from None


# executions ------------------------------------------------------------------------------
def blocked_on(record: ExecutionRecord) -> str | None:
    """The secret a blocked execution that nobody runs waits for."""
    if record.status is not ExecutionStatus.BLOCKED or record.lease_live(time.time()):
        return None
    text = record.error or ""
    start = text.find("secret '")
    end = text.find("'", start + len("secret '")) if start >= 0 else -1
    return text[start + len("secret '"):end] if end > start else "?"


def execution_out(record: ExecutionRecord,
                  history: Sequence[StoredEvent] | None = None) -> ExecutionOut:
    """An execution as the API shows it; with its ``history``, also how it ended and the
    summary of its steps."""
    out = ExecutionOut(
        id=record.id, workflow=record.workflow_name, version=record.workflow_version,
        status=record.status.value,
        created_at=dt.datetime.fromtimestamp(record.created_at, dt.UTC),
        updated_at=dt.datetime.fromtimestamp(record.updated_at, dt.UTC),
        finished_at=to_datetime(record.finished_at), duration=record.duration,
        tags=record.tags, idempotency_key=record.idempotency_key, parent_id=record.parent_id,
        queue=record.queue, priority=record.priority, cancel_requested=record.cancel_requested,
        cancel_reason=record.cancel_reason,
        events=record.last_seq, error=record.error, lease_owner=record.lease_owner,
        lease_expires_at=to_datetime(record.lease_expires_at),
        waiting_for_secret=blocked_on(record))
    if history is None:
        return out
    out.steps = step_summaries(history)
    last = history[-1].event if history else None
    if isinstance(last, ExecutionCompleted):
        out.result_tree = last.result
        out.result = plain(last.result)
    elif isinstance(last, ExecutionFailed):
        out.error_type = last.error_type
        out.failed_step = last.step
        out.error = last.error
    elif isinstance(last, ExecutionCancelled):
        out.error_type = "Cancelled"
        out.error = "cancelled" + (f": {last.reason}" if last.reason else "")
    return out


def event_out(stored: StoredEvent) -> EventOut:
    e = ExecutionEvent.from_stored(stored)
    return EventOut(execution_id=e.execution_id, seq=e.seq, type=e.type,
                    timestamp=e.timestamp, message=e.message, step=e.step,
                    instance=e.instance, attempt=e.attempt, details=e.details)


@dataclasses.dataclass
class _Step:
    instances: int = 1
    done: set[int] = dataclasses.field(default_factory=set)
    failed: set[int] = dataclasses.field(default_factory=set)
    attempts: int = 0
    retrying: bool = False
    skipped: bool = False
    started_at: float | None = None
    finished_at: float | None = None


def step_summaries(history: Sequence[StoredEvent]) -> list[StepSummary]:
    """Each step the history reached, in the order it first appeared."""
    steps: dict[str, _Step] = {}
    for stored in history:
        ev = stored.event
        if isinstance(ev, StepSkipped):
            s = steps.setdefault(ev.step, _Step())
            s.skipped, s.finished_at = True, ev.ts
        elif isinstance(ev, StepStarted):
            s = steps.setdefault(ev.step, _Step())
            s.instances = max(ev.total, 1)
            s.attempts = max(s.attempts, ev.attempt)
            s.retrying = False
            s.started_at = ev.ts if s.started_at is None else s.started_at
        elif isinstance(ev, StepCompleted):
            s = steps.setdefault(ev.step, _Step())
            s.done.add(ev.instance)
            s.failed.discard(ev.instance)
            s.finished_at = ev.ts
        elif isinstance(ev, StepFailed):
            s = steps.setdefault(ev.step, _Step())
            if ev.final:
                s.failed.add(ev.instance)
                s.finished_at = ev.ts
            else:
                s.retrying = True
    out = []
    for name, s in steps.items():
        status: Literal["running", "completed", "failed", "skipped", "retrying"]
        if s.skipped:
            status = "skipped"
        elif s.failed:
            status = "failed"
        elif len(s.done) >= s.instances:
            status = "completed"
        else:
            status = "retrying" if s.retrying else "running"
        out.append(StepSummary(
            step=name, status=status, instances=s.instances, completed=len(s.done),
            failed=len(s.failed), attempts=s.attempts, started_at=to_datetime(s.started_at),
            finished_at=to_datetime(s.finished_at) if status != "running" else None))
    return out
