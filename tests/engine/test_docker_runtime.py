"""The ``docker`` runtime against a real Docker engine (no mocks), and one workflow on it."""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import (
    Context,
    ExecutionMode,
    WorkflowCancelledError,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow._client import make_runtime
from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.runtimes.base import AgentSpec, AgentState
from agentainer_flow.engine.runtimes.docker import DockerRuntime, parse_memory
from tests.conftest import DockerEngine

pytestmark = pytest.mark.docker


#: this run's label value: the cleanup removes this run's containers, no other run's
RUN = uuid.uuid4().hex[:12]


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def new_id() -> str:
    return f"flow-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def rt(docker_engine: DockerEngine) -> AsyncIterator[DockerRuntime]:
    """An opened runtime; every container the test made is removed afterwards."""
    runtime = DockerRuntime(kill_grace=1.0)
    await runtime.open()
    try:
        yield runtime
    finally:
        for c in docker_engine.client.containers.list(
            all=True, filters={"label": f"agentainer.flow.test={RUN}"}
        ):
            c.remove(force=True)
        await runtime.close()


def spec(image: str, command: list[str] | None, *, agent_id: str | None = None,
         **kw: Any) -> AgentSpec:
    labels = {"flow.execution": "exec-1", "flow.step": "s", "flow.instance": "0",
              "flow.attempt": "1", "flow.command": "0", "flow.workflow": "wf", "flow.test": RUN}
    return AgentSpec(agent_id=agent_id or new_id(), name="agent", image=image,
                     command=command, labels=labels, **kw)


async def test_output_through_flow_output_file(rt: DockerRuntime,
                                               docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image,
             sh('echo \'{"from": "stdout"}\'; echo \'{"from": "file"}\' > "$FLOW_OUTPUT"'))
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 30)
    assert outcome.exit_code == 0
    assert outcome.output == {"from": "file"}
    assert outcome.started_at is not None and outcome.finished_at is not None
    assert outcome.started_at <= outcome.finished_at


async def test_output_through_last_json_stdout_line(rt: DockerRuntime,
                                                    docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh('echo \'{"a": 1}\'; echo \'{"b": 2}\'; echo done'))
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 30)
    assert outcome.output == {"b": 2}
    assert "done" in outcome.log_tail


async def test_env_command_labels_and_defaults_reach_the_container(
    rt: DockerRuntime, docker_engine: DockerEngine
) -> None:
    s = spec(docker_engine.image, ["sh", "-c", 'echo "{\\"greeting\\": \\"$GREETING $1\\"}"',
                                   "sh", "world"],
             env={"GREETING": "hello"})
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 30)
    assert outcome.output == {"greeting": "hello world"}
    attrs = docker_engine.client.containers.get(s.agent_id).attrs
    labels = attrs["Config"]["Labels"]
    assert labels["agentainer.flow.execution_id"] == "exec-1"
    assert labels["agentainer.flow.step"] == "s"
    assert labels["agentainer.flow.instance"] == "0"
    assert labels["agentainer.flow.attempt"] == "1"
    assert labels["agentainer.flow.command"] == "0"
    assert "FLOW_OUTPUT=/flow/output.json" in attrs["Config"]["Env"]
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert attrs["HostConfig"]["Privileged"] is False


async def test_network_is_off_by_default(rt: DockerRuntime,
                                         docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh("ls /sys/class/net | tr '\\n' ' '"))
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 30)
    assert outcome.log_tail.split() == ["lo"]


async def test_resources_are_applied(rt: DockerRuntime, docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh("true"), resources={"memory": "64m", "cpu": 0.5})
    await rt.launch(s)
    await rt.wait(s.agent_id, 30)
    host = docker_engine.client.containers.get(s.agent_id).attrs["HostConfig"]
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["NanoCpus"] == 500_000_000


async def test_a_request_the_engine_cannot_meet_is_a_clear_error(
    rt: DockerRuntime, docker_engine: DockerEngine
) -> None:
    ncpu = docker_engine.client.info()["NCPU"]
    s = spec(docker_engine.image, sh("true"), resources={"cpu": ncpu + 1})
    with pytest.raises(ConfigurationError, match=rf"asks for {ncpu + 1} CPUs.*has {ncpu}"):
        await rt.launch(s)
    s = spec(docker_engine.image, sh("true"), resources={"memory": "64t"})
    with pytest.raises(ConfigurationError, match="asks for memory '64t'"):
        await rt.launch(s)
    assert (await rt.lookup(s.agent_id)).state is AgentState.MISSING
    # below what Docker (or the kernel) accepts: refused here, not retried as a failure
    for resources, match in (({"memory": "1m"}, "least Docker allows is 6 MiB"),
                             ({"cpu": 0.001}, "least Docker can give is 0.01")):
        s = spec(docker_engine.image, sh("true"), resources=resources)
        with pytest.raises(ConfigurationError, match=match):
            await rt.launch(s)


