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
