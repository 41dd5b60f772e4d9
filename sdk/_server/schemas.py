"""Request and response bodies of the ``/v1`` API (they make its OpenAPI document).

Times are ISO 8601 (UTC). Values made by workflows (results, state, inputs, constructor
arguments) travel twice where a Python client needs their types back: as plain JSON
(``result``) and as the engine's typed tree (``result_tree``, see ``engine.values``).
Secrets are accepted in requests and never appear in a response.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = [
    "BulkIds",
    "BulkResult",
    "BulkResults",
    "CancelBody",
    "Cancelled",
    "EventOut",
    "ExecutionOut",
    "ExecutionPage",
    "Health",
    "History",
    "Logs",
    "MetricsOut",
    "Problem",
    "ResumeBody",
    "RetryBody",
    "SearchBody",
    "StartExecution",
    "State",
    "StepOut",
    "StepSummary",
    "TokenCreate",
    "TokenCreated",
    "TokenOut",
    "WorkflowOut",
    "Workflows",
]

Status = Literal["pending", "running", "blocked", "completed", "failed", "cancelled"]


class _Body(BaseModel):
    """A request body: unknown fields are refused (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")


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
    secrets: dict[str, SecretStr] = Field(
        default_factory=dict, description="Secrets for ctx.secrets: never stored in clear, "
        "never returned.")
    tags: dict[str, str] = Field(default_factory=dict)
    idempotency_key: str | None = Field(
        default=None, description="Starting twice with one key returns the first execution.")
    execution_id: str | None = None
    queue: str | None = Field(default=None, description="The queue whose workers run it "
                              "(default: 'default').")
    priority: int = 0
    mode: Literal["async", "sync"] = Field(
        default="async", description="sync: answer when the execution has ended.")


class SearchBody(_Body):
    """Filters of ``POST /v1/executions/search`` (all optional, combined with AND)."""

    workflow: str | None = None
    statuses: list[Status] | None = None
    tags: dict[str, str] | None = None
    parent_id: str | None = None
    id_prefix: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    updated_after: dt.datetime | None = None
    limit: int = Field(default=50, ge=1, le=1000)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


class CancelBody(_Body):
    reason: str = ""


class ResumeBody(_Body):
    secrets: dict[str, SecretStr] = Field(default_factory=dict)
    takeover: bool = Field(default=False, description="Take it over from a live holder at once.")


class RetryBody(_Body):
    """Retry a failed or cancelled execution: a new execution that reuses what completed
    before ``from_step`` (default: the step that failed; the first step if none did)."""

    from_step: str | None = None
    secrets: dict[str, SecretStr] = Field(default_factory=dict)
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
    name: str = Field(min_length=1)
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