async def test_a_container_that_ended_in_time_is_not_timed_out_when_waited_for_late(
    rt: DockerRuntime, docker_engine: DockerEngine
) -> None:
    """An engine resumed after the agent's deadline waits with no time left: the container
    ended within it, so its outcome is what it was, not a timeout."""
    s = spec(docker_engine.image, sh("echo done"))
    await rt.launch(s)
    first = await rt.wait(s.agent_id, 30)
    late = await rt.wait(s.agent_id, 0)
    assert first.exit_code == late.exit_code == 0 and not late.timed_out
    assert "done" in late.log_tail


async def test_only_the_output_is_read_from_the_flow_directory(
    rt: DockerRuntime, docker_engine: DockerEngine
) -> None:
    """Other files an agent leaves in /flow are streamed past, not held in memory."""
    s = spec(docker_engine.image, sh(
        "dd if=/dev/zero of=/flow/junk bs=1024 count=2048 2>/dev/null; "
        "echo '{\"ok\": 1}' > /flow/output.json"))
    await rt.launch(s)
    assert (await rt.wait(s.agent_id, 60)).output == {"ok": 1}
    container = docker_engine.client.containers.get(s.agent_id)
    files, skipped = rt._files(container, 10**9)
    assert set(files) == {"output.json"} and skipped == {}


def test_parse_memory() -> None:
    assert parse_memory("512m") == 512 * 1024**2
    assert parse_memory("2g") == parse_memory("2Gi") == 2 * 1024**3
    assert parse_memory(1000) == 1000
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory("lots")


async def test_timeout_kills_the_container(rt: DockerRuntime,
                                           docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh("echo started; sleep 60"))
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 1.0)
    assert outcome.timed_out
    container = docker_engine.client.containers.get(s.agent_id)
    assert container.status == "exited"
    # another engine reading the exited container later knows why it ended
    other = DockerRuntime()
    status = await other.lookup(s.agent_id)
    await other.close()
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.timed_out


async def test_non_zero_exit_gives_code_and_log_tail(rt: DockerRuntime,
                                                     docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh("echo 'something broke' >&2; exit 3"))
    await rt.launch(s)
    outcome = await rt.wait(s.agent_id, 30)
    assert outcome.exit_code == 3
    assert "something broke" in outcome.log_tail
    assert "something broke" in await rt.logs(s.agent_id)


async def test_launch_twice_creates_one_container_and_lookup_adopts(
    rt: DockerRuntime, docker_engine: DockerEngine
) -> None:
    s = spec(docker_engine.image, sh('sleep 1; echo \'{"ok": true}\''))
    await asyncio.gather(rt.launch(s), rt.launch(s))
    await rt.launch(s)
    found = docker_engine.client.containers.list(all=True, filters={"name": s.agent_id})
    assert [c.name for c in found] == [s.agent_id]
    # a fresh runtime (a resumed engine) finds it running and adopts it
    other = DockerRuntime()
    assert (await other.lookup(s.agent_id)).state is AgentState.RUNNING
    await other.launch(s)  # adopt: nothing new
    outcome = await other.wait(s.agent_id, 30)
    assert outcome.output == {"ok": True}
    status = await other.lookup(s.agent_id)
    assert status.state is AgentState.EXITED and status.outcome == outcome
    await other.launch(s)  # an exited container is not started again
    assert (await rt.wait(s.agent_id, 30)).started_at == outcome.started_at
    await other.close()


async def test_stop_and_remove(rt: DockerRuntime, docker_engine: DockerEngine) -> None:
    s = spec(docker_engine.image, sh("sleep 60"))
    await rt.launch(s)
    await rt.stop(s.agent_id)
    status = await rt.lookup(s.agent_id)
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code != 0 and not status.outcome.timed_out
    await rt.remove(s.agent_id)
    await rt.remove(s.agent_id)  # idempotent
    assert (await rt.lookup(s.agent_id)).state is AgentState.MISSING
    assert docker_engine.client.containers.list(all=True, filters={"name": s.agent_id}) == []
    await rt.stop(s.agent_id)  # nothing there: fine
    assert await rt.logs(s.agent_id) == ""
    with pytest.raises(LookupError):
        await rt.wait(s.agent_id, 1)


