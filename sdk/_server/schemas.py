"""Request and response bodies of the ``/v1`` API (they make its OpenAPI document).

Times are ISO 8601 (UTC). Values made by workflows (results, state, inputs, constructor
arguments) travel twice where a Python client needs their types back: as plain JSON
(``result``) and as the engine's typed tree (``result_tree``, see ``engine.values``).
Secrets are accepted in requests and never appear in a response.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    WithJsonSchema,
)

from agentainer_flow.store.events import EVENT_TYPES

from .._events import event_type

__all__ = [
    "EVENT_TYPE_NAMES",
    "LAST_EVENT_ID_PATTERN",
    "SEQ_PATTERN",
    "TAG_PATTERN",
    "TIME_RANGE_PATTERN",
    "BulkIds",
    "BulkResult",
    "BulkResults",
    "CancelBody",
    "Cancelled",
    "EventOut",
    "EventTypeName",
    "ExecutionOut",
    "ExecutionPage",
    "Health",
    "History",
    "Int",
    "Logs",
    "MetricsOut",
    "Problem",
    "ResumeBody",
    "RetryBody",
    "SearchBody",
    "SecretValue",
    "StartExecution",
    "State",
    "StepOut",
    "StepSummary",
    "Tag",
    "TimeRange",
    "Timestamp",
    "TokenCreate",
    "TokenCreated",
    "TokenOut",
    "WorkflowOut",
    "Workflows",
]

Status = Literal["pending", "running", "blocked", "completed", "failed", "cancelled"]

# What the API accepts is exactly what its OpenAPI document says: each constraint a route
# checks is declared here (as a pattern, a bound or a type), so that a client validating
# against the document, and schemathesis in our CI, find no request accepted that the
# document calls invalid nor the other way round.

#: ``?tag=KEY=VALUE``
TAG_PATTERN = r"^[^=]+=[\s\S]*$"
#: ``?time_range=`` of the metrics: ``30m``, ``24h``, ``1h30m``, ``3600.0s``... (what
#: ``parse_duration`` reads, written without spaces, in lower case)
TIME_RANGE_PATTERN = r"^([0-9]{1,12}(\.[0-9]{1,9})?(ms|s|m|h|d|w)){1,8}$"
#: ``Last-Event-ID`` of a one-execution stream: the seq of the last message received
SEQ_PATTERN = r"^\s*[0-9]{0,18}\s*$"
#: ``Last-Event-ID`` of the cross-execution stream: ``<time>:<execution id>:<seq>``
LAST_EVENT_ID_PATTERN = (r"^\s*([0-9]{1,12}(\.[0-9]{0,9})?([eE][+-]?[0-9]{1,3})?:[\s\S]*"
                         r":[0-9]{1,18})?\s*$")

# RFC 3339 (the zone may be left out: a time without one is UTC)
_RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
                      r"(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})?")


def _rfc3339(value: Any) -> Any:
    # pydantic alone also reads numbers and "1700000000" as unix times, and dates alone:
    # the document says date-time, so only that is taken
    if isinstance(value, dt.datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("expected a date-time in RFC 3339 (ISO 8601) form, like "
                         "'2024-05-01T12:00:00Z'")
    # parsed here: a strict body would refuse the text itself (it is not a datetime yet)
    return dt.datetime.fromisoformat(value.upper())  # a bad day or hour: ValueError


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


#: a time in a request: RFC 3339 only (no unix numbers); without a zone it is UTC
Timestamp = Annotated[dt.datetime, BeforeValidator(_rfc3339), AfterValidator(_utc)]


def _pattern_type(pattern: str, explain: str) -> Any:
    """A text type that must match ``pattern`` (declared in the document as it is), refused
    with ``explain`` (which says how to write it) instead of the bare pattern."""
    # "$" of Python's re also matches before a final newline; JSON Schema's does not
    compiled = re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)

    def check(value: str) -> str:
        if not compiled.search(value):
            raise ValueError(f"cannot read {value!r}: {explain}")
        return value

    return Annotated[str, AfterValidator(check),
                     WithJsonSchema({"type": "string", "pattern": pattern})]


#: ``?tag=KEY=VALUE``
Tag = _pattern_type(TAG_PATTERN, "a tag filter is written KEY=VALUE")
#: ``?time_range=``
TimeRange = _pattern_type(TIME_RANGE_PATTERN, "write a time range like '30m', '24h', '1h30m' "
                          "or '7d' (units ms, s, m, h, d, w; no spaces)")


def _whole(value: Any) -> Any:
    # JSON has one kind of number: 228.0 is the integer 228 (as JSON Schema reads it)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: an integer of a body (strict, but 228.0 is 228)
Int = Annotated[int, BeforeValidator(_whole)]
#: the event types a stream may be filtered by (``step_started``, ``workflow_failed``...)
EVENT_TYPE_NAMES: tuple[str, ...] = tuple(sorted(event_type(c) for c in EVENT_TYPES.values()))


def _known_event_type(value: str) -> str:
    if value not in EVENT_TYPE_NAMES:
        raise ValueError(f"unknown event type {value!r}: one of {', '.join(EVENT_TYPE_NAMES)}")
    return value


#: an event type's name (an unknown one is refused: it would match nothing, silently)
EventTypeName = Annotated[str, AfterValidator(_known_event_type),
                          WithJsonSchema({"type": "string", "enum": list(EVENT_TYPE_NAMES)})]
#: a secret's value: never empty (an empty value could not be kept out of the event log)
SecretValue = Annotated[SecretStr, Field(min_length=1)]


class _Body(BaseModel):
    """A request body: unknown fields are refused (a typo is not silently ignored), and
    values are taken as the document types them (no ``"5"`` for 5, no number for a time)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Problem(BaseModel):
    """An error, as RFC 9457 ``application/problem+json``. ``code`` is the stable code of
    the library's error (``FlowError.code``) or of the API's own (``unauthorized``...)."""

    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None


