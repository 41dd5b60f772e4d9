"""Workflow versions: an execution runs on the code of the version it was started on.

Version 1 of ``versions_report`` is defined here (the code that was deployed); version 2,
with other steps, is a module file written next to the test and imported mid-test, as a
new deployment would. An execution started on v1 and stopped mid-way resumes on v1's code
while new executions run v2; a process that has only v2 leaves the v1 execution as it is.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from agentainer_flow import (
    Context,
    ExecutionMode,
    ExecutionStatus,
    Worker,
    WorkflowClient,
    WorkflowNotRegisteredError,
    WorkflowVersionNotRegisteredError,
    step,
    workflow,
)
from agentainer_flow._loading import SOURCE_TAG, ensure_registered, import_file
from agentainer_flow.engine import spec as spec_module
from agentainer_flow.engine.spec import (
    get_workflow_spec,
    get_workflow_version,
    registered_workflows,
    workflow_versions,
)
from agentainer_flow.store import ExecutionRecord, create_store
from agentainer_flow.store.events import encode_event

CALLS: list[str] = []


class Gate:
    """Holds a step until the test opens it; ``reached`` tells the step got there."""

    current: Gate | None = None

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.open = asyncio.Event()

    async def pass_through(self) -> None:
        self.reached.set()
        await self.open.wait()


async def hold() -> None:
    gate = Gate.current
    if gate is not None:
        await gate.pass_through()


@workflow(name="versions_report", version="1")
class ReportV1:
    """Version 1, as deployed when the first executions started."""

    def __init__(self, title: str) -> None:
        self.title = title

    @step()
    async def draft(self, ctx: Context) -> str:
        CALLS.append("v1.draft")
        ctx.state["draft"] = f"{self.title} (v1)"
        return f"{self.title}: draft"

    @step(depends_on="draft")
    async def review(self, ctx: Context, draft_result: str) -> str:
        CALLS.append("v1.review")
        await hold()
        return f"{draft_result}, reviewed by v1"


V2_SOURCE = '''
"""Version 2 of versions_report: other steps after ``draft``."""

from agentainer_flow import Context, step, workflow

CALLS: list[str] = []


@workflow(name="versions_report", version="2")
class Report:
    def __init__(self, title: str) -> None:
        self.title = title

    @step()
    async def draft(self, ctx: Context) -> str:
        CALLS.append("v2.draft")
        return f"{self.title}: draft"

    @step(depends_on="draft")
    async def check(self, ctx: Context, draft_result: str) -> str:
        CALLS.append("v2.check")
        return f"{draft_result}, checked"

    @step(depends_on="check")
    async def publish(self, ctx: Context, check_result: str) -> str:
        CALLS.append("v2.publish")
        return f"{check_result}, published by v2"
'''


@pytest.fixture
def v2_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The v2 module, always at one path so that importing it again reuses the module."""
    folder = tmp_path_factory.getbasetemp() / "versions_v2"
    folder.mkdir(exist_ok=True)
    path = folder / "workflows_v2.py"
    if not path.exists():
        path.write_text(V2_SOURCE)
    return path


def deploy_v2(path: Path) -> ModuleType:
    """Load version 2 into this process, as a new deployment next to version 1."""
    module = import_file(path)
    module.CALLS.clear()
    return module


async def start_v1_and_stop(url: str, title: str) -> str:
    """Start an execution on v1 and close its client while ``review`` runs: the history
    holds ``draft``'s result and the execution stays unfinished, as after a crash."""
    Gate.current = gate = Gate()
    try:
        async with WorkflowClient(store=url, runtime="mock") as client:
            execution = await client.run_workflow(ReportV1(title), ExecutionMode.ASYNC)
            await asyncio.wait_for(gate.reached.wait(), 10)
    finally:
        Gate.current = None
    return execution.id


async def stored(url: str, execution_id: str) -> tuple[Any, list[tuple[int, bytes]]]:
    """The execution's row (status, last seq, version) and its events, byte for byte."""
    async with create_store(url) as store:
        record = await store.get_execution(execution_id)
        events = [(s.seq, encode_event(s.event)) for s in await store.load(execution_id)]
    assert record is not None
    return (record.status, record.last_seq, record.workflow_version, record.error), events