async def test_missing_image_is_a_clear_error(rt: DockerRuntime) -> None:
    s = spec("agentainer-flow-test/no-such-image:0", sh("true"))
    with pytest.raises(ConfigurationError, match="agentainer-flow-test/no-such-image:0"):
        await rt.launch(s)
    assert (await rt.lookup(s.agent_id)).state is AgentState.MISSING


def test_make_runtime_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_runtime("docker"), DockerRuntime)
    monkeypatch.setenv("FLOW_RUNTIME", "docker")
    assert isinstance(make_runtime(None), DockerRuntime)
    with pytest.raises(ConfigurationError, match="process runtime"):
        make_runtime("docker", images={"a": ["b"]})


async def test_unreachable_engine_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    runtime = DockerRuntime()
    with pytest.raises(ConfigurationError, match=r"dockerd.*DOCKER_HOST"):
        await runtime.open()
    await runtime.close()


IMAGE = "agentainer-flow-test/busybox:1"


@workflow(name="docker_two_steps")
class TwoSteps:
    @step()
    async def first(self, ctx: Context) -> int:
        agent = await ctx.deploy_agent(name="counter", image=IMAGE,
                                       command=["sh", "-c", "echo '{\"n\": 1}'"])
        result = await agent.wait_for_completion()
        return int(result["n"])

    @step(depends_on=["first"])
    async def second(self, ctx: Context, n: int) -> int:
        agent = await ctx.deploy_agent(name="doubler", image=IMAGE, env={"N": str(n)},
                                       command=["sh", "-c",
                                                'echo "{\\"n\\": $((N * 2))}" > $FLOW_OUTPUT'])
        result = await agent.wait_for_completion()
        return int(result["n"]) + 1


async def test_workflow_end_to_end_on_docker(docker_engine: DockerEngine,
                                             tmp_path: Path) -> None:
    assert docker_engine.image == IMAGE
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}",
                              runtime="docker") as client:
        execution = await client.run_workflow(TwoSteps())
        assert await execution.get_result() == 3
        label = f"agentainer.flow.execution_id={execution.execution_id}"
    # the engine removes containers once their outcome is durable
    for _ in range(50):
        left = docker_engine.client.containers.list(all=True, filters={"label": label})
        if not left:
            break
        await asyncio.sleep(0.1)
    assert left == []


async def test_client_without_engine_fails_at_open(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    client = WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}", runtime="docker")
    with pytest.raises(ConfigurationError, match="cannot reach a Docker engine"):
        await client.open()


async def test_the_images_non_root_user_runs_it_and_can_write_the_output(
        rt: DockerRuntime, docker_engine: DockerEngine, tmp_path: Path) -> None:
    """An image that names a user runs as that user (never overridden to root), and the
    output directory is writable by it."""
    tag = "agentainer-flow-test/busybox-user:1"
    (tmp_path / "Dockerfile").write_text(f"FROM {docker_engine.image}\nUSER 1000:1000\n")
    docker_engine.client.images.build(path=str(tmp_path), tag=tag, rm=True)
    try:
        s = spec(tag, sh('echo "{\\"uid\\": $(id -u), \\"gid\\": $(id -g)}" > "$FLOW_OUTPUT"'))
        await rt.launch(s)
        outcome = await rt.wait(s.agent_id, 30)
        assert outcome.exit_code == 0, outcome.log_tail
        assert outcome.output == {"uid": 1000, "gid": 1000}
        config = docker_engine.client.containers.get(s.agent_id).attrs
        assert config["Config"]["User"] == "1000:1000"
        assert config["HostConfig"]["Privileged"] is False
    finally:
        await rt.remove(s.agent_id)
        docker_engine.client.images.remove(tag, force=True)


@workflow(name="docker_cancel_probe")
class Sleeper:
    @step()
    async def sleep(self, ctx: Context) -> None:
        agent = await ctx.deploy_agent(name="sleeper", image=IMAGE,
                                       command=["sh", "-c", "sleep 120"])
        await agent.wait_for_completion()


async def test_cancel_stops_and_removes_the_running_container(
        docker_engine: DockerEngine, tmp_path: Path) -> None:
    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}",
                              runtime="docker") as client:
        execution = await client.run_workflow(Sleeper(), mode=ExecutionMode.ASYNC)
        label = f"agentainer.flow.execution_id={execution.id}"
        for _ in range(300):
            if docker_engine.client.containers.list(filters={"label": label,
                                                             "status": "running"}):
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the container never ran")
        started = time.monotonic()
        assert await client.cancel(execution.id, "enough")
        with pytest.raises(WorkflowCancelledError):
            await asyncio.wait_for(execution.get_result(), 60)
        assert time.monotonic() - started < 30  # stopped, not waited out (120 s)
    assert docker_engine.client.containers.list(all=True, filters={"label": label}) == []