# starting --------------------------------------------------------------------------------
class StartExecution(_Body):
    """Start an execution of a workflow the server has loaded (``flow server -m``)."""

    workflow: str = Field(min_length=1, description="The workflow's registered name.")
    version: str | None = Field(
        default=None, description="The version to run; refused if the server does not "
        "have it. Default: the highest version the server has.")
    args: list[Any] = Field(default_factory=list,
                            description="Positional constructor arguments (value trees).")
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="Keyword constructor arguments (value trees).")
    input: Any = Field(default=None, description="The execution's input (a value tree).")
    secrets: dict[str, SecretValue] = Field(
        default_factory=dict, description="Secrets for ctx.secrets: never stored in clear, "
        "never returned.")
    tags: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        default=None, description="Starting twice with one key returns the first execution.")
    execution_id: str | None = None
    queue: str | None = Field(default=None, description="The queue whose workers run it "
                              "(default: 'default').")
    priority: Int = Field(default=0, ge=-(2**31), le=2**31 - 1,
                          description="Higher runs first (a 32-bit integer).")
    mode: Literal["async", "sync"] = Field(
        default="async", description="sync: answer when the execution has ended.")


class SearchBody(_Body):
    """Filters of ``POST /v1/executions/search`` (all optional, combined with AND)."""

    workflow: str | None = None
    statuses: list[Status] | None = None
    tags: dict[str, str] | None = None
    parent_id: str | None = None
    id_prefix: str | None = None
    created_after: Timestamp | None = None
    created_before: Timestamp | None = None
    updated_after: Timestamp | None = None
    limit: Int = Field(default=50, ge=1, le=1000)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


class CancelBody(_Body):
    reason: str = ""


class ResumeBody(_Body):
    secrets: dict[str, SecretValue] = Field(default_factory=dict)
    takeover: bool = Field(default=False, description="Take it over from a live holder at once.")


class RetryBody(_Body):
    """Retry a failed or cancelled execution: a new execution that reuses what completed
    before ``from_step`` (default: the step that failed; the first step if none did)."""

    from_step: str | None = None
    secrets: dict[str, SecretValue] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    queue: str | None = None


class BulkIds(_Body):
    ids: list[str] = Field(min_length=1, max_length=1000)
    reason: str = ""


