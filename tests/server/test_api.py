"""The ``/v1`` API of a real server (SQLite, a real worker beside it), through raw HTTP and
through the remote client: lists and pages, one execution with its steps, operating
(cancel, resume, retry, in bulk), workflows and their DAGs, errors as problems."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from agentainer_flow import (
    ExecutionBlockedError,
    ExecutionMode,
    ExecutionNotFoundError,
    IdempotencyConflictError,
    WorkflowClient,
    WorkflowFailedError,
)
from agentainer_flow._remote import RemoteError, RemoteWorkflowClient
from tests.server.conftest import Stack
from tests.server.server_workflows import MonitoredWorkflow, NeedsSecret, Ticker


def start(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    with stack.http("write") as http:
        response = http.post("/v1/executions", json=body)
    assert response.status_code == 201, response.text
    location = f"/v1/executions/{quote(response.json()['id'], safe='')}"
    assert response.headers["location"] == location
    started: dict[str, Any] = response.json()
    return started


def test_list_filters_and_pages(sqlite_stack: Stack) -> None:
    batch = uuid.uuid4().hex
    made = [start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync",
                                 "tags": {"batch": batch, "n": str(i)},
                                 "kwargs": {"fail": i == 3}})["id"] for i in range(7)]
    with sqlite_stack.http("read") as http:
        pages, cursor = [], None
        while True:
            params: dict[str, Any] = {"tag": f"batch={batch}", "limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = http.get("/v1/executions", params=params).json()
            pages.append([e["id"] for e in page["items"]])
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        assert [i for p in pages for i in p] == made[::-1]  # newest first, each once
        failed = http.get("/v1/executions", params={"tag": f"batch={batch}",
                                                    "status": "failed"}).json()
        assert [e["id"] for e in failed["items"]] == [made[3]]
        by_prefix = http.get("/v1/executions", params={"id_prefix": made[5][:13]}).json()
        assert made[5] in [e["id"] for e in by_prefix["items"]]
        searched = http.post("/v1/executions/search", json={
            "tags": {"batch": batch}, "statuses": ["completed"], "workflow": "data_workflow",
            "created_before": page_time(http, made[2])}).json()
        assert [e["id"] for e in searched["items"]] == [made[1], made[0]]
        bad = http.get("/v1/executions", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 422 and bad.json()["code"] == "validation"

    async def remote() -> list[str]:
        async with WorkflowClient(api_url=sqlite_stack.url,
                                  api_token=sqlite_stack.token("read")) as client:
            return [r.id for r in await client.list_executions(tags={"batch": batch},
                                                               limit=None)]

    assert asyncio.run(remote()) == made[::-1]


def page_time(http: httpx.Client, execution_id: str) -> str:
    created: str = http.get(f"/v1/executions/{execution_id}").json()["created_at"]
    return created


def test_one_execution_has_its_result_error_and_steps(sqlite_stack: Stack) -> None:
    ok = start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync"})
    assert ok["status"] == "completed" and ok["result"] == 43 and ok["result_tree"] == 43
    assert [(s["step"], s["status"], s["attempts"]) for s in ok["steps"]] == [
        ("load", "completed", 1), ("check", "completed", 1)]
    bad = start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync",
                               "kwargs": {"fail": True}})
    assert bad["status"] == "failed" and bad["failed_step"] == "check"
    assert bad["error_type"] == "ValueError" and "the check failed" in bad["error"]
    assert [s["status"] for s in bad["steps"]] == ["completed", "failed"]

    async def remote() -> None:
        async with WorkflowClient(api_url=sqlite_stack.url,
                                  api_token=sqlite_stack.token("read")) as client:
            assert await client.get_execution(ok["id"]).get_result() == 43
            with pytest.raises(WorkflowFailedError, match="the check failed") as failed:
                await client.get_execution(bad["id"]).get_result()
            assert failed.value.step == "check" and failed.value.error_type == "ValueError"
            with pytest.raises(ExecutionNotFoundError):
                await client.describe("no-such-execution")

    asyncio.run(remote())


def test_cancel_one_and_many(sqlite_stack: Stack) -> None:
    ids = [start(sqlite_stack, {"workflow": "ticker", "kwargs": {"ticks": 200}})["id"]
           for _ in range(3)]
    with sqlite_stack.http("write") as http:
        one = http.post(f"/v1/executions/{ids[0]}/cancel", json={"reason": "enough"})
        assert one.json() == {"execution_id": ids[0], "cancelled": True}
        many = http.post("/v1/executions/cancel", json={"ids": [ids[1], ids[2], "nope"]})
        results = many.json()["results"]
        assert [(r["id"], r["ok"]) for r in results] == [
            (ids[1], True), (ids[2], True), ("nope", False)]
        assert results[2]["code"] == "execution_not_found"
        ended = [http.get(f"/v1/executions/{i}", params={"wait": 60}).json() for i in ids]
        assert [e["status"] for e in ended] == ["cancelled"] * 3
        assert ended[0]["error"].startswith("cancelled")
        again = http.post(f"/v1/executions/{ids[0]}/cancel").json()
        assert again["cancelled"] is False  # it had ended


def test_retry_redoes_a_failed_execution_from_its_failed_step(sqlite_stack: Stack) -> None:
    failed = start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync",
                                  "kwargs": {"fail": True}})
    done = start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync"})
    with sqlite_stack.http("write") as http:
        retried = http.post(f"/v1/executions/{failed['id']}/retry", json={})
        assert retried.status_code == 201, retried.text
        new = http.get(f"/v1/executions/{retried.json()['id']}", params={"wait": 60}).json()
        history = http.get(f"/v1/executions/{new['id']}/history").json()["events"]
        before = http.get(f"/v1/executions/{failed['id']}/history").json()["events"]
        refused = http.post(f"/v1/executions/{done['id']}/retry", json={})
        many = http.post("/v1/executions/retry", json={"ids": [failed["id"], done["id"]]})
    assert new["tags"]["flow.forked_from"] == failed["id"]
    assert new["status"] == "failed" and new["failed_step"] == "check"  # it fails the same

    def load_done(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in events if e["type"] == "step_completed" and e["step"] == "load"]

    # load's result was reused (its events copied, the same instant), check ran again
    assert load_done(history) == [{**e, "execution_id": new["id"]} for e in load_done(before)]
    checks = [e for e in history if e["type"] == "step_started" and e["step"] == "check"]
    assert checks and checks[0]["timestamp"] > load_done(before)[0]["timestamp"]
    assert refused.status_code == 409 and refused.json()["code"] == "not_retryable"
    results = many.json()["results"]
    assert results[0]["ok"] and results[0]["execution_id"] not in (None, failed["id"])
    assert not results[1]["ok"] and results[1]["code"] == "not_retryable"


def test_a_blocked_execution_is_resumed_with_its_secret(sqlite_stack: Stack) -> None:
    async def run() -> None:
        async with WorkflowClient(api_url=sqlite_stack.url,
                                  api_token=sqlite_stack.token("write")) as client:
            execution = await client.run_workflow(NeedsSecret(), ExecutionMode.ASYNC)
            with pytest.raises(ExecutionBlockedError, match="api_key"):
                await execution.get_result(timeout=60)
            record = await execution.describe()
            assert record.status == "blocked"
            resumed = await client.resume(execution.id, secrets={"api_key": "late-key-123"})
            assert await resumed.get_result(timeout=60) == len("late-key-123")

    asyncio.run(run())
    assert "late-key-123" not in sqlite_stack.log("server")


def test_sync_mode_idempotency_and_state(sqlite_stack: Stack) -> None:
    key = uuid.uuid4().hex

    async def run() -> None:
        async with WorkflowClient(api_url=sqlite_stack.url,
                                  api_token=sqlite_stack.token("write")) as client:
            began = time.monotonic()
            first = await client.run_workflow(Ticker(ticks=3), ExecutionMode.SYNC,
                                              idempotency_key=key)
            assert await first.status() == "completed"  # SYNC waited for the end
            assert time.monotonic() - began >= 0.3
            again = await client.run_workflow(Ticker(ticks=3), ExecutionMode.ASYNC,
                                              idempotency_key=key)
            assert again.id == first.id
            with pytest.raises(IdempotencyConflictError, match=key):
                await client.run_workflow(Ticker(ticks=4), idempotency_key=key)
            quick = await client.run_workflow(Ticker(ticks=50), ExecutionMode.ASYNC)
            assert await quick.status() in ("pending", "running")  # ASYNC did not wait
            assert await quick.cancel()
            assert await quick.wait(timeout=60) == "cancelled"
            logs = await first.logs()
            assert [line.split()[-1] for line in logs if " tick " in line] == ["0", "1", "2"]
            assert await first.state() == {}
            assert [line async for line in client.stream_logs(first.id)] == logs

    asyncio.run(run())


def test_workflows_and_their_dags(sqlite_stack: Stack) -> None:
    with sqlite_stack.http("read") as http:
        workflows = {w["name"]: w for w in http.get("/v1/workflows").json()["workflows"]}
        one = http.get("/v1/workflows/my_workflow").json()
        missing = http.get("/v1/workflows/nope")
    seed = workflows["my_workflow"]
    assert seed == one and seed["order"] == ["fetch", "validate", "process", "aggregate"]
    steps = {s["name"]: s for s in seed["steps"]}
    assert steps["process"]["parallel"] and steps["process"]["max_workers"] == 5
    assert steps["aggregate"]["reduce"] and steps["aggregate"]["depends_on"] == ["process"]
    assert steps["fetch"]["timeout"] == 600
    assert {"data_workflow", "ticker", "needs_secret"} <= set(workflows)
    assert missing.status_code == 404 and missing.json()["code"] == "workflow_not_registered"


def test_the_openapi_document(sqlite_stack: Stack) -> None:
    with sqlite_stack.http("read") as http:
        document = http.get("/openapi.json").json()
    paths = document["paths"]
    for path in ("/v1/executions", "/v1/executions/search", "/v1/executions/{execution_id}",
                 "/v1/executions/{execution_id}/events", "/v1/events", "/v1/workflows",
                 "/v1/workflows/{name}/metrics", "/v1/executions/cancel", "/health"):
        assert path in paths, path
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    problem = paths["/v1/executions"]["post"]["responses"]["422"]["content"]
    assert "application/problem+json" in problem
    start_body = document["components"]["schemas"]["StartExecution"]["properties"]
    assert start_body["secrets"]["additionalProperties"]["format"] == "password"


def test_errors_of_the_client(sqlite_stack: Stack) -> None:
    async def run() -> None:
        wrong = RemoteWorkflowClient(sqlite_stack.url, "afl_" + "0" * 43)
        with pytest.raises(RemoteError) as refused:
            await wrong.describe("x")
        assert refused.value.status == 401 and refused.value.code == "unauthorized"
        gone = RemoteWorkflowClient("http://127.0.0.1:9", "afl_whatever")
        with pytest.raises(RemoteError, match="cannot reach") as unreachable:
            await gone.health()
        assert unreachable.value.code == "server_unavailable"
        reader = RemoteWorkflowClient(sqlite_stack.url, sqlite_stack.token("read"))
        with pytest.raises(RemoteError) as forbidden:
            await reader.run_workflow(MonitoredWorkflow())
        assert forbidden.value.status == 403

    asyncio.run(run())


def test_an_id_with_slashes_and_other_url_characters_is_reachable(sqlite_stack: Stack) -> None:
    """Ids are the caller's choice: one holding "/" (sent as %2F, which routing sees
    decoded), "?", "#", "%" or a space reaches its own execution on every route."""
    eid = f"team/{uuid.uuid4().hex[:8]}/a b?x#y%2Fz"
    started = start(sqlite_stack, {"workflow": "data_workflow", "mode": "sync",
                                   "execution_id": eid, "kwargs": {"fail": False}})
    assert started["id"] == eid and started["status"] == "completed"
    with sqlite_stack.http("read") as http:
        for suffix in ("", "/history", "/steps", "/state", "/audit"):
            response = http.get(f"/v1/executions/{quote(eid, safe='')}{suffix}")
            assert response.status_code == 200, (suffix, response.text)
        assert http.get(f"/v1/executions/{quote(eid, safe='')}").json()["id"] == eid

    async def run() -> None:
        remote = RemoteWorkflowClient(sqlite_stack.url, sqlite_stack.token("admin"))
        try:
            execution = remote.get_execution(eid)
            assert await execution.get_result() == started["result"]
            with sqlite_stack.http("read") as http:
                recorded = http.get(f"/v1/executions/{quote(eid, safe='')}/history").json()
            assert len(await remote.get_history(eid)) == len(recorded["events"])
            assert (await remote.describe(eid)).id == eid
            streamed = [ev async for ev in execution.stream_events()]
            assert len(streamed) == len(recorded["events"])
            assert await remote.cancel(eid) is False  # finished: nothing to cancel
            with pytest.raises(ExecutionNotFoundError):
                await remote.describe(eid.rsplit("/", 1)[0])
        finally:
            await remote.close()

    asyncio.run(run())
