"""schemathesis against the server's OpenAPI: no 5xx, every response as documented.

Every operation of the document gets ``MAX_EXAMPLES`` generated requests (valid and
invalid ones), each sent with an admin token and checked by schemathesis's checks: no
server error, status codes, content types, headers and bodies as the document declares them
(``application/problem+json`` errors included), invalid requests refused, the token
required. One check is narrowed: a valid request may be refused (422) for what it means (a
workflow the server does not have, constructor arguments its class refuses), not for its
form (``refused_for_meaning_only``). Query parameters the document does not name are
ignored by the API, as by most, so schemathesis does not count them as invalid.

The app runs in this process (``schemathesis.openapi.from_asgi``) over a fresh SQLite store
with an in-process worker, so that started executions run and end. Before the run the store
gets the token and executions of each kind (completed, failed, blocked on a secret,
cancelled, running); generated execution ids, workflow names and page cursors are swapped
for real ones some of the time, so that cases reach past the 404s and 422s.

What could wait without end is bounded, not skipped:

- ``?wait=`` (``GET /v1/executions/{id}``) is capped at ``WAIT_CAP`` seconds;
- ``POST /v1/executions`` (``mode: sync`` waits for the end) starts only workflows that end
  or block at once: names are steered to ``QUICK_WORKFLOWS``, and a generated name of
  another loaded workflow (``ticker`` runs as long as its arguments say) is replaced;
- the streams (``/v1/executions/{id}/events``, ``/v1/executions/{id}/logs?follow=true``,
  ``/v1/events``, which follows for ever by default) are read for ``STREAM_SECONDS`` and
  then cut: what came before the cut is what is checked. The execution streams of the
  seeded finished executions end by themselves; the running one's is cut.

Every other request has ``REQUEST_TIMEOUT``: a route that hangs where it should not fails
the test instead of stalling it. ``FLOW_SCHEMATHESIS_EXAMPLES=100`` runs a deeper search.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance
from schemathesis.python import asgi

from agentainer_flow import ExecutionMode, WorkflowClient
from agentainer_flow._server import create_app
from agentainer_flow._server.auth import create_token
from agentainer_flow.engine.spec import registered_workflows
from tests.server.server_workflows import MonitoredWorkflow, NeedsSecret, Ticker

#: examples per operation (hypothesis): the whole run takes under a minute on 2 cores
MAX_EXAMPLES = int(os.environ.get("FLOW_SCHEMATHESIS_EXAMPLES", "15"))
#: the longest ``?wait=`` a case may ask for
WAIT_CAP = 0.2
#: seconds a stream is read before it is cut
STREAM_SECONDS = 0.5
#: seconds any other request may take
REQUEST_TIMEOUT = 20.0
#: workflows a start may be steered to: each ends (or blocks) within milliseconds
QUICK_WORKFLOWS = ("data_workflow", "needs_secret")
_STREAMS = ("/v1/events", "/v1/executions/{execution_id}/events",
            "/v1/executions/{execution_id}/logs")


async def _seed(url: str) -> tuple[str, list[str]]:
    """An admin token and executions of each status in the store at ``url``."""
    async with WorkflowClient(url) as client:
        token, _ = await create_token(client.store, "schemathesis", "admin")
        made = [await client.run_workflow(MonitoredWorkflow()),
                await client.run_workflow(MonitoredWorkflow(fail=True)),
                await client.run_workflow(NeedsSecret())]
        cancelled = await client.run_workflow(Ticker(ticks=1, pause="1h"), ExecutionMode.ASYNC,
                                              queue="nobody", tags={"kind": "cancelled"})
        await client.cancel(cancelled.id, "seeded")
        # a long one the app's worker picks up: it runs during the whole test
        running = await client.run_workflow(Ticker(ticks=100_000, pause="50ms"),
                                            ExecutionMode.ASYNC, queue="default")
        return token, [e.id for e in (*made, cancelled, running)]


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Any, str, list[str]]]:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    token, ids = asyncio.run(_seed(url))
    app = create_app(url, workers=2)
    try:
        yield app, token, ids
    finally:
        asgi.shutdown_lifespans()  # the app's worker and store close here, not at exit


@pytest.fixture
def api_schema(api: tuple[Any, str, list[str]]) -> Any:
    app, token, ids = api
    auth = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=auth)
    with asgi.get_client(app) as http:
        cursors = [http.get("/v1/executions", params={"limit": 1},
                            headers=auth).json()["next_cursor"]]
    assert cursors[0], "the seeded store has more than one execution: a page has a next one"
    # the token is sent by the test, not generated; unknown query parameters are ignored
    # by the API (as most are), so they are not counted as invalid requests
    schema.config.generation.update(with_security_parameters=False,
                                    allow_extra_parameters=False)

    @schema.hook
    def flatmap_path_parameters(context: Any, params: dict[str, Any]) -> Any:
        if not isinstance(params, dict) or "execution_id" not in params:
            return st.just(params)
        return st.sampled_from([*ids, params["execution_id"]]).map(
            lambda eid: {**params, "execution_id": eid})

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> Any:
        if not isinstance(body, dict):
            return st.just(body)
        named = body.get("workflow")
        if isinstance(named, str) and named and context.operation.path == "/v1/executions":
            if named in registered_workflows() and named not in QUICK_WORKFLOWS:
                named = QUICK_WORKFLOWS[0]  # it may run for long: sync would wait for it
            return st.sampled_from([*QUICK_WORKFLOWS, named]).map(
                lambda name: {**body, "workflow": name})
        return _real_cursor(body, cursors)

    @schema.hook
    def flatmap_query(context: Any, query: dict[str, Any]) -> Any:
        if not isinstance(query, dict):
            return st.just(query)
        if _seconds(query.get("wait")) > WAIT_CAP:
            query = {**query, "wait": WAIT_CAP}
        return _real_cursor(query, cursors)

    return schema


def _seconds(value: Any) -> float:
    """A ``?wait=`` as the server reads it (a query value is text), 0 if it is not one."""
    if isinstance(value, bool):
        return 0.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _real_cursor(params: dict[str, Any], cursors: list[str]) -> Any:
    """``params`` with a text ``cursor`` swapped for a real one or none: a cursor is opaque
    (the document cannot tell a made-up one from a real one), and a made-up one is refused
    (422) as it should be."""
    if not isinstance(params.get("cursor"), str):
        return st.just(params)
    without = {k: v for k, v in params.items() if k != "cursor"}
    return st.sampled_from([*cursors, None]).map(
        lambda c: without if c is None else {**without, "cursor": c})


def refused_for_meaning_only(ctx: Any, response: Any, case: Any) -> None:
    """A request the document calls valid may be refused for what it means (a workflow
    the server does not have, arguments its constructor refuses: codes of their own), not
    for its form: then the document and the checks of the routes disagree.

    (schemathesis's ``positive_data_acceptance`` refuses every 422; this is it, narrowed.)
    """
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if response.status_code == 422 and response.json().get("code") == "validation":
        raise AssertionError("a request the OpenAPI document calls valid was refused for its "
                             f"form: {response.json().get('detail')}")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                 HealthCheck.function_scoped_fixture])
def test_api_conforms(case: Any, api: tuple[Any, str, list[str]]) -> None:
    _, token, _ = api
    stream = case.operation.path in _STREAMS
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"},
                           timeout=STREAM_SECONDS if stream else REQUEST_TIMEOUT,
                           excluded_checks=[positive_data_acceptance],
                           additional_checks=[refused_for_meaning_only])