async def test_a_v1_execution_resumes_on_v1_code_while_new_ones_run_v2(
        sqlite_url: str, v2_file: Path) -> None:
    CALLS.clear()
    eid = await start_v1_and_stop(sqlite_url, "q3")
    (status, *_), _ = await stored(sqlite_url, eid)
    assert status is ExecutionStatus.RUNNING
    assert CALLS == ["v1.draft", "v1.review"]

    v2 = deploy_v2(v2_file)  # the new code, in the same process as the old
    assert registered_workflows()["versions_report"].version == "2"
    assert list(workflow_versions("versions_report")) == ["1", "2"]

    CALLS.clear()
    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        resumed = await client.resume(eid)
        assert await resumed.get_result() == "q3: draft, reviewed by v1"
        assert CALLS == ["v1.review"]  # draft's result came from the history
        assert v2.CALLS == []
        assert await resumed.state() == {"draft": "q3 (v1)"}

        fresh = await client.run_workflow(v2.Report("q4"))
        assert await fresh.get_result() == "q4: draft, checked, published by v2"
        assert v2.CALLS == ["v2.draft", "v2.check", "v2.publish"]
        assert (await fresh.describe()).workflow_version == "2"
        assert (await resumed.describe()).workflow_version == "1"

        # a fork runs the current version: v1's draft is reused, v2's steps run after it
        v2.CALLS.clear()
        fork = await client.fork(eid, from_step="check")
        assert await fork.get_result() == "q3: draft, checked, published by v2"
        assert v2.CALLS == ["v2.check", "v2.publish"]
        assert (await fork.describe()).workflow_version == "2"


SUBPROCESS = '''
import asyncio, json, sys

from agentainer_flow import Worker, WorkflowClient, WorkflowVersionNotRegisteredError
from agentainer_flow._loading import import_file
from agentainer_flow.engine.spec import workflow_versions

url, module, eid = sys.argv[1:4]
import_file(module)


async def main() -> None:
    out = {"versions": list(workflow_versions("versions_report"))}
    async with WorkflowClient(store=url, runtime="mock") as client:
        try:
            await client.resume(eid)
            out["resume"] = "ran"
        except WorkflowVersionNotRegisteredError as exc:
            out["resume"] = {"code": exc.code, "message": str(exc), "version": exc.version,
                             "available": list(exc.available),
                             "execution_id": exc.execution_id}
        errors = []
        worker = Worker(client, once=True, poll_interval=0.05, report_error=errors.append)
        out["done"] = await worker.run()
        out["skipped"] = sorted(worker.skipped)
        out["worker_errors"] = errors
    print(json.dumps(out))


asyncio.run(main())
'''


