"""Live streams of a real ``flow server``: a reader whose connection is cut in the middle
reconnects with ``Last-Event-ID`` and ends up with exactly the history, nothing missed and
nothing twice; the same across executions, and for the remote client across a restart of
the server."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from agentainer_flow import ExecutionEvent, ExecutionMode, WorkflowClient
from tests.server.conftest import Stack
from tests.server.server_workflows import Ticker


def read_sse(http: httpx.Client, path: str, *, last_id: str | None = None,
             params: Any = None, stop_after: int | None = None,
             ) -> tuple[list[tuple[str | None, dict[str, Any]]], bool]:
    """The messages ``(id, data)`` of a stream, read until its ``end`` (then ``True``) or
    until ``stop_after`` messages, when the connection is dropped (then ``False``)."""
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got: list[tuple[str | None, dict[str, Any]]] = []
    event, event_id, data = "message", None, []
    with http.stream("GET", path, headers=headers, params=params,
                     timeout=httpx.Timeout(30, read=60)) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                elif name == "id":
                    event_id = value
                continue
            if event == "end":
                return got, True
            got.append((event_id, json.loads("\n".join(data))))
            event, event_id, data = "message", None, []
            if stop_after is not None and len(got) >= stop_after:
                return got, False  # leaving the block drops the connection
    return got, False


def start_ticker(stack: Stack, ticks: int = 20, pause: str = "100ms") -> str:
    with stack.http("write") as http:
        started = http.post("/v1/executions", json={
            "workflow": "ticker", "kwargs": {"ticks": ticks, "pause": pause}})
        assert started.status_code == 201, started.text
        execution_id: str = started.json()["id"]
        return execution_id


def history_of(stack: Stack, execution_id: str) -> list[dict[str, Any]]:
    with stack.http("read") as http:
        events: list[dict[str, Any]] = http.get(
            f"/v1/executions/{execution_id}/history").json()["events"]
        return events


def test_a_cut_event_stream_resumes_after_the_last_event_id(stack: Stack) -> None:
    execution_id = start_ticker(stack)
    path = f"/v1/executions/{execution_id}/events"
    with stack.http("read") as http:
        first, ended = read_sse(http, path, stop_after=12)
        assert not ended
        status = http.get(f"/v1/executions/{execution_id}").json()["status"]
        assert status in ("pending", "running")  # cut while it ran
        last_id = first[-1][0]
        assert last_id == str(first[-1][1]["seq"])
        rest, ended = read_sse(http, path, last_id=last_id)
        assert ended
    seen = [data for _, data in first + rest]
    history = history_of(stack, execution_id)
    assert history[-1]["type"] == "workflow_completed"
    assert [e["seq"] for e in seen] == list(range(1, len(history) + 1))  # none missed or twice
    assert seen == history
    assert [i for i, _ in first + rest] == [str(e["seq"]) for e in history]


def test_the_log_stream_is_the_logs_and_resumes_too(sqlite_stack: Stack) -> None:
    execution_id = start_ticker(sqlite_stack, ticks=10, pause="50ms")
    path = f"/v1/executions/{execution_id}/logs"
    with sqlite_stack.http("read") as http:
        first, _ = read_sse_lines(http, path, stop_after=3)
        rest, ended = read_sse_lines(http, path, last_id=first[-1][0])
        assert ended
        lines = http.get(path).json()["lines"]
    assert [line for _, chunk in first + rest for line in chunk] == lines
    assert [line.rsplit(" ", 2)[-2:] for line in lines if line.split()[-2] == "tick"] == [
        ["tick", str(i)] for i in range(10)]


def read_sse_lines(http: httpx.Client, path: str, *, last_id: str | None = None,
                   stop_after: int | None = None) -> tuple[list[tuple[str, list[str]]], bool]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    got: list[tuple[str, list[str]]] = []
    event, event_id, data = "message", "", []
    with http.stream("GET", path, params={"follow": "1"}, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith(":"):
                continue
            if line:
                name, _, value = line.partition(": ")
                if name == "data":
                    data.append(value)
                elif name == "event":
                    event = value
                elif name == "id":
                    event_id = value
                continue
            if event == "end":
                return got, True
            got.append((event_id, data))
            event, event_id, data = "message", "", []
            if stop_after is not None and len(got) >= stop_after:
                return got, False
    return got, False


def test_the_stream_across_executions_resumes_after_a_cut(sqlite_stack: Stack) -> None:
    stack = sqlite_stack
    since = time.time()
    ids = [start_ticker(stack, ticks=6, pause="30ms") for _ in range(3)]
    with stack.http("read") as http:
        params = {"workflow": "ticker", "since": _iso(since), "follow": "true"}
        # live, while the three run, cut twice
        first, _ = read_sse(http, "/v1/events", params=params, stop_after=10)
        second, _ = read_sse(http, "/v1/events", params=params, last_id=first[-1][0],
                             stop_after=10)
        for execution_id in ids:  # all three end
            http.get(f"/v1/executions/{execution_id}", params={"wait": 60})
        params["follow"] = "false"
        rest, ended = read_sse(http, "/v1/events", params=params, last_id=second[-1][0])
        assert ended
        # and the typed filter, in one go
        completed, _ = read_sse(http, "/v1/events", params={
            **params, "type": ["workflow_completed", "step_started"]}, last_id=None)
    seen = [(d["execution_id"], d["seq"]) for _, d in first + second + rest]
    expected = [(i, e["seq"]) for i in ids for e in history_of(stack, i)]
    assert len(seen) == len(set(seen))  # nothing twice
    assert sorted(seen) == sorted(expected)  # nothing missed
    ids_sent = [event_id for event_id, _ in first + second + rest]
    assert ids_sent == sorted(ids_sent, key=_position)  # one order, which ids resume in
    assert sorted((d["execution_id"], d["type"]) for _, d in completed) == sorted(
        [(i, "step_started") for i in ids] + [(i, "workflow_completed") for i in ids])


def _position(event_id: str | None) -> tuple[float, str, int]:
    assert event_id is not None
    head, _, rest = event_id.partition(":")
    execution_id, _, seq = rest.rpartition(":")
    return float(head), execution_id, int(seq)


def _iso(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


def test_the_remote_client_follows_an_execution_across_a_server_restart(
        sqlite_stack: Stack) -> None:
    stack = sqlite_stack

    async def follow() -> tuple[list[ExecutionEvent], str]:
        async with WorkflowClient(api_url=stack.url, api_token=stack.token("write")) as client:
            execution = await client.run_workflow(Ticker(ticks=30, pause="100ms"),
                                                  ExecutionMode.ASYNC)
            seen = []
            async for event in execution.stream_events():
                seen.append(event)
                if len(seen) == 10:  # the server dies, and comes back on its port
                    stack.kill_server()
                    await asyncio.to_thread(stack.start_server)
            assert await execution.get_result() == 30
            return seen, execution.id

    seen, execution_id = asyncio.run(asyncio.wait_for(follow(), 120))
    history = history_of(stack, execution_id)
    assert [e.seq for e in seen] == [e["seq"] for e in history]
    assert [e.type for e in seen] == [e["type"] for e in history]
    assert seen[-1].type == "workflow_completed"