# executions ------------------------------------------------------------------------------
class StepSummary(BaseModel):
    """One step of an execution, from its history."""

    step: str
    status: Literal["running", "completed", "failed", "skipped", "retrying"]
    instances: int
    completed: int
    failed: int
    attempts: int
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None


class ExecutionOut(BaseModel):
    """An execution: its row, and (when asked for one execution) how it ended and its
    steps."""

    id: str
    workflow: str
    version: str
    status: Status
    created_at: dt.datetime
    updated_at: dt.datetime
    finished_at: dt.datetime | None = None
    duration: float | None = Field(default=None, description="Seconds, once finished.")
    tags: dict[str, str]
    idempotency_key: str | None = None
    parent_id: str | None = None
    queue: str | None = None
    priority: int = 0
    cancel_requested: bool = False
    cancel_reason: str | None = Field(default=None, description="Given with the cancel.")
    events: int = Field(description="The seq of its last event.")
    error: str | None = None
    lease_owner: str | None = None
    lease_expires_at: dt.datetime | None = None
    waiting_for_secret: str | None = Field(
        default=None, description="Blocked, nobody runs it: resume it with this secret.")
    result: Any = Field(default=None, description="The result as plain JSON (completed only).")
    result_tree: Any = Field(default=None, description="The result as a typed value tree.")
    error_type: str | None = None
    failed_step: str | None = None
    steps: list[StepSummary] | None = None


class ExecutionPage(BaseModel):
    items: list[ExecutionOut]
    next_cursor: str | None = None


class EventOut(BaseModel):
    """One event of an execution (``seq`` counts from 1)."""

    execution_id: str
    seq: int
    type: str
    timestamp: dt.datetime
    message: str
    step: str | None = None
    instance: int | None = None
    attempt: int | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class History(BaseModel):
    execution_id: str
    events: list[EventOut]


class Logs(BaseModel):
    execution_id: str
    lines: list[str]


class State(BaseModel):
    execution_id: str
    state: dict[str, Any] = Field(description="Each key's value as plain JSON.")
    state_tree: dict[str, Any] = Field(description="Each key's value as a typed value tree.")


class Cancelled(BaseModel):
    execution_id: str
    cancelled: bool = Field(description="False if it had already finished.")


class BulkResult(BaseModel):
    id: str
    ok: bool
    execution_id: str | None = Field(default=None, description="The new execution (retry).")
    code: str | None = None
    detail: str | None = None


class BulkResults(BaseModel):
    results: list[BulkResult]


# workflows -------------------------------------------------------------------------------
class StepOut(BaseModel):
    name: str
    depends_on: list[str]
    parallel: bool
    dynamic: bool
    reduce: bool
    count: int | None = None
    max_workers: int | None = None
    always_run: bool
    error_handler: str
    timeout: float | None = None
    conditional: bool = Field(description="It has a when= predicate.")
    description: str | None = None


class WorkflowOut(BaseModel):
    """A workflow the server can start: its DAG (the steps, in a topological order)."""

    name: str
    version: str
    versions: list[str]
    description: str | None = None
    timeout: float | None = None
    steps: list[StepOut]
    order: list[str]


class Workflows(BaseModel):
    workflows: list[WorkflowOut]


class MetricsOut(BaseModel):
    workflow_name: str
    time_range: str
    total_executions: int
    completed: int
    failed: int
    cancelled: int
    running: int
    success_rate: float = Field(description="Percent of finished executions that completed.")
    avg_duration: float | None = Field(default=None, description="Seconds, over finished ones.")


# tokens ----------------------------------------------------------------------------------
class TokenCreate(_Body):
    name: str = Field(min_length=1, pattern=r"\S", description="Unique among live tokens.")
    scope: Literal["read", "write", "admin"] = "read"


class TokenOut(BaseModel):
    id: str
    name: str
    scope: str
    prefix: str
    created_at: dt.datetime
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None


class TokenCreated(TokenOut):
    token: str = Field(description="Shown this once; only its SHA-256 is stored.")


class Health(BaseModel):
    status: Literal["ok"]
    version: str
