"""The seed's sections 2 and 8 against a real ``flow server`` with a ``flow worker``.

The seed's code runs as written but for the URL, the token and the workflow module: the
server and the worker load the seed's ``DataWorkflow`` (its agents are local commands of the
process runtime) and the ``data_workflow`` that section 8 watches. Then what the seed
printed is checked against what the server recorded, and the server's and worker's output
and every answer are searched for the token and the secret.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import AgentResult, ExecutionMode, WorkflowClient
from tests.sdk.seed_workflows import DataWorkflow  # the seed's class, verbatim
from tests.server.conftest import SEED_SECRET, Stack, process_env
from tests.server.server_workflows import MonitoredWorkflow

CONFIG = {"source_url": "https://api.example.com/data", "output_path": "s3://bucket/output"}


def run_section_2(api_url: str, token: str) -> None:
    """Section 2, as the seed writes it (``api_url`` and ``api_token`` are the test's)."""
    from agentainer_flow import WorkflowClient, ExecutionMode  # noqa: I001 - the seed's import

    # Initialize client
    client = WorkflowClient(
        api_url=api_url,
        api_token=token
    )

    # Create and run workflow
    async def main():  # type: ignore[no-untyped-def]
        # Define workflow configuration
        config = {
            "source_url": "https://api.example.com/data",
            "output_path": "s3://bucket/output"
        }

        # Create workflow instance
        wf = DataWorkflow(config)

        # Execute workflow
        execution = await client.run_workflow(
            workflow=wf,
            mode=ExecutionMode.ASYNC,
            secrets={"api_key": "secret-key"},
            tags={"team": "data-eng", "priority": "high"}
        )

        # Monitor execution
        async for event in execution.stream_events():
            print(f"[{event.timestamp}] {event.step}: {event.message}")

        # Get final result
        result = await execution.get_result()
        print(f"Workflow completed: {result}")

    # Run
    import asyncio
    asyncio.run(main())


def run_section_8(until: int) -> list[Any]:
    """Section 8, as the seed writes it, with ``$AGENTAINER_API_URL``/``_TOKEN`` set. Its
    event stream never ends: the test stops after ``until`` events (and returns them)."""
    seen: list[Any] = []

    async def section_8() -> None:
        from agentainer_flow import WorkflowClient

        client = WorkflowClient()

        # Get workflow metrics
        metrics = await client.get_workflow_metrics(
            workflow_name="data_workflow",
            time_range="24h"
        )

        print(f"Total executions: {metrics.total_executions}")
        print(f"Success rate: {metrics.success_rate}%")
        print(f"Average duration: {metrics.avg_duration}")

        # Stream workflow events
        async for event in client.stream_workflow_events(
            workflow_name="data_workflow",
            event_types=["step_started", "step_completed", "workflow_failed"]
        ):
            print(f"{event.timestamp}: {event.type} - {event.details}")
            seen.append(event)  # the test's: stop once every expected event came
            if len(seen) >= until:
                break

    asyncio.run(asyncio.wait_for(section_8(), 120))
    return seen


def answers(stack: Stack, execution_id: str) -> str:
    """Everything the API answers about an execution, as text."""
    with stack.http("read") as http:
        paths = ["", "/history", "/logs", "/state"]
        texts = [http.get(f"/v1/executions/{execution_id}{p}").text for p in paths]
        texts.append(http.get("/v1/executions", params={"limit": 1000}).text)
        with http.stream("GET", f"/v1/executions/{execution_id}/events") as stream:
            texts.append("".join(stream.iter_text()))
    return "\n".join(texts)


def test_seed_section_2_against_a_server(stack: Stack, capsys: pytest.CaptureFixture[str],
                                         ) -> None:
    token = stack.token("write")
    run_section_2(stack.url, token)
    printed = capsys.readouterr().out.splitlines()

    async def recorded() -> tuple[Any, ...]:
        async with WorkflowClient(api_url=stack.url, api_token=token) as client:
            [found] = await client.list_executions(tags={"team": "data-eng"})
            execution = client.get_execution(found.id)
            return (found, await client.get_history(found.id), await execution.get_result(),
                    await execution.state(), await execution.logs())

    record, history, result, state, logs = asyncio.run(recorded())
    assert record.tags == {"team": "data-eng", "priority": "high"}
    assert record.workflow_name == "my_workflow" and record.status == "completed"
    # the stream printed every event, in order, once
    assert printed[:-1] == [f"[{e.timestamp}] {e.step}: {e.message}" for e in history]
    assert history[-1].type == "workflow_completed"
    # the result came back as the type the workflow returned
    assert isinstance(result, AgentResult)
    assert result.output == {"chunks": 5, "chunk_ids": [0, 1, 2, 3, 4],
                             "output_path": CONFIG["output_path"]}
    assert printed[-1] == f"Workflow completed: {result}"
    assert state == {"raw_data": "/data/api.example.com_data.json", "processed_chunks": 5}
    # the fetcher got the secret (its digest matched), which the history only names
    fetched = next(e for e in history if e.type == "agent_completed"
                   and e.details["output"].get("source_url"))
    assert fetched.details["output"]["has_key"] is True
    deploy = next(e for e in history if e.type == "agent_deploy_requested"
                  and e.details["name"] == "fetcher")
    assert deploy.details["env"]["API_KEY"] == "[secret:api_key]"
    # neither the secret nor the token is in any answer or in the processes' output
    shown = answers(stack, record.id) + "\n".join(logs) + repr(history)
    stack.stop()
    for text in (shown, stack.log("server"), stack.log("worker")):
        assert SEED_SECRET not in text
        assert token not in text
    assert "http_request" in stack.log("server")  # the access log was written (and read)


def test_seed_section_8_against_a_server(stack: Stack, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    token = stack.token("write")

    async def start() -> list[str]:
        async with WorkflowClient(api_url=stack.url, api_token=token) as client:
            ok = await client.run_workflow(MonitoredWorkflow(), ExecutionMode.SYNC)
            bad = await client.run_workflow(MonitoredWorkflow(fail=True), ExecutionMode.SYNC)
            assert await ok.status() == "completed" and await bad.status() == "failed"
            return [ok.id, bad.id]

    ids = asyncio.run(start())
    monkeypatch.setenv("AGENTAINER_API_URL", stack.url)
    monkeypatch.setenv("AGENTAINER_API_TOKEN", token)
    wanted = ("step_started", "step_completed", "workflow_failed")

    async def histories() -> list[Any]:
        async with WorkflowClient() as client:  # from the environment, as in section 8
            return [e for i in ids for e in await client.get_history(i) if e.type in wanted]

    expected = asyncio.run(histories())
    seen = run_section_8(until=len(expected))
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == ["Total executions: 2", "Success rate: 50.0%",
                           printed[2]]
    assert float(printed[2].removeprefix("Average duration: ")) > 0
    assert sorted((e.execution_id, e.seq) for e in seen) == sorted(
        (e.execution_id, e.seq) for e in expected)
    assert printed[3:] == [f"{e.timestamp}: {e.type} - {e.details}" for e in seen]
    failed = [e for e in seen if e.type == "workflow_failed"]
    assert len(failed) == 1 and "the check failed" in json.dumps(failed[0].details)


BREAKS_OUT = """
import asyncio
from agentainer_flow import WorkflowClient

client = WorkflowClient()

async def main():
    n = 0
    async for event in client.stream_workflow_events(workflow_name="data_workflow"):
        n += 1
        if n >= 2:
            break
    async for event in client.get_execution(EXECUTION).stream_events():
        break
    print("stopped")

asyncio.run(main())
"""


def test_breaking_out_of_a_remote_stream_ends_quietly(stack: Stack, tmp_path: Path) -> None:
    """A caller that breaks out of the remote client's streams and lets ``asyncio.run``
    end (as section 8 does once it has seen enough) gets no errors on stderr: the streams
    close their connections without async generators closing each other at shutdown."""
    token = stack.token("write")

    async def start() -> str:
        async with WorkflowClient(api_url=stack.url, api_token=token) as client:
            done = await client.run_workflow(MonitoredWorkflow(), ExecutionMode.SYNC)
            return done.id

    execution_id = asyncio.run(start())
    script = tmp_path / "breaks_out.py"
    script.write_text(BREAKS_OUT.replace("EXECUTION", repr(execution_id)))
    for _ in range(2):
        ran = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                             timeout=60, env=process_env(AGENTAINER_API_URL=stack.url,
                                                         AGENTAINER_API_TOKEN=token))
        assert ran.returncode == 0 and ran.stdout.strip() == "stopped", ran.stderr
        assert ran.stderr == "", ran.stderr
