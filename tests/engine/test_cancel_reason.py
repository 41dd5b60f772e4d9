"""A cancel asked by another process (``flow cancel --reason``, the API, another client)
records the caller's reason in the history of the process that runs the execution, whether
that process notices the cancel in an append or in the row, while nothing is appended."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.store import ExecutionStatus
from agentainer_flow.store.events import CancelRequested, ExecutionCancelled
from agentainer_flow.testing import mock_agent


@workflow(name="cancel_reason_busy")
class Busy:
    @step()
    async def deploys(self, ctx: Context) -> int:
        for i in range(2000):  # every deployment is appended: an append tells of the cancel
            await (await ctx.deploy_agent("quick-agent", f"img:{i}")).wait_for_completion()
        return 0


@workflow(name="cancel_reason_idle")
class Idle:
    @step()
    async def wait(self, ctx: Context) -> str:
        await asyncio.sleep(30)  # nothing appended: only the row can tell
        return "waited"


def _runtime() -> MockRuntime:
    registry = MockRegistry()
    mock_agent("quick-agent", registry=registry).returns({"ok": True}, delay=0.005)
    return MockRuntime(registry)


@pytest.mark.parametrize("workflow_class", [Busy, Idle], ids=["by-append", "by-row"])
async def test_a_cancel_asked_elsewhere_is_recorded_with_its_reason(
        tmp_path: Path, workflow_class: type) -> None:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url, runtime=_runtime()) as runs, \
            WorkflowClient(store=url, runtime="mock") as elsewhere:
        execution = await runs.run_workflow(workflow_class(), mode=ExecutionMode.ASYNC)
        await asyncio.sleep(0.3)
        assert await elsewhere.cancel(execution.id, reason="over budget")
        await asyncio.wait_for(execution.wait(), 10)
        record = await runs.describe(execution.id)
        events = [stored.event for stored in await runs.store.load(execution.id)]
    assert record.status is ExecutionStatus.CANCELLED
    asked = [e.reason for e in events if isinstance(e, CancelRequested)]
    ended = [e.reason for e in events if isinstance(e, ExecutionCancelled)]
    assert asked == ["over budget"] and ended == ["over budget"]
    assert record.error == "cancelled: over budget"


async def test_a_secret_this_process_holds_is_not_stored_in_a_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url, runtime=_runtime()) as runs:
        execution = await runs.run_workflow(Idle(), mode=ExecutionMode.ASYNC,
                                            secrets={"api_key": "sk-live-abcdef123456"})
        await asyncio.sleep(0.3)
        assert await runs.cancel(execution.id, reason="leaked sk-live-abcdef123456 in a log")
        await asyncio.wait_for(execution.wait(), 10)
        record = await runs.describe(execution.id)
        events = [stored.event for stored in await runs.store.load(execution.id)]
    assert "sk-live-abcdef123456" not in (record.cancel_reason or "")
    assert "sk-live-abcdef123456" not in str(events) + (record.error or "")
    assert "[secret:api_key]" in (record.cancel_reason or "")


async def test_a_client_without_the_secret_redacts_it_with_the_stored_secrets(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client that cancels does not hold the execution's secret; with the key the
    execution's secrets are kept under (``FLOW_SECRETS_KEY``), it reads them from the row
    and redacts the reason before storing it."""
    from cryptography.fernet import Fernet

    monkeypatch.setenv("FLOW_SECRETS_KEY", Fernet.generate_key().decode())
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    secret = "tok-9f8e7d6c5b4a"
    async with WorkflowClient(store=url, runtime=_runtime()) as runs:
        execution = await runs.run_workflow(Idle(), mode=ExecutionMode.ASYNC,
                                            secrets={"api_key": secret})
        await asyncio.sleep(0.3)
        record = await runs.describe(execution.id)
        assert record.secrets and secret.encode() not in record.secrets
    # the process that held the secret is gone; another client asks for the cancel
    del runs
    import gc

    gc.collect()  # the first client's redactors no longer live in this process
    from agentainer_flow.engine.secrets import redact_known

    assert redact_known(secret) == secret, "the secret must not be known in this process"
    async with WorkflowClient(store=url, runtime="mock") as elsewhere:
        assert await elsewhere.cancel(execution.id, reason=f"rotated {secret} today")
        record = await elsewhere.describe(execution.id)
    assert record.cancel_reason == "rotated [secret:api_key] today"


async def test_a_secret_in_a_flow_secret_variable_is_redacted_from_a_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_SECRET_DEPLOY_TOKEN", "dt-0123456789ab")
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    async with WorkflowClient(store=url, runtime=_runtime()) as runs:
        execution = await runs.run_workflow(Idle(), mode=ExecutionMode.ASYNC)
        await asyncio.sleep(0.2)
        assert await runs.cancel(execution.id, reason="token dt-0123456789ab expired")
        await asyncio.wait_for(execution.wait(), 10)
        record = await runs.describe(execution.id)
    assert record.cancel_reason == "token [secret:deploy_token] expired"
