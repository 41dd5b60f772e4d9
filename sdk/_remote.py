"""``RemoteWorkflowClient``: the seed's ``WorkflowClient(api_url=..., api_token=...)``, a
client of a ``flow server`` with the methods and return types of the embedded client.

Nothing runs in the caller's process: ``run_workflow`` sends the workflow's registered
name, its version and the constructor arguments its instance recorded (as value trees, so
a dataclass comes back a dataclass), and the server, which has the same code, starts it.
Results, state and events come back as the embedded client gives them. Errors the server
answers with are raised as the library's own (``ExecutionNotFoundError``,
``WorkflowNotRegisteredError``...), found by their stable ``code``; anything else is a
``RemoteError``.

Used as ``async with``, the client keeps its connections open and reuses them; otherwise
every request has a connection of its own, so a client that is never closed (as in the
seed) leaves nothing open. Streams reconnect by themselves after a cut, sending
``Last-Event-ID``, so they miss nothing and repeat nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Self

from agentainer_flow.engine import values
from agentainer_flow.engine.durations import Duration, parse_duration
from agentainer_flow.engine.engine import FORKED_FROM_STEP_TAG, FORKED_FROM_TAG, Outcome
from agentainer_flow.engine.errors import ConfigurationError, ExecutionBlockedError
from agentainer_flow.engine.spec import ARGS_ATTR, get_workflow_spec
from agentainer_flow.store import (
    AmbiguousExecutionIdError,
    ExecutionNotFoundError,
    ExecutionRecord,
    ExecutionStatus,
    FlowError,
)

from ._client import ExecutionMode, ForkOrigin, WorkflowMetrics
from ._events import ExecutionEvent
from ._queues import Queue
from ._summary import AgentSummary, StepSummary

if TYPE_CHECKING:  # imported where a request is made: `flow` starts without it (~0.1 s)
    import httpx

__all__ = [
    "API_TOKEN_ENV",
    "API_URL_ENV",
    "RemoteError",
    "RemoteWorkflowClient",
    "RemoteWorkflowExecution",
    "remote_client_for",
    "remote_client_from",
]

API_URL_ENV = "AGENTAINER_API_URL"
API_TOKEN_ENV = "AGENTAINER_API_TOKEN"

#: ids an ambiguous prefix lists (as the store's ``resolve_execution_id``)
_CANDIDATES = 10
#: seconds a request to ``?wait=`` may wait on the server before asking again
_WAIT_STEP = 30.0
#: seconds between a stream's reconnects, first and most
_BACKOFF_FIRST, _BACKOFF_MAX = 0.1, 2.0
#: seconds of silence after which a stream is taken for cut (the server sends a comment
#: every 15 s)
_STREAM_SILENCE = 45.0
# attributes a problem may carry back onto the library's error
_FIELDS = ("execution_id", "workflow", "version", "available", "secret", "step", "key",
           "candidates", "steps")


class RemoteError(FlowError):
    """The server could not be reached, or refused a request for a reason none of the
    library's errors names (``unauthorized``, ``forbidden``, ``validation``...).

    ``status`` is the HTTP status (``None``: no answer), ``code`` the problem's code.
    """

    code = "remote_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 problem: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        if code is not None:
            self.code = code
        self.problem = dict(problem or {})


def remote_client_from(api_url: str | None = None,
                       api_token: str | None = None) -> RemoteWorkflowClient:
    """A client of the server at ``api_url`` (else ``$AGENTAINER_API_URL``) with
    ``api_token`` (else ``$AGENTAINER_API_TOKEN``)."""
    return RemoteWorkflowClient(api_url, api_token)


def remote_client_for(store: object, api_url: str | None,
                      api_token: str | None) -> RemoteWorkflowClient | None:
    """What ``WorkflowClient(store, api_url=..., api_token=...)`` stands for: a remote
    client when ``api_url``/``api_token`` is given, or when neither they nor a store are
    and ``$AGENTAINER_API_URL`` is set; else ``None`` (the embedded engine)."""
    if api_url is not None or api_token is not None:
        if store is not None:
            raise ConfigurationError(
                "WorkflowClient takes a store (runs workflows in this process) or an api_url "
                "(a flow server runs them), not both")
        return RemoteWorkflowClient(api_url, api_token)
    if store is None and os.environ.get(API_URL_ENV):
        return RemoteWorkflowClient()
    return None


class RemoteWorkflowClient:
    """Starts, watches and operates executions through a ``flow server``.

    ``api_url``/``api_token`` default to ``$AGENTAINER_API_URL``/``$AGENTAINER_API_TOKEN``.
    ``timeout``: seconds a request may take (waits for an execution's end are longer).
    ``reconnect_for``: seconds a stream keeps reconnecting without getting anything before
    it gives up. ``transport``: an ``httpx`` transport (e.g. ``httpx.ASGITransport`` over
    the app, in tests).
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_token: str | None = None,
        *,
        timeout: float = 30.0,
        reconnect_for: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        url = (api_url or os.environ.get(API_URL_ENV) or "").strip()
        token = (api_token or os.environ.get(API_TOKEN_ENV) or "").strip()
        if not url:
            raise ConfigurationError(
                f"no server URL: pass api_url='http://host:8081' or set ${API_URL_ENV}")
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"api_url must be an http:// or https:// URL, got {url!r}")
        if not token:
            raise ConfigurationError(
                f"no API token for {url}: pass api_token=... or set ${API_TOKEN_ENV} (a token "
                "comes from flow token create on the server's store)")
        self.api_url = url.rstrip("/")
        self._token = token
        self.timeout = timeout
        self.reconnect_for = reconnect_for
        self._transport = transport
        self._pooled: httpx.AsyncClient | None = None
        self._oneshot: tuple[weakref.ref[asyncio.AbstractEventLoop], httpx.AsyncClient] | None
        self._oneshot = None

    def __repr__(self) -> str:
        return f"RemoteWorkflowClient(api_url={self.api_url!r})"  # never the token

    # lifecycle --------------------------------------------------------------------------
    def _new_http(self, *, keep_alive: bool) -> httpx.AsyncClient:
        import httpx

        from agentainer_flow import __version__

        limits = httpx.Limits() if keep_alive else httpx.Limits(max_keepalive_connections=0)
        return httpx.AsyncClient(
            base_url=self.api_url, timeout=self.timeout, limits=limits,
            transport=self._transport,
            headers={"Authorization": f"Bearer {self._token}",
                     "User-Agent": f"agentainer-flow/{__version__}"})

    def _http(self) -> httpx.AsyncClient:
        if self._pooled is not None:
            return self._pooled
        loop = asyncio.get_running_loop()
        if self._oneshot is None or self._oneshot[0]() is not loop:
            self._oneshot = (weakref.ref(loop), self._new_http(keep_alive=False))
        return self._oneshot[1]

    async def open(self) -> Self:
        """Keep connections open (until ``close``) instead of one per request."""
        if self._pooled is None:
            self._pooled = self._new_http(keep_alive=True)
        return self

    async def close(self) -> None:
        """Close the connections kept open."""
        pooled, self._pooled = self._pooled, None
        if pooled is not None:
            await pooled.aclose()

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # requests ---------------------------------------------------------------------------
    async def _call(self, method: str, path: str, *, json: Any = None,
                    params: Any = None, timeout: float | None = None) -> Any:
        import httpx

        try:
            response = await self._http().request(
                method, path, json=json, params=params,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            raise RemoteError(f"cannot reach the flow server at {self.api_url}: "
                              f"{type(exc).__name__}: {exc}", code="server_unavailable"
                              ) from None
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def _events(self, path: str, params: Any = None,
                last_id: str | None = None) -> _EventStream:
        """``(id, data)`` of a stream's messages; reconnects after a cut with
        ``Last-Event-ID``, until the stream's ``end``."""
        return _EventStream(self, path, params, last_id)

    # running ----------------------------------------------------------------------------
    async def run_workflow(
        self,
        workflow: object,
        mode: ExecutionMode = ExecutionMode.SYNC,
        *,
        input: Any = None,
        secrets: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        execution_id: str | None = None,
        queue: str | Queue | None = None,
        priority: int = 0,
    ) -> RemoteWorkflowExecution:
        """Start an execution of ``workflow`` (an instance of a ``@workflow`` class) on the
        server, which must have the same workflow name and version loaded.

        ``SYNC`` returns once it has ended (a failure is raised by ``get_result``);
        ``ASYNC`` at once. ``queue`` names the queue whose workers run it (a ``Queue``'s
        limits are set where the workers declare them).
        """
        spec = get_workflow_spec(workflow)
        if isinstance(workflow, type):
            raise TypeError(
                f"run_workflow() needs a workflow instance, got the class {spec.cls.__name__}; "
                f"create one first: {spec.cls.__name__}(...)")
        args, kwargs = getattr(workflow, ARGS_ATTR, ((), {}))
        ctor = values.dump([list(args), kwargs], where=f"constructor arguments of workflow "
                           f"{spec.name!r} ($[0]: positional, $[1]: keyword)")
        body = {
            "workflow": spec.name, "version": spec.version, "args": ctor[0],
            "kwargs": ctor[1], "input": values.dump(input, where=f"input of workflow "
                                                    f"{spec.name!r}"),
            "secrets": {str(k): str(v) for k, v in (secrets or {}).items()},
            "tags": {str(k): str(v) for k, v in (tags or {}).items()},
            "idempotency_key": idempotency_key, "execution_id": execution_id,
            "queue": queue.name if isinstance(queue, Queue) else queue,
            "priority": int(priority), "mode": "async",
        }
        started = await self._call("POST", "/v1/executions", json=body)
        execution = RemoteWorkflowExecution(self, started["id"])
        if mode is ExecutionMode.SYNC:
            await self._wait_end(execution.id, None)
        return execution

    def get_execution(self, execution_id: str) -> RemoteWorkflowExecution:
        """A handle on an existing execution."""
        return RemoteWorkflowExecution(self, execution_id)

    async def resume(
        self,
        execution_id: str,
        *,
        secrets: Mapping[str, str] | None = None,
        wait: bool = True,
        takeover: bool = False,
    ) -> RemoteWorkflowExecution:
        """Resume an unfinished execution in the server's process, with ``secrets`` (e.g.
        the one a blocked execution waits for); with ``wait``, until it ends."""
        body = {"secrets": {str(k): str(v) for k, v in (secrets or {}).items()},
                "takeover": takeover}
        await self._call("POST", f"{_path(execution_id)}/resume", json=body)
        if wait:
            await self._wait_end(execution_id, None)
        return RemoteWorkflowExecution(self, execution_id)

    async def retry(
        self,
        execution_id: str,
        *,
        from_step: str | None = None,
        secrets: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
        queue: str | None = None,
    ) -> RemoteWorkflowExecution:
        """Start a new execution that redoes a failed (or cancelled) one from
        ``from_step`` (default: the step that failed), reusing what completed before it."""
        body = {"from_step": from_step,
                "secrets": {str(k): str(v) for k, v in (secrets or {}).items()},
                "tags": {str(k): str(v) for k, v in (tags or {}).items()}, "queue": queue}
        started = await self._call("POST", f"{_path(execution_id)}/retry", json=body)
        return RemoteWorkflowExecution(self, started["id"])

    async def cancel(self, execution_id: str, reason: str = "") -> bool:
        """Cancel an execution; ``False`` if it had already finished."""
        done = await self._call("POST", f"{_path(execution_id)}/cancel",
                                json={"reason": reason})
        return bool(done["cancelled"])

    async def wait_outcome(self, execution_id: str, timeout: float | None = None) -> Outcome:
        """How the execution ended, waiting for its end (``TimeoutError`` after ``timeout``
        seconds); ``ExecutionBlockedError`` if it waits for a secret and nobody runs it.

        As ``Engine.wait_outcome`` of the embedded client: a failure is described, not
        raised (``Outcome.unwrap()`` raises it)."""
        data = await self._wait_end(execution_id, timeout)
        tree = data.get("result_tree")
        try:
            values.load(tree)
        except FlowError:  # it names a type not importable here: its plain JSON
            tree = values.dump(data.get("result"))
        return Outcome(execution_id, data["status"], tree, data.get("error"),
                       data.get("error_type"), data.get("failed_step"))

    async def _wait_end(self, execution_id: str, timeout: float | None) -> dict[str, Any]:
        """The execution once it has ended (``TimeoutError`` after ``timeout`` seconds);
        ``ExecutionBlockedError`` if it waits for a secret and nobody runs it."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _WAIT_STEP
            if deadline is not None:
                step = min(step, max(0.0, deadline - time.monotonic()))
            data: dict[str, Any] = await self._call(
                "GET", _path(execution_id), params={"wait": round(step, 3)},
                timeout=step + self.timeout)
            if ExecutionStatus(data["status"]).is_terminal:
                return data
            if data.get("waiting_for_secret"):
                raise ExecutionBlockedError(execution_id, data["waiting_for_secret"])
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"execution {execution_id} did not end within "
                                   f"{timeout:g} s")

    # reading ----------------------------------------------------------------------------
    async def describe(self, execution_id: str) -> ExecutionRecord:
        """The execution's row: status, tags, times, error."""
        return _record(await self._call("GET", _path(execution_id)))

    async def get_workflow_status(self, execution_id: str) -> ExecutionStatus:
        """The execution's status (a ``str`` enum: ``"completed"``, ``"running"``...)."""
        return (await self.describe(execution_id)).status

    async def list_executions(
        self,
        *,
        workflow_name: str | None = None,
        statuses: Sequence[ExecutionStatus | str] | None = None,
        tags: Mapping[str, str] | None = None,
        parent_id: str | None = None,
        created_after: float | None = None,
        updated_after: float | None = None,
        id_prefix: str | None = None,
        limit: int | None = 100,
        created_before: float | None = None,
    ) -> list[ExecutionRecord]:
        """Executions matching every filter given, newest first (``limit=None``: all)."""
        body: dict[str, Any] = {
            "workflow": workflow_name,
            "statuses": [ExecutionStatus(s).value for s in statuses] if statuses else None,
            "tags": dict(tags) if tags else None, "parent_id": parent_id,
            "id_prefix": id_prefix, "created_after": _iso(created_after),
            "created_before": _iso(created_before), "updated_after": _iso(updated_after)}
        found: list[ExecutionRecord] = []
        cursor = None
        while limit is None or len(found) < limit:
            page_size = 1000 if limit is None else min(1000, limit - len(found))
            page = await self._call("POST", "/v1/executions/search",
                                    json={**body, "limit": page_size, "cursor": cursor})
            found += [_record(item) for item in page["items"]]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return found

    async def resolve_execution_id(self, prefix: str) -> str:
        """The id of the one execution whose id is ``prefix`` or starts with it (as the
        store's ``resolve_execution_id``: an exact id wins).

        Raises ``ExecutionNotFoundError`` when none matches, and
        ``AmbiguousExecutionIdError`` (listing some candidates) when several do.
        """
        found = (await self.list_executions(id_prefix=prefix, limit=_CANDIDATES + 1)
                 if prefix else [])
        ids = [r.id for r in found]
        if prefix in ids or len(ids) == 1:
            return prefix if prefix in ids else ids[0]
        if len(ids) > _CANDIDATES:  # the exact id may be past the first page
            with contextlib.suppress(ExecutionNotFoundError):
                return (await self.describe(prefix)).id
        if not ids:
            raise ExecutionNotFoundError(prefix)
        raise AmbiguousExecutionIdError(prefix, ids[:_CANDIDATES], more=len(ids) > _CANDIDATES)

    async def forked_from(self, execution_id: str) -> ForkOrigin | None:
        """Where a forked execution came from (``None`` if it is not a fork)."""
        tags = (await self.describe(execution_id)).tags
        source = tags.get(FORKED_FROM_TAG)
        if source is None:
            return None
        return ForkOrigin(execution_id=source, step=tags.get(FORKED_FROM_STEP_TAG, ""))

    async def forks_of(self, execution_id: str) -> list[ExecutionRecord]:
        """The executions forked from this one (``retry``), newest first."""
        await self.describe(execution_id)
        return await self.list_executions(tags={FORKED_FROM_TAG: execution_id}, limit=None)

    async def get_step_summaries(self, execution_id: str) -> list[StepSummary]:
        """One row per step instance (status, attempts, times, result or error, agents,
        children), as ``flow status`` and ``flow history`` show it; of a damaged history,
        what can be read of it."""
        data = await self._call("GET", f"{_path(execution_id)}/steps")
        return [_step_summary(s) for s in data["steps"]]

    async def get_audit(
            self, execution_id: str) -> list[tuple[int, str, str | None, ExecutionEvent | None]]:
        """``(seq, type, problem, event)`` of every stored event, with the damage marked
        (``problem``; ``event`` is ``None`` where it does not decode or is missing): what
        can be read of a history that ``get_history`` refuses as damaged."""
        data = await self._call("GET", f"{_path(execution_id)}/audit")
        return [(int(e["seq"]), str(e.get("type") or ""), e.get("problem"),
                 None if e.get("event") is None else _event(e["event"]))
                for e in data["entries"]]

    async def get_workflow(self, name: str) -> dict[str, Any]:
        """A workflow the server can start: its versions and its DAG (``steps``, and
        ``order``, the steps in a topological order)."""
        data: dict[str, Any] = await self._call("GET", f"/v1/workflows/{_quote(name)}")
        return data

    async def get_history(self, execution_id: str) -> list[ExecutionEvent]:
        """Every event of the execution, in order."""
        data = await self._call("GET", f"{_path(execution_id)}/history")
        return [_event(e) for e in data["events"]]

    async def get_state(self, execution_id: str) -> dict[str, Any]:
        """The workflow state after every write recorded so far."""
        data = await self._call("GET", f"{_path(execution_id)}/state")
        return {k: _value(tree, data["state"].get(k)) for k, tree in data["state_tree"].items()}

    async def get_logs(self, execution_id: str) -> list[str]:
        """Log lines: ``ctx.log`` messages, step/execution milestones and what agents
        printed."""
        data = await self._call("GET", f"{_path(execution_id)}/logs")
        return list(data["lines"])

    async def stream_logs(self, execution_id: str) -> AsyncGenerator[str, None]:
        """Log lines as they are written, until the execution ends."""
        stream = self._events(f"{_path(execution_id)}/logs", params={"follow": "true"})
        async with contextlib.aclosing(stream):
            async for _, data in stream:
                for line in data.split("\n"):
                    yield line

    async def stream_events(
        self, execution_id: str, *, after_seq: int = 0
    ) -> AsyncGenerator[ExecutionEvent, None]:
        """The execution's events (after ``after_seq``), then new ones as they land, until
        it ends."""
        stream = self._events(f"{_path(execution_id)}/events",
                              last_id=str(after_seq) if after_seq else None)
        async with contextlib.aclosing(stream):  # a caller's break closes the connection
            async for _, data in stream:
                yield _event(_json(data))

    async def stream_workflow_events(
        self,
        workflow_name: str | None = None,
        event_types: Sequence[str] | None = None,
        *,
        since: dt.datetime | None = None,
        follow: bool = True,
        poll_interval: float = 0.25,
    ) -> AsyncGenerator[ExecutionEvent, None]:
        """Events of every execution of ``workflow_name`` (all workflows if ``None``),
        starting with the history of executions created since ``since`` (all by default),
        then new ones until the caller stops iterating (or, with ``follow=False``, once
        caught up). ``event_types`` filters by type. (``poll_interval`` is the server's.)
        """
        params: list[tuple[str, str]] = [("follow", "true" if follow else "false")]
        if workflow_name is not None:
            params.append(("workflow", workflow_name))
        params += [("type", t) for t in event_types or ()]
        if since is not None:
            params.append(("since", since.isoformat()))
        stream = self._events("/v1/events", params=params)
        async with contextlib.aclosing(stream):
            async for _, data in stream:
                yield _event(_json(data))

    async def get_workflow_metrics(
        self, workflow_name: str, time_range: Duration = "24h"
    ) -> WorkflowMetrics:
        """Totals, success rate (percent of finished runs) and average duration (seconds)
        of the workflow's executions created within ``time_range``."""
        text = time_range if isinstance(time_range, str) else \
            f"{parse_duration(time_range, what='time_range')}s"
        data = await self._call("GET", f"/v1/workflows/{_quote(workflow_name)}/metrics",
                                params={"time_range": text})
        data.pop("time_range", None)
        known = {f.name for f in dataclasses.fields(WorkflowMetrics)} - {"time_range"}
        return WorkflowMetrics(**{k: v for k, v in data.items() if k in known},
                               time_range=str(time_range))

    async def list_workflows(self) -> list[dict[str, Any]]:
        """The workflows the server can start, with their steps (its DAG)."""
        data = await self._call("GET", "/v1/workflows")
        return list(data["workflows"])

    async def health(self) -> dict[str, Any]:
        """``/health``: whether the server answers, and its version."""
        data: dict[str, Any] = await self._call("GET", "/health")
        return data


class RemoteWorkflowExecution:
    """A handle on one execution of a ``flow server`` (as ``WorkflowExecution``)."""

    def __init__(self, client: RemoteWorkflowClient, execution_id: str) -> None:
        self.client = client
        self.id = execution_id

    @property
    def execution_id(self) -> str:
        return self.id

    async def status(self) -> ExecutionStatus:
        return await self.client.get_workflow_status(self.id)

    async def describe(self) -> ExecutionRecord:
        return await self.client.describe(self.id)

    async def get_result(self, timeout: Duration | None = None) -> Any:
        """Wait for the end; the result, or ``WorkflowFailedError``
        (``WorkflowTimeoutError``, ``WorkflowCancelledError``) saying why it did not
        complete. ``TimeoutError`` after ``timeout``."""
        data = await self.client._wait_end(self.id, parse_duration(timeout, what="timeout"))
        if data["status"] == "completed":
            return _value(data.get("result_tree"), data.get("result"))
        return Outcome(self.id, data["status"], None, data.get("error"),
                       data.get("error_type"), data.get("failed_step")).unwrap()

    async def wait(self, timeout: Duration | None = None) -> ExecutionStatus:
        """Wait for the end without raising on failure; the final status."""
        data = await self.client._wait_end(self.id, parse_duration(timeout, what="timeout"))
        return ExecutionStatus(data["status"])

    async def stream_events(self) -> AsyncGenerator[ExecutionEvent, None]:
        """Events so far, then new ones as they land, until the execution ends."""
        stream = self.client._events(f"{_path(self.id)}/events")
        async with contextlib.aclosing(stream):  # a caller's break closes the connection
            async for _, data in stream:
                yield _event(_json(data))

    async def history(self) -> list[ExecutionEvent]:
        return await self.client.get_history(self.id)

    async def logs(self) -> list[str]:
        return await self.client.get_logs(self.id)

    async def state(self) -> dict[str, Any]:
        return await self.client.get_state(self.id)

    async def cancel(self, reason: str = "") -> bool:
        """Cancel it (agents stopped, ``always_run`` steps still run)."""
        return await self.client.cancel(self.id, reason)

    def __repr__(self) -> str:
        return f"RemoteWorkflowExecution(id={self.id!r})"


# wire formats ----------------------------------------------------------------------------
def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _path(execution_id: str) -> str:
    return f"/v1/executions/{_quote(execution_id)}"


def _json(text: str) -> Any:
    import json

    return json.loads(text)


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def _unix(text: str | None) -> float | None:
    return None if text is None else dt.datetime.fromisoformat(text).timestamp()


def _value(tree: Any, fallback: Any) -> Any:
    """A value tree's Python value; its plain JSON if a type it names is not importable
    here."""
    try:
        return values.load(tree)
    except FlowError:
        return fallback


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _ServedRecord(ExecutionRecord):
    """An execution's row as a server sent it: its times are shown to the microsecond, so
    its duration is the server's own, not the difference of the times shown."""

    served_duration: float | None = None

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        if self.served_duration is not None:
            return self.served_duration
        return self.finished_at - self.created_at


def _record(data: Mapping[str, Any]) -> ExecutionRecord:
    return _ServedRecord(
        served_duration=data.get("duration"),
        lease_token=int(data.get("lease_token") or 0),
        lease_renewed_at=_unix(data.get("lease_renewed_at")),
        id=data["id"], workflow_name=data["workflow"], workflow_version=data["version"],
        status=ExecutionStatus(data["status"]), created_at=_unix(data["created_at"]) or 0.0,
        updated_at=_unix(data["updated_at"]) or 0.0, finished_at=_unix(data.get("finished_at")),
        tags=dict(data.get("tags") or {}), idempotency_key=data.get("idempotency_key"),
        parent_id=data.get("parent_id"), last_seq=int(data.get("events") or 0),
        cancel_requested=bool(data.get("cancel_requested")),
        cancel_reason=data.get("cancel_reason"), lease_owner=data.get("lease_owner"),
        lease_expires_at=_unix(data.get("lease_expires_at")), error=data.get("error"),
        queue=data.get("queue"), priority=int(data.get("priority") or 0))


def _event(data: Mapping[str, Any]) -> ExecutionEvent:
    return ExecutionEvent(
        execution_id=data["execution_id"], seq=int(data["seq"]), type=data["type"],
        timestamp=dt.datetime.fromisoformat(data["timestamp"]), message=data["message"],
        step=data.get("step"), instance=data.get("instance"), attempt=data.get("attempt"),
        details=dict(data.get("details") or {}))


def _step_summary(data: Mapping[str, Any]) -> StepSummary:
    agents = tuple(AgentSummary(
        name=a["name"], image=a["image"], agent_id=a["agent_id"], attempt=int(a["attempt"]),
        index=int(a["index"]), status=a["status"], exit_code=a.get("exit_code"),
        error=a.get("error"),
        command=tuple(a["command"]) if a.get("command") is not None else None,
        env=dict(a.get("env") or {})) for a in data.get("agents") or ())
    return StepSummary(
        step=data["step"], instance=int(data["instance"]), status=data["status"],
        attempts=int(data.get("attempts") or 0), started_at=data.get("started_at"),
        finished_at=data.get("finished_at"),
        result=_value(data.get("result_tree"), data.get("result")), error=data.get("error"),
        error_type=data.get("error_type"), retry_at=data.get("retry_at"), agents=agents,
        children=tuple(data.get("children") or ()), note=data.get("note") or "",
        first_seq=int(data.get("first_seq") or 0), last_seq=int(data.get("last_seq") or 0))


def _error_classes() -> dict[str, type[FlowError]]:
    """Every ``FlowError`` subclass loaded, by its code (the most general class of a code
    wins, so a code shared by accident names the base)."""
    found: dict[str, type[FlowError]] = {}
    todo: list[type[FlowError]] = [FlowError]
    while todo:
        cls = todo.pop(0)
        code = cls.__dict__.get("code")
        if isinstance(code, str) and code not in found and cls is not RemoteError:
            found[code] = cls
        todo.extend(cls.__subclasses__())
    return found


def _error(response: httpx.Response) -> FlowError:
    """The error a problem answer stands for: the library's, by code, else RemoteError."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {}
    code = str(problem.get("code") or f"http_{response.status_code}")
    detail = str(problem.get("detail") or response.reason_phrase or "the server refused it")
    cls = _error_classes().get(code)
    if cls is None or code in ("flow_error", "remote_error"):
        return RemoteError(f"{detail} (HTTP {response.status_code}, {code})",
                           status=response.status_code, code=code, problem=problem)
    exc = cls.__new__(cls)
    Exception.__init__(exc, detail)  # its own __init__ builds a message: this one is made
    for name in _FIELDS:
        if name in problem:
            value = problem[name]
            setattr(exc, name, tuple(value) if isinstance(value, list) else value)
    return exc


def _messages(lines: AsyncIterator[str]) -> _Messages:
    """``(event, id, data)`` of each Server-Sent Events message (``event`` defaults to
    ``message``; comments are skipped)."""
    return _Messages(lines)


class _Messages:
    """:func:`_messages`: an iterator object, not an async generator, so that nothing but
    the public generator that reads it has to be closed at interpreter shutdown (asyncio
    closes every unfinished async generator at once there, and one closing another that
    it is closing too fails with 'aclose(): asynchronous generator is already running')."""

    __slots__ = ("_lines",)

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines

    def __aiter__(self) -> _Messages:
        return self

    async def __anext__(self) -> tuple[str, str | None, str]:
        event, event_id, data = "message", None, list[str]()
        async for line in self._lines:
            if not line:
                if data or event != "message":
                    return event, event_id, "\n".join(data)
                event, event_id, data = "message", None, list[str]()
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "event":
                event = value
            elif name == "id" and "\x00" not in value:
                event_id = value
        raise StopAsyncIteration


class _EventStream:
    """A server's event stream as ``(id, data)`` pairs: reconnects after a cut with
    ``Last-Event-ID`` until the stream's ``end`` (or ``reconnect_for`` seconds without
    progress). An iterator object with ``aclose``, not an async generator (see
    ``_Messages``)."""

    def __init__(self, client: RemoteWorkflowClient, path: str, params: Any,
                 last_id: str | None) -> None:
        self._client = client
        self._path = path
        self._params = params
        self._last_id = last_id
        self._response: Any = None  # the open streaming response's context manager
        self._messages: _Messages | None = None
        self._done = False
        self._backoff = _BACKOFF_FIRST
        self._progress_at = time.monotonic()

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> tuple[str, str]:
        import httpx

        client = self._client
        while not self._done:
            try:
                if self._messages is None:
                    await self._open()
                assert self._messages is not None
                try:
                    event, event_id, data = await self._messages.__anext__()
                except StopAsyncIteration:
                    why = "it closed before its end"
                else:
                    if event == "end":
                        await self.aclose()
                        break
                    if event_id is not None:
                        self._last_id = event_id
                    self._backoff, self._progress_at = _BACKOFF_FIRST, time.monotonic()
                    return event_id or "", data
            except httpx.TransportError as exc:
                why = f"{type(exc).__name__}: {exc}"
            await self._close_response()
            # cut (an error, or closed without its end): resume after the last message
            if time.monotonic() - self._progress_at > client.reconnect_for:
                self._done = True
                raise RemoteError(f"the stream from {client.api_url} was cut and could not be "
                                  f"resumed for {client.reconnect_for:g} s ({why})",
                                  code="server_unavailable")
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        raise StopAsyncIteration

    async def _open(self) -> None:
        import httpx

        client = self._client
        headers = {"Accept": "text/event-stream"}
        if self._last_id:
            headers["Last-Event-ID"] = self._last_id
        timeout = httpx.Timeout(client.timeout, read=_STREAM_SILENCE)
        manager = client._http().stream("GET", self._path, params=self._params,
                                        headers=headers, timeout=timeout)
        response = await manager.__aenter__()
        self._response = manager
        if response.status_code >= 400:
            await response.aread()
            await self._close_response()
            self._done = True
            raise _error(response)
        self._messages = _Messages(response.aiter_lines())

    async def _close_response(self) -> None:
        manager, self._response, self._messages = self._response, None, None
        if manager is not None:
            with contextlib.suppress(Exception):
                await manager.__aexit__(None, None, None)

    async def aclose(self) -> None:
        """Stop: the connection is closed."""
        self._done = True
        await self._close_response()
