"""Auth of a real ``flow server``: every route but /health needs a live token of the right
scope; refusals say nothing of what exists; a token in a URL is refused; tokens are made
and revoked with ``flow token``, stored hashed; neither a token nor a secret reaches the
server's output or any answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agentainer_flow import (
    ExecutionMode,
    RetryPolicy,
    WorkflowClient,
    WorkflowNotRegisteredError,
    WorkflowVersionNotRegisteredError,
    step,
    workflow,
)
from agentainer_flow._remote import RemoteError
from tests.server.conftest import Stack, flow
from tests.server.server_workflows import MonitoredWorkflow, NeedsSecret

SECRET = "s3cr3t-value-for-the-leak-test"


@pytest.fixture
def server(sqlite_stack: Stack) -> Iterator[Stack]:
    yield sqlite_stack


def problem_of(response: httpx.Response) -> dict[str, object]:
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, object] = response.json()
    assert body["status"] == response.status_code and body["code"] and body["detail"]
    return body


def test_health_needs_no_token_and_everything_else_does(server: Stack) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    for method, path in [("GET", "/v1/executions"), ("POST", "/v1/executions/search"),
                         ("GET", "/v1/executions/x"), ("GET", "/v1/executions/x/events"),
                         ("GET", "/v1/events"), ("GET", "/v1/workflows"),
                         ("GET", "/openapi.json"), ("POST", "/v1/executions"),
                         ("GET", "/v1/tokens"),
                         # no such route, no such method: not told without a token
                         ("GET", "/v1/bogus"), ("DELETE", "/v1/executions"),
                         ("PUT", "/health/x")]:
        response = httpx.request(method, f"{server.url}{path}", json={})
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        assert problem_of(response)["code"] == "unauthorized"
    with server.http("read") as http:  # with one, they are what they are
        assert http.get("/v1/bogus").status_code == 404
        assert http.delete("/v1/executions").status_code == 405


def test_missing_wrong_malformed_and_revoked_tokens_get_the_same_answer(server: Stack) -> None:
    done = flow("token", "create", "--name", "short-lived", "--scope", "read",
                "--store", server.store)
    token = done.stdout.strip()
    url = f"{server.url}/v1/executions"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    flow("token", "revoke", "short-lived", "--store", server.store)
    answers = [
        httpx.get(url),
        httpx.get(url, headers={"Authorization": "Bearer afl_" + "x" * 43}),
        httpx.get(url, headers={"Authorization": "Bearer not-even-a-token"}),
        httpx.get(url, headers={"Authorization": f"Basic {token}"}),
        httpx.get(url, headers={"Authorization": f"Bearer {token}"}),  # revoked
    ]
    assert [a.status_code for a in answers] == [401] * 5
    assert len({a.text for a in answers}) == 1  # no hint of which case it was
    listed = flow("token", "list", "--json", "--store", server.store).stdout
    revoked = next(t for t in json.loads(listed) if t["name"] == "short-lived")
    assert revoked["revoked_at"] is not None and token not in listed


def test_a_read_only_token_reads_but_cannot_start_cancel_resume_or_retry(
        server: Stack) -> None:
    with server.http("write") as writer:
        started = writer.post("/v1/executions", json={"workflow": "data_workflow",
                                                      "mode": "sync"})
        assert started.status_code == 201, started.text
    execution_id = started.json()["id"]
    with server.http("read") as reader:
        assert reader.get(f"/v1/executions/{execution_id}").json()["status"] == "completed"
        assert reader.get("/v1/workflows").status_code == 200
        before = reader.get("/v1/executions", params={"limit": 1000}).json()["items"]
        refused = [
            reader.post("/v1/executions", json={"workflow": "data_workflow"}),
            reader.post(f"/v1/executions/{execution_id}/cancel", json={}),
            reader.post(f"/v1/executions/{execution_id}/resume", json={}),
            reader.post(f"/v1/executions/{execution_id}/retry", json={}),
            reader.post("/v1/executions/cancel", json={"ids": [execution_id]}),
            reader.get("/v1/tokens"),
        ]
    assert [r.status_code for r in refused] == [403] * len(refused)
    assert {problem_of(r)["code"] for r in refused} == {"forbidden"}
    with server.http("read") as reader:  # nothing was started, cancelled or retried
        after = reader.get("/v1/executions", params={"limit": 1000}).json()["items"]
    assert after == before


def test_a_token_in_a_query_string_is_refused(server: Stack) -> None:
    token = server.token("admin")
    for params in ({"access_token": token}, {"token": token}, {"api_key": token},
                   {"workflow": token}, {token: "1"}, {"token": "anything"}):
        for headers in ({}, {"Authorization": f"Bearer {token}"}):
            response = httpx.get(f"{server.url}/v1/executions", params=params,
                                 headers=headers)
            assert response.status_code == 400, params
            assert problem_of(response)["code"] == "token_in_query"
    assert httpx.get(f"{server.url}/health", params={"token": token}).status_code == 400


def test_tokens_are_shown_once_and_stored_hashed(server: Stack) -> None:
    made = json.loads(flow("token", "create", "--name", "ci", "--scope", "write", "--json",
                           "--store", server.store).stdout)
    token = made["token"]
    assert token.startswith("afl_") and len(token) >= len("afl_") + 43  # 32 random bytes
    again = flow("token", "create", "--name", "ci", "--store", server.store, check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    listed = flow("token", "list", "--store", server.store).stdout
    assert made["id"] in listed and made["prefix"] in listed and token not in listed
    path = server.store.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT hash, prefix, scope FROM flow_tokens WHERE id = ?",
                          (made["id"],)).fetchall()
    assert rows == [(hashlib.sha256(token.encode()).hexdigest(), made["prefix"], "write")]
    raw = b"".join(Path(path + suffix).read_bytes() for suffix in ("", "-wal")
                   if Path(path + suffix).exists())
    assert made["prefix"].encode() in raw and token.encode() not in raw


def test_tokens_through_the_api_need_admin(server: Stack) -> None:
    with server.http("admin") as admin:
        made = admin.post("/v1/tokens", json={"name": "from-api", "scope": "read"})
        assert made.status_code == 201
        token = made.json()["token"]
        listed = admin.get("/v1/tokens").text
        assert "from-api" in listed and token not in listed
        assert httpx.get(f"{server.url}/v1/workflows",
                         headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert admin.delete("/v1/tokens/from-api").json()["revoked_at"] is not None
    assert httpx.get(f"{server.url}/v1/workflows",
                     headers={"Authorization": f"Bearer {token}"}).status_code == 401
    with server.http("write") as writer:
        assert writer.post("/v1/tokens", json={"name": "x"}).status_code == 403


@workflow(name="data_workflow", version="7")
class DataWorkflowV7:
    """A version of ``data_workflow`` the server does not have."""

    @step(retry_policy=RetryPolicy(max_attempts=1))
    async def only(self, ctx: object) -> int:
        return 7


@workflow(name="not_on_the_server")
class NotOnTheServer:
    @step()
    async def only(self, ctx: object) -> int:
        return 0


def test_a_workflow_or_version_the_server_lacks_is_refused(server: Stack) -> None:
    async def run() -> None:
        async with WorkflowClient(api_url=server.url, api_token=server.token("write")) as c:
            with pytest.raises(WorkflowNotRegisteredError, match="no workflow named"):
                await c.run_workflow(NotOnTheServer(), ExecutionMode.ASYNC)
            with pytest.raises(WorkflowVersionNotRegisteredError, match="version '7'") as got:
                await c.run_workflow(DataWorkflowV7(), ExecutionMode.ASYNC)
            assert got.value.available == ("1",)
            with pytest.raises(RemoteError) as bad:
                await c.get_workflow_metrics("data_workflow", "soon")
            assert bad.value.status == 422 and bad.value.code == "validation"

    asyncio.run(run())


def test_a_bad_body_is_refused_without_echoing_it(server: Stack) -> None:
    with server.http("write") as writer:
        refused = writer.post("/v1/executions", json={
            "workflow": "needs_secret", "secrets": {"api_key": 987654321987},
            "tags": {"k": ["987654321987"]}})
        unknown = writer.post("/v1/executions", json={"workflow": "needs_secret",
                                                      "secretz": {"api_key": SECRET}})
    assert refused.status_code == 422 and problem_of(refused)["code"] == "validation"
    assert "987654321987" not in refused.text
    assert unknown.status_code == 422 and SECRET not in unknown.text


def test_no_token_or_secret_reaches_the_output_or_an_answer(server: Stack) -> None:
    tokens = [server.token(s) for s in ("read", "write", "admin")]
    texts = []
    with server.http("write") as writer:
        started = writer.post("/v1/executions", json={
            "workflow": "needs_secret", "secrets": {"api_key": SECRET}, "mode": "sync",
            "tags": {"team": "leaks"}})
        texts.append(started.text)
        execution_id = started.json()["id"]
        assert started.json()["result"] == len(SECRET)  # the worker got the secret
        # a tag holding the secret's value is refused, naming the secret, not the value
        leaked = writer.post("/v1/executions", json={
            "workflow": "needs_secret", "secrets": {"api_key": SECRET},
            "tags": {"where": f"x{SECRET}x"}})
        assert leaked.status_code == 422 and problem_of(leaked)["code"] == "secret_leak"
        texts.append(leaked.text)
        for path in ("", "/history", "/logs", "/state"):
            texts.append(writer.get(f"/v1/executions/{execution_id}{path}").text)
        with writer.stream("GET", f"/v1/executions/{execution_id}/events") as stream:
            texts.append("".join(stream.iter_text()))
        texts.append(writer.post(f"/v1/executions/{execution_id}/retry", json={
            "secrets": {"api_key": SECRET}}).text)
        texts.append(writer.post(f"/v1/executions/{execution_id}/resume", json={
            "secrets": {"api_key": SECRET}}).text)
        texts.append(writer.get("/v1/executions", params={"tag": "team=leaks"}).text)

    async def through_the_client() -> None:
        async with WorkflowClient(api_url=server.url, api_token=tokens[1]) as client:
            execution = await client.run_workflow(
                NeedsSecret(), ExecutionMode.SYNC, secrets={"api_key": SECRET})
            assert await execution.get_result() == len(SECRET)
            texts.append(repr(await client.get_history(execution.id)))
            texts.append(repr(client))
            failed = await client.run_workflow(MonitoredWorkflow(fail=True))
            assert await failed.status() == "failed"

    asyncio.run(through_the_client())
    shown = "\n".join(texts)
    assert "[secret:api_key]" in shown  # real answers, about the secret: naming, not holding it
    assert SECRET not in shown
    for token in tokens:
        assert token not in shown
    logs = server.log("server") + server.log("worker")
    assert "http_request" in logs and execution_id in logs  # the logs are real, and read
    for value in (SECRET, *tokens):
        assert value not in logs