def run_with_only_v2(url: str, v2_file: Path, execution_id: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FLOW_STORE", "FLOW_RUNTIME", "FLOW_SECRETS_KEY")}
    done = subprocess.run([sys.executable, "-c", SUBPROCESS, url, str(v2_file), execution_id],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_a_process_with_only_v2_leaves_the_v1_execution_as_it_is(
        sqlite_url: str, v2_file: Path) -> None:
    eid = await start_v1_and_stop(sqlite_url, "q1")
    v2 = deploy_v2(v2_file)
    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        queued = await client.run_workflow(v2.Report("q2"), ExecutionMode.ASYNC, queue="default")
    before = await stored(sqlite_url, eid)

    out = await asyncio.to_thread(run_with_only_v2, sqlite_url, v2_file, eid)

    assert out["versions"] == ["2"]
    refused = out["resume"]
    assert refused["code"] == "workflow_version_not_registered"
    assert (refused["execution_id"], refused["version"], refused["available"]) == (eid, "1", ["2"])
    message = refused["message"]
    for part in (eid, "version '1'", "'versions_report'", "only has version(s) '2'",
                 "left as it is", "version='1'", "until the executions started on it"):
        assert part in message, (part, message)
    # the worker ran the v2 execution and handed the v1 one back, untouched
    assert out["done"] == 1
    assert out["skipped"] == [eid]
    assert any(eid in line and "handed back" in line for line in out["worker_errors"])
    assert await stored(sqlite_url, eid) == before

    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        assert await client.get_execution(queued.id).get_result() == (
            "q2: draft, checked, published by v2")
        assert (await client.describe(eid)).lease_owner is None
        # a process with both versions finishes it on v1's code
        assert await (await client.resume(eid)).get_result() == "q1: draft, reviewed by v1"


async def test_a_worker_serving_a_queue_runs_each_version_on_its_code(
        sqlite_url: str, v2_file: Path) -> None:
    v2 = deploy_v2(v2_file)
    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        old = await client.run_workflow(ReportV1("w1"), ExecutionMode.ASYNC, queue="versions")
        new = await client.run_workflow(v2.Report("w2"), ExecutionMode.ASYNC, queue="versions")
    async with WorkflowClient(store=sqlite_url, runtime="mock") as service:
        worker = Worker(service, queues=["versions"], once=True, poll_interval=0.05)
        assert await asyncio.wait_for(worker.run(), 60) == 2
    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        old, new = client.get_execution(old.id), client.get_execution(new.id)
        assert await old.get_result() == "w1: draft, reviewed by v1"
        assert await new.get_result() == "w2: draft, checked, published by v2"
        assert [(await e.describe()).workflow_version for e in (old, new)] == ["1", "2"]
    assert worker.skipped == set()


# a child workflow whose code the parent names through this list (the "deployed" class)
CHILD: list[type] = []


@workflow(name="versions_child", version="1")
class ChildV1:
    @step()
    async def work(self, ctx: Context) -> str:
        CALLS.append("child.v1")
        await hold()
        return "child on v1"


@workflow(name="versions_parent")
class Parent:
    @step()
    async def spawn(self, ctx: Context) -> str:
        result: str = await ctx.run_workflow(CHILD[0]())
        return result


async def test_a_child_resumes_on_its_version_when_its_parent_now_names_v2(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "CHILD", [ChildV1])
    CALLS.clear()
    Gate.current = gate = Gate()
    try:
        async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
            parent = await client.run_workflow(Parent(), ExecutionMode.ASYNC)
            await asyncio.wait_for(gate.reached.wait(), 10)
    finally:
        Gate.current = None

    @workflow(name="versions_child", version="2")
    class ChildV2:
        @step()
        async def other(self, ctx: Context) -> str:
            CALLS.append("child.v2")
            return "child on v2"

    CHILD[0] = ChildV2  # the parent's code now starts v2 children
    CALLS.clear()
    async with WorkflowClient(store=sqlite_url, runtime="mock") as client:
        [recovered] = await client.recover()
        assert recovered.id == parent.id
        assert await recovered.get_result() == "child on v1"
        assert CALLS == ["child.v1"]
        [child] = await client.list_executions(parent_id=parent.id)
        assert child.workflow_version == "1"
        assert await (await client.run_workflow(Parent())).get_result() == "child on v2"


def test_every_version_stays_registered_and_the_highest_is_current(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_module, "_registry", {})

    def define(version: str, result: str) -> type:
        @workflow(name="versions_registry", version=version)
        class Versioned:
            @step()
            async def only(self, ctx: Context) -> str:
                return result

        return Versioned

    define("2", "first 2")
    ten = define("10", "10")
    define("9", "9")
    second_two = define("2", "second 2")  # a later definition of one version wins

    assert list(workflow_versions("versions_registry")) == ["2", "9", "10"]
    assert registered_workflows()["versions_registry"].cls is ten  # "10" > "9": numeric
    assert get_workflow_spec("versions_registry").cls is ten
    assert get_workflow_version("versions_registry", "2").cls is second_two
    with pytest.raises(WorkflowVersionNotRegisteredError) as caught:
        get_workflow_version("versions_registry", "1", execution_id="exec-7")
    assert isinstance(caught.value, WorkflowNotRegisteredError)
    assert caught.value.available == ("2", "9", "10")
    assert "execution exec-7 was started on version '1'" in str(caught.value)
    assert "only has version(s) '2', '9', '10'" in str(caught.value)
    with pytest.raises(WorkflowNotRegisteredError, match="no workflow named 'nope'"):
        get_workflow_version("nope", "1", execution_id="exec-8")


LOADING_SOURCE = '''
from agentainer_flow import Context, step, workflow


@workflow(name="versions_loading", version="{version}")
class Loading:
    @step()
    async def only(self, ctx: Context) -> str:
        return "v{version}"
'''


def test_the_code_of_an_old_version_is_found_in_the_file_it_was_started_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spec_module, "_registry", {})
    for version in ("1", "2"):
        (tmp_path / f"loading_v{version}.py").write_text(LOADING_SOURCE.format(version=version))
    import_file(tmp_path / "loading_v2.py")  # the worker's code: only v2
    record = ExecutionRecord(id="e1", workflow_name="versions_loading", workflow_version="1",
                             status=ExecutionStatus.RUNNING, created_at=0.0, updated_at=0.0,
                             tags={SOURCE_TAG: str(tmp_path / "loading_v1.py")})

    assert ensure_registered(record, exact_version=True).version == "1"
    unknown = replace(record, id="e3", workflow_version="3")
    with pytest.raises(WorkflowVersionNotRegisteredError, match="execution e3 was started"):
        ensure_registered(unknown, exact_version=True)
    assert ensure_registered(unknown).version == "2"  # for reading: the current code


def test_another_class_taking_a_registered_name_and_version_is_a_warning() -> None:
    from structlog.testing import capture_logs

    def define() -> type:
        @workflow(name="versions_taken_over", version="1")
        class Taken:
            @step()
            async def s(self, ctx: Context) -> int:
                return 1

        return Taken

    with capture_logs() as logs:
        define()
        define()  # the same class defined again (a test, a reload): nothing to say

        @workflow(name="versions_taken_over", version="1")
        class Other:
            @step()
            async def s(self, ctx: Context) -> int:
                return 2

    warned = [e for e in logs if e["event"] == "workflow_redefined"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["previous"].endswith("define.<locals>.Taken")
    assert warned[0]["now"].endswith("Other")
    assert get_workflow_spec("versions_taken_over").cls is Other  # the latest wins, as before
