"""The ASGI app of ``flow server``: the ``/v1`` API over one store and engine.

The server records, routes and streams; executions run on workers that have the workflow
code (``flow worker`` processes, or ``workers=N`` in this process). A start is recorded for
a queue's workers (``default`` unless the request names one). The server needs the code
too (``workflows_module``): it refuses a workflow or a version it does not have, rebuilds
the instance from the constructor arguments sent so that they are recorded exactly as the
embedded client records them, and runs what must run here (``resume``, which may carry
secrets only the caller has).

Every route but ``/health`` needs ``Authorization: Bearer <token>`` (see ``auth``); a token
in a query string is refused. Nothing the server logs holds a token or a secret: its access
log names the method, the path (no query string), the status, the time and the token's id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, SecretStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agentainer_flow.engine.errors import (
    ConfigurationError,
    WorkflowNotRegisteredError,
)
from agentainer_flow.engine.observe import combine
from agentainer_flow.engine.runtimes.base import AgentRuntime
from agentainer_flow.engine.secrets import Redactor, redact_known
from agentainer_flow.engine.spec import (
    WorkflowSpec,
    WorkflowVersionNotRegisteredError,
    get_workflow_spec,
    registered_workflows,
    workflow_versions,
)
from agentainer_flow.store import (
    DEFAULT_QUEUE,
    ExecutionNotFoundError,
    ExecutionRecord,
    ExecutionStatus,
    FlowError,
    HistoryCorruptedError,
    StoredEvent,
)
from agentainer_flow.store._logging import get_logger
from agentainer_flow.store.base import TokenRecord
from agentainer_flow.store.events import ExecutionFailed

from .._client import DEFAULT_STORE, ExecutionMode, WorkflowClient
from .._loading import import_modules
from .._metrics import CONTENT_TYPE, FlowMetrics
from .._otel import tracing_from_env
from .._summary import step_summaries
from .._worker import Worker
from . import sse
from .auth import (
    Authenticator,
    bearer_token,
    create_token,
    find_token,
    looks_like_token,
    scope_allows,
)
from .convert import event_out, execution_out, load_value, plain, to_datetime, to_unix
from .problems import (
    PROBLEM_JSON,
    ApiProblem,
    declare_problems,
    problem_from_error,
    problem_response,
)
from .schemas import (
    LAST_EVENT_ID_PATTERN,
    SEQ_PATTERN,
    BulkIds,
    BulkResult,
    BulkResults,
    CancelBody,
    Cancelled,
    EventOut,
    EventTypeName,
    ExecutionOut,
    ExecutionPage,
    Health,
    History,
    Logs,
    MetricsOut,
    Problem,
    ResumeBody,
    RetryBody,
    SearchBody,
    StartExecution,
    State,
    Status,
    StepOut,
    Tag,
    TimeRange,
    Timestamp,
    TokenCreate,
    TokenCreated,
    TokenOut,
    WorkflowOut,
    Workflows,
)

__all__ = ["ServerState", "create_app"]

log = get_logger("agentainer_flow.server")

#: the longest a request may wait for an execution to end (``?wait=``)
MAX_WAIT = 300.0
#: query parameters that would carry a credential: refused whatever their value
_CREDENTIAL_PARAMS = frozenset({"token", "access_token", "api_token", "api_key", "apikey",
                                "auth", "authorization", "bearer", "key", "password",
                                "secret"})
_bearer = HTTPBearer(auto_error=False, description="An API token: flow token create")


@dataclass
class ServerState:
    """What the routes share: the embedded client (store and engine), the token checker,
    and the in-process worker when there is one."""

    client: WorkflowClient
    authenticator: Authenticator
    owns_client: bool
    workers: int = 0
    worker: Worker | None = None
    worker_task: asyncio.Task[int] | None = None
    _opened: bool = field(default=False, repr=False)

    async def ready(self) -> WorkflowClient:
        if not self._opened:
            await self.client.open()
            self._opened = True
        return self.client


# the app ---------------------------------------------------------------------------------
def create_app(
    store: str | WorkflowClient | None = None,
    *,
    workflows_module: str | Path | Sequence[str | Path] | None = None,
    workers: int = 0,
    runtime: str | AgentRuntime | None = None,
    images: Mapping[str, Sequence[str]] | None = None,
) -> FastAPI:
    """The API over a store (a URL, ``$FLOW_STORE``, else ``sqlite:///.flow/flow.db``) or
    over a ``WorkflowClient`` the caller owns.

    ``workflows_module``: workflow files or dotted module names to import, the workflows
    this server may start. ``workers``: run executions in this process, that many at once
    (0: they go to ``flow worker`` processes through the store). ``runtime``/``images``:
    the agent runtime of what runs here (in-process workers, resumes).
    """
    if workers < 0:
        raise ConfigurationError("workers must be 0 (executions run on flow worker "
                                 "processes) or more")
    modules = ([workflows_module] if isinstance(workflows_module, str | Path)
               else list(workflows_module or ()))
    import_modules([str(m) for m in modules])
    if isinstance(store, WorkflowClient):
        client, owns = store, False
    else:
        url = store or os.environ.get("FLOW_STORE") or DEFAULT_STORE
        client, owns = WorkflowClient(url, runtime, images=images), True
    state = ServerState(client=client, authenticator=Authenticator(client.store),
                        owns_client=owns, workers=workers)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.ready()
        if workers:
            state.worker = Worker(client, concurrency=workers, name="flow-server")
            state.worker_task = asyncio.ensure_future(state.worker.run())
        log.info("server_started", store=client.store.url, workers=workers,
                 workflows=sorted(registered_workflows()))
        try:
            yield
        finally:
            if state.worker is not None and state.worker_task is not None:
                state.worker.stop()
                state.worker.stop()  # hand running executions back now: a worker resumes
                with contextlib.suppress(Exception):
                    await state.worker_task
            if owns:
                await client.close()

    from agentainer_flow import __version__

    app = FastAPI(
        title="agentainer-flow", version=__version__, lifespan=lifespan,
        description="Start, watch and operate durable workflow executions. Every route "
        "but /health needs 'Authorization: Bearer <token>' (flow token create).",
        openapi_url=None, docs_url=None, redoc_url=None)
    app.state.flow = state
    _install_errors(app)
    app.add_middleware(_Guard)

    @app.get("/health", response_model=Health, tags=["server"])
    async def health() -> Health:
        """Liveness: the server answers (no token needed)."""
        return Health(status="ok", version=__version__)

    @app.get("/openapi.json", include_in_schema=False,
             dependencies=[Depends(require("read"))])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    fastapi_openapi = app.openapi

    def openapi_document() -> dict[str, Any]:
        # errors are sent as application/problem+json: the document says so (built once)
        if app.openapi_schema is None:
            app.openapi_schema = declare_problems(fastapi_openapi())
        return app.openapi_schema

    app.openapi = openapi_document  # type: ignore[method-assign]

    app.include_router(_router())
    _add_metrics(app, state)
    return app


# authentication --------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.flow
    return state


#: what a request without a live token is told, whatever it asked for
_UNAUTHORIZED = ("a valid API token is needed: send it as 'Authorization: Bearer <token>' "
                 "(tokens are made with flow token create)")


def require(scope: str) -> Callable[..., Awaitable[TokenRecord]]:
    """A dependency: the request's token, which must be live and allow ``scope``."""

    async def check(request: Request, creds: Annotated[
            HTTPAuthorizationCredentials | None, Security(_bearer)] = None) -> TokenRecord:
        state = _state(request)
        await state.ready()
        token = creds.credentials if creds is not None else bearer_token(
            request.headers.get("authorization"))
        record = await state.authenticator.check(token)
        if record is None:  # missing, malformed, unknown or revoked: one answer for all
            raise ApiProblem(401, "unauthorized", _UNAUTHORIZED,
                             headers={"WWW-Authenticate": "Bearer"})
        request.scope.setdefault("state", {})["token_id"] = record.id
        if not scope_allows(record.scope, scope):
            raise ApiProblem(403, "forbidden",
                             f"this token's scope is {record.scope!r}; this needs a token of "
                             f"scope {scope!r} or above")
        return record

    return check


Read = Depends(require("read"))
Write = Depends(require("write"))
Admin = Depends(require("admin"))
StateDep = Annotated[ServerState, Depends(_state)]


# errors ----------------------------------------------------------------------------------
def _install_errors(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        return problem_response(exc.status, exc.code, exc.detail, instance=request.url.path,
                                headers=exc.headers, **exc.extra)

    async def on_flow_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, FlowError)
        return problem_from_error(exc, instance=request.url.path)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # what was sent is left out: it may hold a secret (a bad secrets= body)
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        shown = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return problem_response(422, "validation", f"the request is not valid: {shown}",
                                instance=request.url.path, errors=errors)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code in (404, 405) and request.url.path != "/health":
            # no route (or method) here: said only to a caller with a live token, so that
            # which routes exist is not visible without one
            state = _state(request)
            await state.ready()
            token = bearer_token(request.headers.get("authorization"))
            if await state.authenticator.check(token) is None:
                return problem_response(401, "unauthorized", _UNAUTHORIZED,
                                        instance=request.url.path,
                                        headers={"WWW-Authenticate": "Bearer"})
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return problem_response(exc.status_code, code, str(exc.detail),
                                instance=request.url.path, headers=headers)

    app.add_exception_handler(ApiProblem, on_problem)
    app.add_exception_handler(FlowError, on_flow_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods ``path`` answers, for the ``Allow`` of a 405: of every route whose path
    matches it (Starlette names only the first), the routes of a literal path first
    (``/v1/executions/search`` is not ``/v1/executions/{execution_id}``), as OpenAPI reads
    paths."""
    literal: set[str] = set()
    templated: set[str] = set()
    for route in app.routes:
        regex = getattr(route, "path_regex", None)
        methods = getattr(route, "methods", None)
        if regex is not None and methods and regex.match(path):
            (templated if getattr(route, "param_convertors", None) else literal).update(methods)
    return sorted(literal or templated)


class _Guard:
    """Outermost of the app's own layers: refuses a credential in a query string, logs
    each request (never its query string, headers or body), and answers an unexpected
    exception with a bare 500 problem (its message, redacted, goes to the log only)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        sent = False

        async def tracked(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status, sent = int(message["status"]), True
            await send(message)

        try:
            if _credential_in_query(scope.get("query_string", b"")):
                response = problem_response(
                    400, "token_in_query", "credentials are never accepted in a URL (where "
                    "logs and proxies keep them): send the token as 'Authorization: Bearer "
                    "<token>', and revoke one that was sent in a URL",
                    instance=scope.get("path"))
                await response(scope, receive, tracked)
                return
            await self.app(scope, receive, tracked)
        except (OSError, anyio.ClosedResourceError, asyncio.CancelledError):
            raise  # the client went away
        except Exception as exc:
            log.error("http_unhandled", method=scope.get("method"), path=scope.get("path"),
                      error_type=type(exc).__name__, error=redact_known(str(exc))[:500])
            if not sent:
                response = problem_response(500, "internal_error", "the server failed to "
                                            "answer; its log says why",
                                            instance=scope.get("path"))
                await response(scope, receive, tracked)
        finally:
            log.info("http_request", method=scope.get("method"), path=scope.get("path"),
                     status=status, ms=round((time.perf_counter() - started) * 1000, 1),
                     token_id=(scope.get("state") or {}).get("token_id"))


def _credential_in_query(query: bytes) -> bool:
    if not query:
        return False
    pairs = urllib.parse.parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return any(name.lower() in _CREDENTIAL_PARAMS or looks_like_token(value)
               or looks_like_token(name) for name, value in pairs)


class EventStream(StreamingResponse):
    """``text/event-stream`` that stops its generator as soon as the client goes away
    (not only at the next write), so an idle follower costs nothing once gone."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(sse.with_keepalive(content), media_type=self.media_type,
                         headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                with contextlib.suppress(OSError, anyio.ClosedResourceError):
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


# the per-step summary and the audit (what ``flow status``/``flow history`` print) ----------
class AgentRow(BaseModel):
    """An agent a step deployed, and how it ended so far."""

    name: str
    image: str
    agent_id: str
    attempt: int
    index: int
    status: str = Field(description="requested, running, completed or failed.")
    exit_code: int | None = None
    error: str | None = None
    command: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict,
                                description="As recorded: secrets show as [secret:name].")


class StepRow(BaseModel):
    """One step instance as its events tell it. Times are unix seconds, exactly as the
    store keeps them (the CLI prints the same numbers against a server or a store)."""

    step: str
    instance: int
    status: str = Field(description="running, retrying, completed, failed, skipped, "
                        "cancelled or interrupted.")
    attempts: int
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = Field(default=None, description="Seconds, over every attempt.")
    result: Any = Field(default=None, description="A completed instance's result as plain "
                        "JSON.")
    result_tree: Any = Field(default=None, description="The result as a typed value tree.")
    error: str | None = None
    error_type: str | None = None
    retry_at: float | None = None
    agents: list[AgentRow] = Field(default_factory=list)
    children: list[str] = Field(default_factory=list, description="Child executions' ids.")
    note: str = ""
    first_seq: int
    last_seq: int


class Steps(BaseModel):
    execution_id: str
    steps: list[StepRow]


class AuditEntry(BaseModel):
    seq: int
    type: str = Field(description="The stored type of the event ('' where none is known).")
    problem: str | None = Field(default=None, description="What is wrong here (None: "
                                "nothing).")
    event: EventOut | None = Field(default=None, description="None when it does not decode "
                                   "or is missing.")


class Audit(BaseModel):
    execution_id: str
    entries: list[AuditEntry]


def _step_row(row: dict[str, Any]) -> StepRow:
    from agentainer_flow.engine import values

    result = row.pop("result")
    tree = None
    if result is not None:
        with contextlib.suppress(FlowError):
            tree = values.dump(result)
    try:
        shown = values.to_jsonable(result)
    except FlowError:  # as the CLI shows a value JSON has no form for
        shown = str(result)
    return StepRow(**row, result=shown, result_tree=tree)


# the routes ------------------------------------------------------------------------------
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": what}
    for status, what in ((400, "Bad request"), (401, "No valid token"),
                         (403, "The token's scope does not allow it"), (404, "Not found"),
                         (409, "Conflict"), (422, "Not valid"), (500, "Server error"),
                         (503, "The store is unavailable"))
}
_STREAM: dict[int | str, dict[str, Any]] = {200: {"content": {"text/event-stream": {}},
                 "description": "Server-Sent Events; send Last-Event-ID to resume."}}


def _location(execution_id: str) -> str:
    """The ``Location`` of an execution: its id percent-encoded, as a URL needs (an id may
    hold any character; a header holds only visible ASCII safely)."""
    return f"/v1/executions/{urllib.parse.quote(execution_id, safe='')}"


def _secrets(given: Mapping[str, SecretStr]) -> dict[str, str]:
    return {k: v.get_secret_value() for k, v in given.items()}


async def _record(client: WorkflowClient, execution_id: str) -> ExecutionRecord:
    record = await client.store.get_execution(execution_id)
    if record is None:
        raise ExecutionNotFoundError(execution_id)
    return record


async def _detail(client: WorkflowClient, execution_id: str) -> ExecutionOut:
    record = await _record(client, execution_id)
    return execution_out(record, await client.store.load(execution_id))


async def _wait_end(client: WorkflowClient, execution_id: str, seconds: float | None) -> None:
    """Wait up to ``seconds`` (``None``: for ever) for the execution to end; blocked or
    stopped executions return at once (the answer says so)."""
    with contextlib.suppress(TimeoutError, FlowError):
        await asyncio.wait_for(client.engine.wait_outcome(execution_id), seconds)


def _spec(name: str, version: str | None) -> WorkflowSpec:
    """The code this server has for a workflow's name (and version), or a clear refusal."""
    versions = workflow_versions(name)
    if not versions:
        known = ", ".join(sorted(registered_workflows())) or "none"
        raise WorkflowNotRegisteredError(
            f"this server has no workflow named {name!r} (it has: {known}); start it with "
            "the module that defines it: flow server -m FILE_OR_MODULE")
    if version is None:
        return get_workflow_spec(name)
    spec = versions.get(str(version))
    if spec is None:
        error = WorkflowVersionNotRegisteredError(workflow=name, version=str(version),
                                                  available=list(versions))
        has = ", ".join(repr(v) for v in versions)
        error.args = (f"this server has no version {version!r} of workflow {name!r} (it has "
                      f"{has}); start it with the module that declares that version, or "
                      "start the version it has",)
        raise error
    return spec


def _instance(spec: WorkflowSpec, body: StartExecution) -> object:
    where = f"the constructor arguments of workflow {spec.name!r}"
    args = load_value(body.args, where)
    kwargs = load_value(body.kwargs, where)
    try:
        return spec.cls(*args, **kwargs)
    except FlowError:
        raise
    except Exception as exc:
        raise ApiProblem(422, "invalid_arguments",
                         f"{spec.cls.__name__}(...) refused the constructor arguments sent: "
                         f"{type(exc).__name__}: {exc}") from None


def _cursor(text: str | None) -> tuple[float, str] | None:
    if not text:
        return None
    try:
        created, execution_id = json.loads(base64.urlsafe_b64decode(text.encode()))
        return float(created), str(execution_id)
    except Exception:
        raise ApiProblem(422, "validation", "cursor is not a next_cursor this API gave; "
                         "start again without it") from None


def _next_cursor(record: ExecutionRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([record.created_at, record.id]).encode()).decode()


async def _search(client: WorkflowClient, body: SearchBody) -> ExecutionPage:
    """One page of executions, newest first.

    The store filters and pages (the cursor is where the previous page ended): a page reads
    about its own length of rows, however many executions there are. Times are compared as
    shown, to the microsecond: the store's bounds are a microsecond loose, and the exact
    ones applied here, reading on while they leave the page short.
    """
    after = _cursor(body.cursor)
    since, before = _utc(body.created_after), _utc(body.created_before)
    until = to_unix(before)
    want = body.limit + 1  # one more: whether there is a next page
    rows: list[ExecutionRecord] = []
    while True:
        batch = await client.store.list_executions(
            workflow_name=body.workflow,
            statuses=[ExecutionStatus(s) for s in body.statuses] if body.statuses else None,
            tags=body.tags, parent_id=body.parent_id, created_after=_loose(since),
            updated_after=_loose(_utc(body.updated_after)), id_prefix=body.id_prefix or None,
            created_before=None if until is None else until + 1e-6, before=after,
            limit=want)
        # times as shown (to the microsecond): an execution is "created at" what the API says
        rows += [r for r in batch
                 if (since is None or _shown(r.created_at) >= since)
                 and (before is None or _shown(r.created_at) < before)]
        if len(batch) < want or len(rows) >= want:
            break
        after = (batch[-1].created_at, batch[-1].id)
    page = rows[:body.limit]
    more = len(rows) > body.limit
    return ExecutionPage(items=[execution_out(r) for r in page],
                         next_cursor=_next_cursor(page[-1]) if more and page else None)


def _utc(when: dt.datetime | None) -> dt.datetime | None:
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=dt.UTC)  # a time without a zone is UTC


def _shown(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


def _loose(when: dt.datetime | None) -> float | None:
    """A lower bound for the store, a microsecond early: the exact one is applied after
    (a time shown to the microsecond may be rounded up from the stored one)."""
    t = to_unix(when)
    return None if t is None else t - 1e-6


def _workflow_out(name: str) -> WorkflowOut:
    versions = workflow_versions(name)
    spec = get_workflow_spec(name)
    steps = [StepOut(name=s.name, depends_on=list(s.depends_on), parallel=s.parallel,
                     dynamic=s.dynamic, reduce=s.reduce, count=s.count,
                     max_workers=s.max_workers, always_run=s.always_run,
                     error_handler=s.error_handler.value, timeout=s.timeout,
                     conditional=s.when is not None, description=s.description)
             for s in (spec.steps[n] for n in spec.order)]
    return WorkflowOut(name=spec.name, version=spec.version, versions=list(versions),
                       description=spec.description, timeout=spec.timeout, steps=steps,
                       order=list(spec.order))


def _token_out(t: TokenRecord) -> TokenOut:
    created = to_datetime(t.created_at)
    assert created is not None
    return TokenOut(id=t.id, name=t.name, scope=t.scope, prefix=t.prefix, created_at=created,
                    last_used_at=to_datetime(t.last_used_at),
                    revoked_at=to_datetime(t.revoked_at))


def _router() -> APIRouter:
    r = APIRouter(prefix="/v1", responses=_PROBLEMS)

    # executions: start, find --------------------------------------------------------------
    @r.post("/executions", status_code=201, response_model=ExecutionOut, tags=["executions"],
            dependencies=[Write])
    async def start_execution(body: StartExecution, state: StateDep) -> JSONResponse:
        """Start an execution of a workflow the server has; it runs on a worker of its
        queue. ``mode: sync`` answers once it has ended."""
        client = await state.ready()
        secrets = _secrets(body.secrets)
        redactor = Redactor(secrets)
        try:
            spec = _spec(body.workflow, body.version)
            instance = _instance(spec, body)
            execution = await client.run_workflow(
                instance, ExecutionMode.ASYNC,
                input=load_value(body.input, f"the input of workflow {spec.name!r}"),
                secrets=secrets, tags=body.tags, idempotency_key=body.idempotency_key,
                execution_id=body.execution_id, queue=body.queue or DEFAULT_QUEUE,
                priority=body.priority)
            if body.mode == "sync":
                await _wait_end(client, execution.id, None)
            out = await _detail(client, execution.id)
        except FlowError as exc:
            return problem_from_error(exc, instance="/v1/executions", redactor=redactor)
        except ApiProblem as exc:
            return problem_response(exc.status, exc.code, exc.detail,
                                    instance="/v1/executions", redactor=redactor, **exc.extra)
        return JSONResponse(redactor.tree(out.model_dump(mode="json")), status_code=201,
                            headers={"Location": _location(out.id)})

    @r.get("/executions", response_model=ExecutionPage, tags=["executions"],
           dependencies=[Read])
    async def list_executions(
        state: StateDep,
        status: Annotated[list[Status] | None, Query()] = None,
        workflow: str | None = None,
        tag: Annotated[list[Tag] | None, Query(description="KEY=VALUE (repeatable)")] = None,
        parent_id: str | None = None,
        id_prefix: str | None = None,
        created_after: Timestamp | None = None,
        created_before: Timestamp | None = None,
        updated_after: Timestamp | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        cursor: str | None = None,
    ) -> ExecutionPage:
        """Executions, newest first, filtered; ``next_cursor`` fetches the next page."""
        tags: dict[str, str] = {}
        for item in tag or ():
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ApiProblem(422, "validation", f"tag must look like KEY=VALUE, got {item!r}")
            tags[key] = value
        body = SearchBody.model_validate({
            "workflow": workflow, "statuses": status, "tags": tags or None,
            "parent_id": parent_id, "id_prefix": id_prefix, "created_after": created_after,
            "created_before": created_before, "updated_after": updated_after,
            "limit": limit, "cursor": cursor})
        return await _search(await state.ready(), body)

    @r.post("/executions/search", response_model=ExecutionPage, tags=["executions"],
            dependencies=[Read])
    async def search_executions(body: SearchBody, state: StateDep) -> ExecutionPage:
        """Executions matching every filter of the body, newest first."""
        return await _search(await state.ready(), body)

    @r.get("/executions/{execution_id:path}/history", response_model=History,
           tags=["executions"], dependencies=[Read])
    async def get_history(execution_id: str, state: StateDep) -> History:
        """Every event of the execution, in order."""
        client = await state.ready()
        await _record(client, execution_id)
        return History(execution_id=execution_id,
                       events=[event_out(s) for s in await client.store.load(execution_id)])

    @r.get("/executions/{execution_id:path}/steps", response_model=Steps, tags=["executions"],
           dependencies=[Read])
    async def get_steps(execution_id: str, state: StateDep) -> Steps:
        """One row per step instance, as ``flow status`` and ``flow history`` show it:
        status, attempts, times, result or error, agents, child executions. Of a damaged
        history, what can be read of it."""
        client = await state.ready()
        await _record(client, execution_id)
        try:
            history = await client.store.load(execution_id)
        except HistoryCorruptedError:
            history = [StoredEvent(execution_id, e.seq, e.event)
                       for e in await client.store.audit(execution_id) if e.event is not None]
        return Steps(execution_id=execution_id,
                     steps=[_step_row(s.to_dict()) for s in step_summaries(history)])

    @r.get("/executions/{execution_id:path}/audit", response_model=Audit, tags=["executions"],
           dependencies=[Read])
    async def get_audit(execution_id: str, state: StateDep) -> Audit:
        """Every stored event that can be read, with the damage marked where it is (a
        changed or unreadable event, a gap, a missing tail): what ``flow history`` shows
        of a history that ``/history`` refuses as damaged."""
        client = await state.ready()
        await _record(client, execution_id)
        return Audit(execution_id=execution_id, entries=[
            AuditEntry(seq=e.seq, type=e.type, problem=e.problem,
                       event=None if e.event is None
                       else event_out(StoredEvent(execution_id, e.seq, e.event)))
            for e in await client.store.audit(execution_id)])

    @r.get("/executions/{execution_id:path}/state", response_model=State, tags=["executions"],
           dependencies=[Read])
    async def get_state(execution_id: str, state: StateDep) -> State:
        """The workflow state after every write recorded so far."""
        from agentainer_flow.store.events import StateSet

        client = await state.ready()
        await _record(client, execution_id)
        trees: dict[str, Any] = {}
        for stored in await client.store.load(execution_id):
            ev = stored.event
            if isinstance(ev, StateSet):
                if ev.deleted:
                    trees.pop(ev.key, None)
                else:
                    trees[ev.key] = ev.value
        return State(execution_id=execution_id, state={k: plain(v) for k, v in trees.items()},
                     state_tree=trees)

    @r.get("/executions/{execution_id:path}/logs", tags=["executions"], dependencies=[Read],
           response_model=Logs, responses=_STREAM)
    async def get_logs(execution_id: str, state: StateDep,
                       follow: Annotated[bool, Query(description=(
                           "Stream the lines (Server-Sent Events) until it ends."))] = False,
                       last_event_id: Annotated[str, Header(pattern=SEQ_PATTERN)] = "",
                       ) -> Any:
        """Log lines; with ``follow``, as Server-Sent Events (one message per event)."""
        client = await state.ready()
        await _record(client, execution_id)
        if follow:
            return EventStream(sse.execution_logs(client.store, execution_id,
                                                  _seq(last_event_id)))
        return Logs(execution_id=execution_id, lines=await client.get_logs(execution_id))

    @r.get("/executions/{execution_id:path}/events", tags=["streams"], dependencies=[Read],
           response_class=StreamingResponse, responses=_STREAM)
    async def stream_execution(execution_id: str, state: StateDep,
                               last_event_id: Annotated[str, Header(pattern=SEQ_PATTERN)] = "",
                               ) -> StreamingResponse:
        """The execution's events as Server-Sent Events (``id``: the seq), then new ones
        until it ends; ``Last-Event-ID`` resumes right after that event."""
        client = await state.ready()
        await _record(client, execution_id)
        return EventStream(sse.execution_events(client.store, execution_id,
                                                _seq(last_event_id)))

    @r.get("/events", tags=["streams"], dependencies=[Read],
           response_class=StreamingResponse, responses=_STREAM)
    async def stream_events(
        state: StateDep,
        workflow: str | None = None,
        type: Annotated[list[EventTypeName] | None,
                        Query(description="Event types (repeatable).")] = None,
        since: Annotated[Timestamp | None, Query(
            description="Only executions created since then.")] = None,
        follow: bool = True,
        last_event_id: Annotated[str, Header(pattern=LAST_EVENT_ID_PATTERN)] = "",
    ) -> StreamingResponse:
        """Events across executions (of ``workflow``, of the ``type``s), as Server-Sent
        Events; ``Last-Event-ID`` resumes right after that event."""
        client = await state.ready()
        try:
            after = sse.parse_cursor(last_event_id)
        except ValueError as exc:
            raise ApiProblem(422, "validation", str(exc)) from None
        return EventStream(sse.workflow_events(
            client.store, workflow=workflow, types=type, since=to_unix(since), after=after,
            follow=follow))

    # executions: operate ------------------------------------------------------------------
    async def cancel_one(client: WorkflowClient, execution_id: str, reason: str) -> bool:
        return await client.cancel(execution_id, reason)

    async def resume_one(state: ServerState, execution_id: str,
                         secrets: dict[str, str], takeover: bool = False) -> str:
        client = await state.ready()
        await client.resume(execution_id, secrets=secrets or None, wait=False,
                            takeover=takeover)
        return execution_id

    async def retry_one(state: ServerState, execution_id: str, body: RetryBody) -> str:
        client = await state.ready()
        record = await _record(client, execution_id)
        if record.status not in (ExecutionStatus.FAILED, ExecutionStatus.CANCELLED):
            raise ApiProblem(409, "not_retryable",
                             f"execution {execution_id} is {record.status.value}: only a "
                             "failed or cancelled execution can be retried",
                             execution_id=execution_id)
        from_step = body.from_step
        if from_step is None:
            history = await client.store.load(execution_id)
            last = history[-1].event
            failed = last.step if isinstance(last, ExecutionFailed) else None
            from_step = failed or get_workflow_spec(record.workflow_name).order[0]
        forked = await client.fork(execution_id, from_step=from_step,
                                   secrets=_secrets(body.secrets) or None,
                                   tags=body.tags or None, mode=ExecutionMode.ASYNC,
                                   queue=body.queue or DEFAULT_QUEUE)
        return forked.id

    @r.post("/executions/{execution_id:path}/cancel", response_model=Cancelled,
            tags=["operate"], dependencies=[Write])
    async def cancel(execution_id: str, state: StateDep,
                     body: CancelBody | None = None) -> Cancelled:
        """Cancel it: its agents are stopped, its ``always_run`` steps still run."""
        client = await state.ready()
        ok = await cancel_one(client, execution_id, body.reason if body else "")
        return Cancelled(execution_id=execution_id, cancelled=ok)

    @r.post("/executions/{execution_id:path}/resume", status_code=202,
            response_model=ExecutionOut, tags=["operate"], dependencies=[Write])
    async def resume(execution_id: str, state: StateDep,
                     body: ResumeBody | None = None) -> JSONResponse:
        """Resume an unfinished execution in the server's process (which has the code),
        with the secrets given (e.g. the one a blocked execution waits for)."""
        body = body or ResumeBody()
        secrets = _secrets(body.secrets)
        redactor = Redactor(secrets)
        client = await state.ready()
        try:
            await resume_one(state, execution_id, secrets, body.takeover)
            out = await _detail(client, execution_id)
        except FlowError as exc:
            return problem_from_error(exc, instance=f"{_location(execution_id)}/resume",
                                      redactor=redactor)
        return JSONResponse(redactor.tree(out.model_dump(mode="json")), status_code=202)

    @r.post("/executions/{execution_id:path}/retry", status_code=201,
            response_model=ExecutionOut, tags=["operate"], dependencies=[Write])
    async def retry(execution_id: str, state: StateDep,
                    body: RetryBody | None = None) -> JSONResponse:
        """Start a new execution that redoes a failed (or cancelled) one from the step
        that failed, reusing the results of the steps before it."""
        body = body or RetryBody()
        redactor = Redactor(_secrets(body.secrets))
        client = await state.ready()
        try:
            new_id = await retry_one(state, execution_id, body)
            out = await _detail(client, new_id)
        except FlowError as exc:
            return problem_from_error(exc, instance=f"{_location(execution_id)}/retry",
                                      redactor=redactor)
        return JSONResponse(redactor.tree(out.model_dump(mode="json")), status_code=201,
                            headers={"Location": _location(out.id)})

    async def bulk(ids: Sequence[str],
                   one: Callable[[str], Awaitable[Any]]) -> BulkResults:
        results = []
        for execution_id in dict.fromkeys(ids):
            try:
                got = await one(execution_id)
            except FlowError as exc:
                results.append(BulkResult(id=execution_id, ok=False, code=exc.code,
                                          detail=redact_known(str(exc))))
            except ApiProblem as exc:
                results.append(BulkResult(id=execution_id, ok=False, code=exc.code,
                                          detail=exc.detail))
            else:
                results.append(BulkResult(id=execution_id, ok=got is not False,
                                          execution_id=got if isinstance(got, str) else None))
        return BulkResults(results=results)

    # Registered after the routes with a suffix (/history, /cancel...): an id may hold "/"
    # (the client sends %2F, which reaches routing decoded), so the id is a path, and a
    # path ending in a known suffix is that suffix's route.
    @r.get("/executions/{execution_id:path}", response_model=ExecutionOut, tags=["executions"],
           dependencies=[Read])
    async def get_execution(execution_id: str, state: StateDep,
                            wait: Annotated[float, Query(ge=0, le=MAX_WAIT, description=(
                                "Seconds to wait for the execution to end first."))] = 0,
                            ) -> ExecutionOut:
        """One execution: status, result or error, and a summary of its steps."""
        client = await state.ready()
        await _record(client, execution_id)
        if wait:
            await _wait_end(client, execution_id, wait)
        return await _detail(client, execution_id)

    @r.post("/executions/cancel", response_model=BulkResults, tags=["operate"],
            dependencies=[Write])
    async def cancel_many(body: BulkIds, state: StateDep) -> BulkResults:
        """Cancel several executions; each gets its own result."""
        client = await state.ready()
        return await bulk(body.ids, lambda eid: cancel_one(client, eid, body.reason))

    @r.post("/executions/resume", response_model=BulkResults, tags=["operate"],
            dependencies=[Write])
    async def resume_many(body: BulkIds, state: StateDep) -> BulkResults:
        """Resume several executions in the server's process."""
        return await bulk(body.ids, lambda eid: resume_one(state, eid, {}))

    @r.post("/executions/retry", response_model=BulkResults, tags=["operate"],
            dependencies=[Write])
    async def retry_many(body: BulkIds, state: StateDep) -> BulkResults:
        """Retry several failed executions; each result names the new execution."""

        return await bulk(body.ids, lambda eid: retry_one(state, eid, RetryBody()))

    # workflows ----------------------------------------------------------------------------
    @r.get("/workflows", response_model=Workflows, tags=["workflows"], dependencies=[Read])
    async def list_workflows() -> Workflows:
        """The workflows this server can start (each name's highest version), with their
        DAGs."""
        return Workflows(workflows=[_workflow_out(n) for n in sorted(registered_workflows())])

    @r.get("/workflows/{name}", response_model=WorkflowOut, tags=["workflows"],
           dependencies=[Read])
    async def get_workflow(name: str) -> WorkflowOut:
        try:
            _spec(name, None)
        except WorkflowNotRegisteredError as exc:  # a resource of the path: not found
            raise ApiProblem(404, exc.code, str(exc)) from None
        return _workflow_out(name)

    @r.get("/workflows/{name}/metrics", response_model=MetricsOut, tags=["workflows"],
           dependencies=[Read])
    async def workflow_metrics(
            name: str, state: StateDep,
            time_range: Annotated[TimeRange, Query(
                description="How far back: '30m', '24h', '7d'...")] = "24h",
    ) -> MetricsOut:
        """Totals, success rate and average duration of the workflow's executions created
        within ``time_range`` (e.g. ``24h``, ``30m``, ``7d``)."""
        client = await state.ready()
        try:
            metrics = await client.get_workflow_metrics(name, time_range)
        except ValueError as exc:
            raise ApiProblem(422, "validation", str(exc)) from None
        return MetricsOut(**dataclasses.asdict(metrics))

    # tokens -------------------------------------------------------------------------------
    @r.get("/tokens", response_model=list[TokenOut], tags=["tokens"], dependencies=[Admin])
    async def list_tokens(state: StateDep) -> list[TokenOut]:
        """Every token (revoked ones too), newest first; never the tokens themselves."""
        client = await state.ready()
        return [_token_out(t) for t in await client.store.list_tokens()]

    @r.post("/tokens", status_code=201, response_model=TokenCreated, tags=["tokens"],
            dependencies=[Admin])
    async def new_token(body: TokenCreate, state: StateDep) -> TokenCreated:
        """Make a token: the answer holds it, once."""
        client = await state.ready()
        name = body.name.strip()
        if any(t.name == name and not t.revoked for t in await client.store.list_tokens()):
            raise ApiProblem(409, "token_name_taken",
                             f"a live token named {name!r} exists already: revoke it first "
                             "or pick another name", name=name)
        token, record = await create_token(client.store, name, body.scope)
        return TokenCreated(**_token_out(record).model_dump(), token=token)

    @r.delete("/tokens/{id_or_name}", response_model=TokenOut, tags=["tokens"],
              dependencies=[Admin])
    async def revoke(id_or_name: str, state: StateDep) -> TokenOut:
        """Revoke a live token (by id, else by name); it is refused from now on."""
        client = await state.ready()
        try:
            record = await find_token(client.store, id_or_name)
        except ConfigurationError:
            raise ApiProblem(404, "token_not_found",
                             f"no live token with id or name {id_or_name!r}") from None
        await client.store.revoke_token(record.id)
        revoked = next(t for t in await client.store.list_tokens() if t.id == record.id)
        return _token_out(revoked)

    return r


def _seq(last_event_id: str | None) -> int:
    try:
        return sse.parse_seq(last_event_id)
    except ValueError as exc:
        raise ApiProblem(422, "validation", str(exc)) from None


# metrics ---------------------------------------------------------------------------------
def _add_metrics(app: FastAPI, state: ServerState) -> None:
    """``GET /metrics`` in the Prometheus text format, for a token of scope ``read`` (a
    scraper sends it as ``Authorization: Bearer``, e.g. Prometheus' ``authorization:
    credentials_file:``), like every route but ``/health``.

    It holds this process's engine metrics (executions started here, store calls, and the
    steps, agents and takeovers of what runs here: ``--workers``, resumes) and the store's
    queue depth and unfinished executions, read at each scrape; ``flow worker
    --metrics-port`` gives those of a worker. The engine also traces when the environment
    asks for it (``FLOW_OTEL=1``, see ``_otel.tracing_from_env``).
    """
    metrics = FlowMetrics()
    engine = state.client.engine
    engine.observer = combine(engine.observer, metrics, tracing_from_env())

    @app.get("/metrics", tags=["server"], dependencies=[Read],
             response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "The Prometheus text format (0.0.4)."},
                        **{k: _PROBLEMS[k] for k in (401, 403, 500)}})
    async def get_metrics() -> PlainTextResponse:
        """Prometheus metrics of this server and of the store (read now)."""
        client = await state.ready()
        return PlainTextResponse(await metrics.exposition(client.store),
                                 media_type=CONTENT_TYPE)
