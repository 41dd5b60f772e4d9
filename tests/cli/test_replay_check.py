"""The pre-deploy gate: ``flow replay --check -m FILE`` and ``check_replay(store, module)``
over a store holding 50 unfinished executions of two workflows (and a few others).

The executions are made in this process on the mock runtime: each runs its first step (an
agent) and then sleeps for an hour, so it is suspended in the store, unfinished. The new
code renames the agent of one workflow: exactly the executions of that workflow that
recorded the agent must be reported.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow._replay_check import check_replay
from agentainer_flow.engine.runtimes.mock import MockAgent, MockRegistry, MockRuntime

from . import workflows_for_check
from .flowcli import Flow
from .workflows_for_check import Alpha, Beta

CODE = Path(workflows_for_check.__file__)


@workflow(name="check_gamma")
class Gamma:
    """A workflow the checked code does not define."""

    @step()
    async def wait(self, ctx: Context) -> None:
        await ctx.sleep("1h")


async def _populate(url: str) -> dict[str, list[str]]:
    registry = MockRegistry()
    MockAgent("*", registry).returns({"ok": True})
    made: dict[str, list[str]] = {k: [] for k in
                                  ("alpha", "beta", "alpha_pending", "alpha_done", "gamma")}
    async with WorkflowClient(store=url, runtime=MockRuntime(registry)) as client:
        client.engine.suspend_after = 0.5  # a long sleep lets the execution go
        for i in range(20):
            made["alpha"].append((await client.run_workflow(Alpha(i), ExecutionMode.ASYNC)).id)
            made["beta"].append((await client.run_workflow(Beta(i), ExecutionMode.ASYNC)).id)
        for i in range(10):  # recorded for a queue nobody serves: nothing ran yet
            made["alpha_pending"].append((await client.run_workflow(
                Alpha(100 + i), ExecutionMode.ASYNC, queue="nobody")).id)
        for i in range(3):
            made["alpha_done"].append((await client.run_workflow(
                Alpha(200 + i, nap="0s"), ExecutionMode.SYNC)).id)
        for _ in range(2):
            made["gamma"].append((await client.run_workflow(Gamma(), ExecutionMode.ASYNC)).id)
        for _ in range(600):
            if not client.engine.tasks:
                break
            await asyncio.sleep(0.05)
        assert not client.engine.tasks, "the executions did not suspend"
        rows = await client.list_executions(limit=None)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r.status.value] = by_status.get(r.status.value, 0) + 1
    assert by_status == {"running": 42, "pending": 10, "completed": 3}, by_status
    return made


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Flow, dict[str, list[str]]]:
    flow = Flow(tmp_path_factory.mktemp("check"))
    return flow, asyncio.run(_populate(flow.store))


@pytest.fixture(scope="module")
def edited(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The new code: check_alpha's agent renamed, check_beta unchanged."""
    source = CODE.read_text()
    assert source.count('name="fetcher"') == 1
    path = tmp_path_factory.mktemp("code") / "workflows_v2.py"
    path.write_text(source.replace('name="fetcher"', 'name="fetcher-v2"'))
    return path


async def _rows(url: str) -> list[tuple[str, int, str]]:
    async with WorkflowClient(store=url, runtime="mock") as client:
        return sorted((r.id, r.last_seq, r.status.value)
                      for r in await client.list_executions(limit=None))


def test_check_lists_the_executions_the_new_code_breaks(
        store: tuple[Flow, dict[str, list[str]]], edited: Path) -> None:
    flow, made = store
    before = asyncio.run(_rows(flow.store))
    as_json, shown = flow.many(["replay", "--check", "-m", str(edited), "--json"],
                               ["replay", "--check", "-m", str(edited)])
    assert as_json.code == 1 and shown.code == 1, (as_json, shown)
    body: dict[str, Any] = as_json.json()
    assert body["ok"] is False
    assert body["checked"] == 50  # 20 + 10 alpha, 20 beta; not the finished ones
    assert sorted(b["execution_id"] for b in body["broken"]) == sorted(made["alpha"])
    for broken in body["broken"]:
        assert broken["workflow"] == "check_alpha" and broken["step"] == "fetch"
        assert "name='fetcher'" in broken["recorded"]
        assert "name='fetcher-v2'" in broken["actual"]
        assert broken["error_type"] == "NonDeterminismError"
    assert sorted(s["execution_id"] for s in body["skipped"]) == sorted(made["gamma"])

    assert shown.out.splitlines()[0].startswith("BROKEN: 20 of the 50 executions")
    listed = [line.split()[0] for line in shown.out.splitlines()[2:]]
    assert sorted(listed) == sorted(made["alpha"])
    assert "fetcher-v2" in shown.out
    assert "skipped 2 executions" in shown.err and "check_gamma (2)" in shown.err
    assert asyncio.run(_rows(flow.store)) == before  # nothing was written