def test_a_log_cursor_keeps_a_line_that_reached_the_stream_after_a_later_stamped_one() -> None:
    """Docker reads stdout and stderr apart: ``warn3`` (stderr) can arrive after
    ``line3`` (stdout) with an earlier stamp. A reader stopped at ``line3`` must still
    give ``warn3`` on resume, and nothing twice. No Docker needed: the stamps are made."""
    from agentainer_flow.engine.runtimes.docker import _LogPosition

    def stamped(ns: int, text: str) -> bytes:
        whole = ns // 1_000_000_000
        return f"2026-12-03T10:00:{whole:02d}.{ns % 1_000_000_000:09d}Z {text}".encode()

    stream = [stamped(1_000_000_100, "line1"), stamped(1_000_000_050, "warn1"),
              stamped(2_000_000_300, "line2"), stamped(2_000_000_200, "warn2"),
              stamped(3_000_000_300, "line3"), stamped(3_000_000_200, "warn3"),
              stamped(4_000_000_000, "line4")]
    got: list[tuple[bytes, str] | None] = []
    first = _LogPosition("")
    first.give(stream[:5], got.append)  # the engine died after line3
    assert got[-1] is not None
    given, cursor = got[-1]
    assert given.split() == [b"line1", b"warn1", b"line2", b"warn2", b"line3"]
    # a resumed reader gets the stream again from the second of the oldest line named
    again: list[tuple[bytes, str] | None] = []
    _LogPosition(cursor).give(stream, again.append)
    assert again[-1] is not None and again[-1][0].split() == [b"warn3", b"line4"]
    # the cursor of an older version (one stamp) still resumes after that stamp
    old: list[tuple[bytes, str] | None] = []
    _LogPosition("2026-12-03T10:00:02.000000300Z").give(stream, old.append)
    assert old[-1] is not None and old[-1][0].split() == [b"line3", b"warn3", b"line4"]


# the docker SDK leaves the socket of a connect that failed to the garbage collector
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_a_docker_engine_that_stops_answering_stops_the_run_resumable(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    """The Docker engine stops answering while an agent runs (here: this runtime's client
    is pointed at a socket nobody serves, so every call fails to connect, as when dockerd
    is down). The runtime tries again for ``retry_for``, then the run stops with
    ``RuntimeUnavailableError``: no step or agent failure is recorded, the execution stays
    running, and a resume with Docker back adopts the container and completes."""
    import docker

    from agentainer_flow import RuntimeUnavailableError, WorkflowClient, step, workflow
    from agentainer_flow.store import ExecutionStatus
    from agentainer_flow.store.events import AgentFailed, AgentStarted, StepFailed

    image = docker_engine.image

    @workflow(name="docker_goes_away")
    class GoesAway:
        @step()
        async def work(self, ctx: Any) -> int:
            agent = await ctx.deploy_agent(
                "sleeper", image, command=sh("sleep 6; echo '{\"v\": 7}'"))
            return int((await agent.wait_for_completion()).output["v"])

    url = f"sqlite:///{tmp_path / 'flow.db'}"
    rt = DockerRuntime(retry_for=1.0)
    async with WorkflowClient(store=url, runtime=rt) as client:
        ex = await client.run_workflow(GoesAway(), ExecutionMode.ASYNC)
        for _ in range(300):  # its container runs, and the step waits for it
            if docker_engine.client.containers.list(filters={"name": f"flow-{ex.id}"}):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        gone = docker.DockerClient(base_url=f"unix://{tmp_path / 'no-docker.sock'}",
                                   version=docker_engine.client.api.api_version)
        rt._client = gone
        started = time.monotonic()
        with pytest.raises(RuntimeUnavailableError, match="did not answer for 1 s"):
            await asyncio.wait_for(ex.get_result(), 60)
        assert time.monotonic() - started < 30
        record = await client.describe(ex.id)
        events = [s.event for s in await client.store.load(ex.id)]
    gone.close()
    gc.collect()  # the sockets of its failed connects, here, under this test's filters
    assert record.status is ExecutionStatus.RUNNING
    assert not any(isinstance(e, StepFailed | AgentFailed) for e in events)
    async with WorkflowClient(store=url, runtime=DockerRuntime()) as again:
        resumed = await again.resume(ex.id)
        assert await resumed.get_result() == 7
        events = [s.event for s in await again.store.load(ex.id)]
    # launched once, by the first run (its start was not yet recorded when it stopped),
    # and adopted by the resume, not launched again
    assert [e.adopted for e in events if isinstance(e, AgentStarted)] == [True]
