"""The shared runtime suite (``runtime_suite.py``) against each real runtime: ``process``
under a temporary root, ``docker`` on the engine of the ``docker_engine`` fixture (no mocks).

What the suite cannot see through the interface it checks from outside: the agent directory
and the ``/proc`` entry of the agent's pid for processes; the container, its state and the
engine's ``start`` events for Docker.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agentainer_flow.engine.runtimes import _supervisor as sup
from agentainer_flow.engine.runtimes.base import AgentRuntime
from agentainer_flow.engine.runtimes.docker import DockerRuntime
from agentainer_flow.engine.runtimes.process import ProcessRuntime
from tests.conftest import DockerEngine

pytest.register_assert_rewrite("tests.engine.runtime_suite")  # detailed assertion failures
from tests.engine.runtime_suite import PROMPT, RuntimeSuite, RuntimeUnderTest  # noqa: E402

KILL_GRACE = 1.0


class ProcessUnderTest(RuntimeUnderTest):
    """Agents under ``root``; ``scratch`` is a host directory."""

    def __init__(self, root: Path, scratch: Path) -> None:
        super().__init__(kind="process", runtime=ProcessRuntime(root=root, kill_grace=KILL_GRACE),
                         image="flow-suite/unused:1", scratch=str(scratch),
                         labels={"flow.test_suite": "1"})
        self.root = root
        self.others: list[AgentRuntime] = []

    async def fresh(self) -> AgentRuntime:
        runtime = ProcessRuntime(root=self.root, kill_grace=KILL_GRACE)
        await runtime.open()
        self.others.append(runtime)
        return runtime

    def present(self, agent_id: str) -> bool:
        return (self.root / agent_id).exists()

    async def handle(self, agent_id: str) -> object:
        """The agent's ``(pid, start time)`` from its ``agent.pid``, once written."""
        path = self.root / agent_id / sup.AGENT_PID
        deadline = time.monotonic() + PROMPT
        while not path.exists():
            assert time.monotonic() < deadline, f"{agent_id} never started its command"
            await asyncio.sleep(0.02)
        record = json.loads(path.read_text())
        return int(record["pid"]), str(record["start"])

    def running(self, handle: object) -> bool:
        assert isinstance(handle, tuple)
        pid, start = handle
        stat = sup.proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X", "x") and stat[1] == start

    def runs(self, agent_id: str) -> int:
        """The lines the agent's runs appended to its counter file on the host."""
        path = Path(self.scratch) / f"{agent_id}.runs"
        return path.read_text().splitlines().count("run") if path.exists() else 0

    async def cleanup(self) -> None:
        if self.root.is_dir():
            for child in self.root.iterdir():  # leave no agent behind
                if not child.name.startswith("."):
                    await self.runtime.stop(child.name)
        for runtime in [self.runtime, *self.others]:
            await runtime.close()


class DockerUnderTest(RuntimeUnderTest):
    """Containers labelled with this test's own run label, removed by it afterwards; not
    ``flow.test=1``: ``test_docker_runtime``'s fixture removes every such container when
    one of its tests ends, including those of tests running at the same time elsewhere.
    ``scratch`` is ``/tmp`` inside the container, which lives as long as the container."""

    def __init__(self, engine: DockerEngine) -> None:
        self.run = uuid.uuid4().hex[:12]
        super().__init__(kind="docker", runtime=DockerRuntime(kill_grace=KILL_GRACE),
                         image=engine.image, scratch="/tmp",
                         labels={"flow.test_suite": "1", "flow.test_run": self.run})
        self.client = engine.client
        self.since = time.time() - 1.0
        self.others: list[AgentRuntime] = []

    async def fresh(self) -> AgentRuntime:
        runtime = DockerRuntime(kill_grace=KILL_GRACE)
        await runtime.open()
        self.others.append(runtime)
        return runtime

    def _container_attrs(self, ref: str) -> dict[str, object] | None:
        import docker.errors

        try:
            attrs: dict[str, object] = self.client.api.inspect_container(ref)
        except docker.errors.NotFound:
            return None
        return attrs

    def present(self, agent_id: str) -> bool:
        attrs = self._container_attrs(agent_id)
        return attrs is not None and attrs["Name"] == f"/{agent_id}"

    async def handle(self, agent_id: str) -> object:
        """The container's id, once it runs."""
        deadline = time.monotonic() + PROMPT
        while True:
            attrs = self._container_attrs(agent_id)
            state = attrs.get("State") if attrs is not None else None
            if attrs is not None and isinstance(state, dict) and state.get("Running"):
                return attrs["Id"]
            assert time.monotonic() < deadline, f"{agent_id} never ran"
            await asyncio.sleep(0.05)

    def running(self, handle: object) -> bool:
        assert isinstance(handle, str)
        attrs = self._container_attrs(handle)
        state = attrs.get("State") if attrs is not None else None
        return isinstance(state, dict) and bool(state.get("Running"))

    def runs(self, agent_id: str) -> int:
        """The engine's ``start`` events of containers named ``agent_id`` during the test
        (a restart, or a removed and recreated container, counts again)."""
        events = self.client.events(
            since=self.since, until=time.time(), decode=True,
            filters={"type": "container", "event": "start", "container": agent_id},
        )
        try:
            return sum(1 for e in events
                       if e.get("Actor", {}).get("Attributes", {}).get("name") == agent_id)
        finally:
            events.close()

    async def cleanup(self) -> None:
        try:
            for c in self.client.containers.list(
                all=True, filters={"label": f"agentainer.flow.test_run={self.run}"}
            ):
                c.remove(force=True)
        finally:
            for runtime in [self.runtime, *self.others]:
                await runtime.close()


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
async def rut(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RuntimeUnderTest]:
    """Each runtime, opened; everything the test started is ended and removed afterwards."""
    under: RuntimeUnderTest
    if request.param == "process":
        under = ProcessUnderTest(tmp_path / "agents", tmp_path / "scratch")
    else:
        under = DockerUnderTest(request.getfixturevalue("docker_engine"))
    try:
        await under.runtime.open()
        yield under
    finally:
        await under.cleanup()


class TestRuntimeSuite(RuntimeSuite):
    """The suite, once per runtime (``[process]``, ``[docker]``)."""