def test_check_passes_the_unchanged_code_and_narrows(
        store: tuple[Flow, dict[str, list[str]]], edited: Path) -> None:
    flow, made = store
    same, beta_only, pending_only, gamma, sampled = flow.many(
        ["replay", "--check", "-m", str(CODE)],
        ["replay", "--check", "-m", str(edited), "--workflow", "check_beta", "--json"],
        ["replay", "--check", "-m", str(edited), "--status", "pending", "--json"],
        ["replay", "--check", "-m", str(edited), "--workflow", "check_gamma", "--json"],
        ["replay", "--check", "-m", str(edited), "--sample", "3", "--json"],
    )
    assert same.code == 0 and same.out.startswith("OK: the 50 executions checked"), same
    assert beta_only.code == 0 and beta_only.json()["checked"] == 20, beta_only
    assert pending_only.code == 0, pending_only  # nothing of them ran: nothing to break
    assert pending_only.json()["checked"] == 10
    # asked for by name, a workflow the code lacks is reported: the code could not run it
    assert gamma.code == 1, gamma
    assert sorted(b["execution_id"] for b in gamma.json()["broken"]) == sorted(made["gamma"])
    assert "does not define workflow 'check_gamma'" in gamma.json()["broken"][0]["error"]
    # with a sample of finished ones, the completed alpha executions are checked too
    assert sampled.code == 1, sampled
    assert sampled.json()["checked"] == 53
    assert sorted(b["execution_id"] for b in sampled.json()["broken"]) == sorted(
        made["alpha"] + made["alpha_done"])


async def test_check_replay_from_python(store: tuple[Flow, dict[str, list[str]]],
                                        edited: Path) -> None:
    flow, made = store
    report = await check_replay(flow.store, str(edited))
    assert not report.ok and report.checked == 50
    assert sorted(b.execution_id for b in report.broken) == sorted(made["alpha"])
    assert {(b.workflow, b.step) for b in report.broken} == {("check_alpha", "fetch")}
    assert all("fetcher-v2" in (b.actual or "") for b in report.broken)
    with pytest.raises(AssertionError, match="20 of 50 executions would break"):
        report.assert_ok()
    unchanged = await check_replay(flow.store, workflows_for_check, workflow="check_alpha")
    assert unchanged.ok and unchanged.checked == 30
    unchanged.assert_ok()
    picked = await check_replay(flow.store, [workflows_for_check], statuses=["completed"])
    assert picked.ok and picked.checked == 3


async def test_an_execution_of_a_version_the_code_lacks_is_checked_and_broken(
        tmp_path: Path) -> None:
    """Running on version 1; the new code declares only version 2: the gate counts it
    among those checked, and broken, with the error a resume would raise."""
    from agentainer_flow import ExecutionMode, WorkflowClient, WorkflowVersionNotRegisteredError

    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    for folder, version in ((v1, "1"), (v2, "2")):
        folder.mkdir()
        (folder / "versioned_gate.py").write_text(
            "from agentainer_flow import Context, step, workflow\n"
            f"@workflow(name='versioned_gate', version='{version}')\n"
            "class Gate:\n"
            "    @step()\n"
            "    async def wait(self, ctx: Context) -> int:\n"
            "        await ctx.sleep('1h')\n"
            "        return 1\n")
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    import importlib.util

    spec = importlib.util.spec_from_file_location("versioned_gate_v1", v1 / "versioned_gate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    async with WorkflowClient(store=url) as client:
        ex = await client.run_workflow(module.Gate(), ExecutionMode.ASYNC)
        await asyncio.sleep(0.3)
    report = await check_replay(url, str(v2 / "versioned_gate.py"))
    assert report.checked == 1 and len(report.broken) == 1, report.to_dict()
    [broken] = report.broken
    assert broken.execution_id == ex.id
    assert isinstance(broken.error, WorkflowVersionNotRegisteredError)
    assert report.to_dict()["broken"][0]["error_type"] == "WorkflowVersionNotRegisteredError"
