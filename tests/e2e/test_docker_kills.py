"""An engine SIGKILLed while its agent's container runs (or inside the launch), resumed by a
fresh process: exactly one container was ever created for the command (counted by Docker's
events), the result is right, and no container is left behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from agentainer_flow import WorkflowClient
from tests.conftest import DockerEngine

pytestmark = [pytest.mark.docker, pytest.mark.skipif(sys.platform == "win32",
                                                     reason="POSIX processes only")]

CHILD = Path(__file__).resolve().parent / "docker_child.py"
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT")


class Run:
    """One execution on the docker runtime, run and resumed by child processes."""

    def __init__(self, engine: DockerEngine, tmp: Path) -> None:
        self.engine = engine
        self.url = f"sqlite:///{tmp / 'flow.db'}"
        self.eid = str(uuid.uuid4())
        self.label = f"agentainer.flow.execution_id={self.eid}"
        self.since = int(time.time()) - 1

    def child(self, mode: str, **env: str) -> subprocess.Popen[str]:
        full = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        full.update(env)
        return subprocess.Popen([sys.executable, str(CHILD), mode, self.url, self.eid],
                                env=full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def containers(self, **filters: str) -> list[object]:
        found: list[object] = self.engine.client.containers.list(
            all=True, filters={"label": self.label, **filters})
        return found

    def created(self) -> int:
        """How many containers of this execution Docker ever created (its events)."""
        events = self.engine.client.events(
            since=self.since, until=int(time.time()) + 1, decode=True,
            filters={"type": "container", "event": "create", "label": self.label})
        try:
            return sum(1 for _ in events)
        finally:
            events.close()


def finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    answer: dict = json.loads(out.strip().splitlines()[-1])
    return answer


def killed(proc: subprocess.Popen[str], *, kill: bool = True) -> None:
    if kill:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the engine was not killed: {err}"


def check(run: Run, answer: dict, seconds: int) -> None:
    assert answer["result"] == {"value": 42}
    assert run.created() == 1
    assert run.containers() == []  # removed once the outcome was durable
    # what the container printed is in the execution's logs, each line once, in order,
    # though two engines followed it
    ticks = [line.split("] ", 1)[1] for line in asyncio.run(_logs(run))
             if " OUTPUT  [worker] " in line]
    assert ticks == [f"tick {i}" for i in range(seconds * 4)] + ['{"value": 42}']


async def _logs(run: Run) -> list[str]:
    async with WorkflowClient(store=run.url, runtime="docker") as client:
        return await client.get_logs(run.eid)


def _recorded_output(run: Run) -> bool:
    async def look() -> bool:
        async with WorkflowClient(store=run.url, runtime="docker") as client:
            return any(e.type == "agent_output" for e in await client.get_history(run.eid))
    return asyncio.run(look())


def test_kill_while_the_container_runs(docker_engine: DockerEngine, tmp_path: Path) -> None:
    run = Run(docker_engine, tmp_path)
    first = run.child("run", SLEEP="3")
    deadline = time.monotonic() + 60
    while not run.containers(status="running"):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the container never ran"
        time.sleep(0.05)
    while not _recorded_output(run):  # kill once some of its output is recorded
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "no output recorded"
        time.sleep(0.1)
    killed(first)
    assert len(run.containers(status="running")) == 1  # the agent outlives its engine
    check(run, finish(run.child("resume", SLEEP="3")), 3)


@pytest.mark.parametrize("point", ["agent.intent_logged", "agent.started"])
def test_kill_inside_the_launch(docker_engine: DockerEngine, tmp_path: Path,
                                point: str) -> None:
    run = Run(docker_engine, tmp_path)
    killed(run.child("run", SLEEP="1", FLOW_TEST_KILL_AT=point), kill=False)
    if point == "agent.intent_logged":
        assert run.containers() == []
    check(run, finish(run.child("resume", SLEEP="1")), 1)


async def _create_store(url: str) -> None:
    async with WorkflowClient(store=url):
        pass


def gc(run: Run, *args: str, store: str | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "agentainer_flow._cli", "gc", "--runtime", "docker", "--json",
         "--store", store or run.url, *args],
        env={k: v for k, v in os.environ.items() if k not in _CLEARED},
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer: dict = json.loads(proc.stdout)
    return answer


def test_a_container_left_after_its_outcome_is_reaped(docker_engine: DockerEngine,
                                                       tmp_path: Path) -> None:
    """Killed after the outcome was durable, before the container was removed: ``flow gc``
    removes it (another store's gc does not), and the resumed run completes."""
    run = Run(docker_engine, tmp_path)
    killed(run.child("run", SLEEP="1", TWO_STEPS="1",
                     FLOW_TEST_KILL_AT="agent.outcome_durable"), kill=False)
    # the execution runs on (its second step is to come); the first container is garbage
    assert [c.status for c in run.containers()] == ["exited"]  # type: ignore[attr-defined]
    other = f"sqlite:///{tmp_path / 'other.db'}"
    asyncio.run(_create_store(other))  # gc never creates a store: a mistyped one is an error
    assert gc(run, store=other)["removed"] == []
    assert gc(run, "--dry-run")["removed"][0]["reason"] == "outcome recorded"
    assert len(run.containers()) == 1
    removed = gc(run)["removed"]
    assert [(r["execution_id"], r["reason"]) for r in removed] == [(run.eid,
                                                                   "outcome recorded")]
    assert run.containers() == []
    answer = finish(run.child("resume", SLEEP="1", TWO_STEPS="1"))
    assert answer["result"] == {"value": 42} and run.created() == 2
    assert run.containers() == []


def test_gc_reaps_ended_executions_and_leaves_running_ones(docker_engine: DockerEngine,
                                                           tmp_path: Path) -> None:
    """A container of an execution that ended is removed by ``gc()``; the running
    container of a live execution is left alone."""
    ended = Run(docker_engine, tmp_path)
    killed(ended.child("run", SLEEP="1", FLOW_TEST_KILL_AT="agent.outcome_durable"), kill=False)
    finish(ended.child("resume", SLEEP="1"))  # completes; what the crash left stays behind
    live = Run(docker_engine, tmp_path)  # same store
    live.eid, live.label = ended.eid + "-live", f"agentainer.flow.execution_id={ended.eid}-live"
    first = live.child("run", SLEEP="3")
    try:
        deadline = time.monotonic() + 60
        while not live.containers(status="running"):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

        async def recover() -> None:
            async with WorkflowClient(store=ended.url, runtime="docker") as client:
                reaped = await client.gc()
                assert [r.execution_id for r in reaped] == [ended.eid]
                assert reaped[0].reason == "execution completed"

        asyncio.run(recover())
        assert ended.containers() == []
        assert len(live.containers(status="running")) == 1
    finally:
        finish(first)


def test_recover_reaps_what_a_crash_left(docker_engine: DockerEngine, tmp_path: Path) -> None:
    """``recover()`` first removes the container whose outcome was durable when its engine
    died (this process cannot resume the workflow: it is not imported here), and a later
    resume completes the run without it."""
    run = Run(docker_engine, tmp_path)
    killed(run.child("run", SLEEP="1", FLOW_TEST_KILL_AT="agent.outcome_durable"), kill=False)
    assert len(run.containers()) == 1

    async def recover() -> None:
        async with WorkflowClient(store=run.url, runtime="docker") as client:
            await client.recover()

    asyncio.run(recover())
    assert run.containers() == []
    assert finish(run.child("resume", SLEEP="1"))["result"] == {"value": 42}
    assert run.created() == 1
