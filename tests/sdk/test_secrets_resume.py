"""A resumed execution finds its secrets: given again, from FLOW_SECRET_<NAME>, or from the
store where they are encrypted at rest with FLOW_SECRETS_KEY; never in clear on disk."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from agentainer_flow import Context, ExecutionBlockedError, WorkflowClient, step, workflow
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.testing import mock_agent

SECRET = "sk-live-9f8e7d6c5b4a"


@workflow(name="secret_resume")
class UsesSecret:
    @step()
    async def call(self, ctx: Context) -> str:
        agent = await ctx.deploy_agent("caller", "c:1", env={"TOKEN": ctx.secrets["token"]})
        return (await agent.wait_for_completion())["seen"]


def runtime() -> MockRuntime:
    reg = MockRegistry()
    mock_agent("caller", registry=reg).returns(
        lambda call: {"seen": "ok" if call.env["TOKEN"] == SECRET else "wrong"})
    return MockRuntime(reg)


async def start_only(url: str) -> str:
    """Record an execution with a secret, as a process that died right after would."""
    async with WorkflowClient(store=url, runtime=runtime()) as client:
        record, _ = await client.engine.start(UsesSecret(), secrets={"token": SECRET})
        return record.id


async def test_missing_secret_blocks_resume_without_losing_anything(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOW_SECRETS_KEY", raising=False)
    eid = await start_only(sqlite_url)
    async with WorkflowClient(store=sqlite_url, runtime=runtime()) as client:
        with pytest.raises(ExecutionBlockedError, match="token"):
            await client.resume(eid)
        assert str(await client.get_workflow_status(eid)) == "blocked"
        assert "waiting for secret 'token'" in ((await client.describe(eid)).error or "")
        execution = await client.resume(eid, secrets={"token": SECRET})
        assert await execution.get_result() == "ok"


async def test_secret_from_environment(sqlite_url: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOW_SECRETS_KEY", raising=False)
    eid = await start_only(sqlite_url)
    monkeypatch.setenv("FLOW_SECRET_TOKEN", SECRET)
    async with WorkflowClient(store=sqlite_url, runtime=runtime()) as client:
        assert await (await client.resume(eid)).get_result() == "ok"


async def test_secret_encrypted_at_rest(sqlite_url: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_SECRETS_KEY", Fernet.generate_key().decode())
    eid = await start_only(sqlite_url)
    async with WorkflowClient(store=sqlite_url, runtime=runtime()) as client:
        execution = await client.resume(eid)
        assert await execution.get_result() == "ok"
        history = await execution.history()
    assert all(SECRET not in repr(e.to_dict()) for e in history)
    assert not _files_containing(tmp_path, SECRET.encode())


def _files_containing(folder: Path, needle: bytes) -> list[Path]:
    return [f for f in folder.glob("flow.db*") if needle in f.read_bytes()]


async def test_a_resume_that_cannot_run_does_not_leave_waiters_hanging(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOW_SECRETS_KEY", raising=False)
    eid = await start_only(sqlite_url)
    async with WorkflowClient(store=sqlite_url, runtime=runtime()) as client:
        [execution] = await client.recover()  # no secret anywhere: this run cannot start
        with pytest.raises(ExecutionBlockedError):
            await asyncio.wait_for(execution.get_result(), 10)
        execution = await client.resume(eid, secrets={"token": SECRET})
        assert await execution.get_result() == "ok"
