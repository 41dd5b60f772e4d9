"""The ``process`` runtime against real subprocesses (no mocks)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.runtimes import _supervisor as sup
from agentainer_flow.engine.runtimes.base import AgentSpec, AgentState
from agentainer_flow.engine.runtimes.process import (
    ProcessRuntime,
    _supervisor_argv,
    default_agent_root,
)

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def spec(
    agent_id: str,
    command: list[str] | None = None,
    *,
    name: str = "agent",
    image: str = "img:1",
    **kw: Any,
) -> AgentSpec:
    return AgentSpec(agent_id=agent_id, command=command, name=name, image=image, **kw)


def pid_of(agent_dir: Path, name: str) -> int:
    return int(json.loads((agent_dir / name).read_text())["pid"])


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


async def until(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def rt(tmp_path: Path) -> AsyncIterator[ProcessRuntime]:
    runtime = ProcessRuntime(root=tmp_path / "agents", kill_grace=1.0)
    await runtime.open()
    yield runtime
    for child in (tmp_path / "agents").iterdir():  # leave no agent behind
        if not child.name.startswith("."):
            await runtime.stop(child.name)
    await runtime.close()


# -- the output protocol --


async def test_output_from_flow_output_file(rt: ProcessRuntime) -> None:
    script = 'echo \'{"from": "stdout"}\'; echo \'{"from": "file"}\' > "$FLOW_OUTPUT"'
    await rt.launch(spec("out-file", sh(script)))
    outcome = await rt.wait("out-file")
    assert outcome.exit_code == 0
    assert outcome.output == {"from": "file"}
    assert outcome.started_at is not None and outcome.finished_at is not None
    assert outcome.started_at <= outcome.finished_at
    assert not outcome.timed_out


async def test_output_from_last_json_stdout_line(rt: ProcessRuntime) -> None:
    await rt.launch(spec("out-stdout", sh("echo '{\"a\": 1}'; echo '{\"b\": 2}'; echo done")))
    outcome = await rt.wait("out-stdout")
    assert outcome.output == {"b": 2}


async def test_output_empty_when_none(rt: ProcessRuntime) -> None:
    await rt.launch(spec("out-none", sh("echo hello; echo '[1, 2]'")))
    outcome = await rt.wait("out-none")
    assert outcome.exit_code == 0
    assert outcome.output == {}


async def test_nonzero_exit_carries_log_tail(rt: ProcessRuntime) -> None:
    await rt.launch(spec("fails", sh("echo progress; echo 'boom: it broke' >&2; exit 3")))
    outcome = await rt.wait("fails")
    assert outcome.exit_code == 3
    assert "boom: it broke" in outcome.log_tail
    assert "progress" in outcome.log_tail
    assert outcome.log_tail.index("boom") < outcome.log_tail.index("progress")  # stderr first
    status = await rt.lookup("fails")
    assert status.state is AgentState.EXITED and status.outcome == outcome


async def test_log_tail_is_capped(rt: ProcessRuntime) -> None:
    await rt.launch(
        spec(
            "noisy",
            sh(
                'i=0; while [ $i -lt 300 ]; do echo "line $i $(printf %080d 0)" >&2; '
                "i=$((i+1)); done; echo last-out; exit 1"
            ),
        )
    )
    outcome = await rt.wait("noisy")
    assert len(outcome.log_tail) <= 4200
    assert "line 299" in outcome.log_tail
    assert "line 200" not in outcome.log_tail
    assert "last-out" in outcome.log_tail


async def test_command_not_found(rt: ProcessRuntime) -> None:
    await rt.launch(spec("nocmd", ["flow-test-no-such-command-xyz"]))
    outcome = await rt.wait("nocmd")
    assert outcome.exit_code == 127
    assert "flow-test-no-such-command-xyz" in outcome.log_tail


# -- environment and secrets --


async def test_env_reaches_agent_but_secrets_never_hit_disk(
    rt: ProcessRuntime, tmp_path: Path
) -> None:
    secret = "s3cr3t-" + os.urandom(8).hex()
    code = """
        import hashlib, json, os
        print(json.dumps({
            "digest": hashlib.sha256(os.environ["API_KEY"].encode()).hexdigest(),
            "plain": os.environ["PLAIN"],
            "id": os.environ["FLOW_AGENT_ID"],
            "name": os.environ["FLOW_AGENT_NAME"],
            "output": os.environ["FLOW_OUTPUT"],
        }))
    """
    await rt.launch(
        spec("env", py(code), name="envy", env={"API_KEY": secret, "PLAIN": "visible"}, timeout=60)
    )
    outcome = await rt.wait("env")
    assert outcome.exit_code == 0, outcome.log_tail
    assert outcome.output == {
        "digest": hashlib.sha256(secret.encode()).hexdigest(),
        "plain": "visible",
        "id": "env",
        "name": "envy",
        "output": str(rt.root / "env" / "output.json"),
    }
    files = files_under(tmp_path)
    assert any(p.name == "spec.json" for p in files)
    for path in files:
        assert secret.encode() not in path.read_bytes(), path
    meta = json.loads((rt.root / "env" / "spec.json").read_text())
    assert meta["name"] == "envy" and meta["command"] == py(code) and meta["timeout"] == 60
    assert "env" not in meta


async def test_engine_secrets_are_not_inherited(
    rt: ProcessRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOW_SECRET_TOKEN", "engine-only")
    monkeypatch.setenv("FLOW_SECRETS_KEY", "engine-key")
    monkeypatch.setenv("FLOW_TEST_INHERITED", "yes")
    script = r"""printf '{"t": "%s", "i": "%s"}\n' "${FLOW_SECRET_TOKEN:-}${FLOW_SECRETS_KEY:-}" \
        "$FLOW_TEST_INHERITED" """
    await rt.launch(spec("inherit", sh(script)))
    assert (await rt.wait("inherit")).output == {"t": "", "i": "yes"}


async def test_supervisor_that_cannot_start(tmp_path: Path) -> None:
    runtime = ProcessRuntime(root=tmp_path / "agents", python=str(tmp_path / "no-python"))
    with pytest.raises(OSError):
        await runtime.launch(spec("nopython", ["true"]))
    assert (await runtime.lookup("nopython")).state is AgentState.MISSING
    assert not list((tmp_path / "agents").iterdir())


async def test_working_directory(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    runtime = ProcessRuntime(root=tmp_path / "agents", cwd=work)
    await runtime.launch(spec("cwd", sh("pwd; echo x > made-here")))
    outcome = await runtime.wait("cwd")
    assert outcome.exit_code == 0
    assert (work / "made-here").exists()
    assert str(work) in await runtime.logs("cwd")


# -- commands from images --


async def test_image_mapping_with_and_without_tag(tmp_path: Path) -> None:
    runtime = ProcessRuntime(
        root=tmp_path / "agents",
        images={
            "my-fetcher": sh('echo \'{"via": "untagged key"}\''),
            "tool:1.2": sh('echo \'{"via": "tagged key"}\''),
            "plain:latest": sh('echo \'{"via": "latest key"}\''),
        },
    )
    cases = {
        "my-fetcher:latest": "untagged key",
        "my-fetcher:v2": "untagged key",
        "my-fetcher": "untagged key",
        "tool:1.2": "tagged key",
        "plain": "latest key",
    }
    for n, (image, via) in enumerate(cases.items()):
        await runtime.launch(spec(f"img-{n}", None, image=image))
        assert (await runtime.wait(f"img-{n}")).output == {"via": via}, image
    # an explicit command wins over the mapping
    await runtime.launch(spec("img-cmd", sh('echo \'{"via": "command"}\''), image="tool:1.2"))
    assert (await runtime.wait("img-cmd")).output == {"via": "command"}
    with pytest.raises(ConfigurationError):
        await runtime.launch(spec("img-other", None, image="tool:1.3"))


async def test_missing_command_error(rt: ProcessRuntime) -> None:
    expected = (
        "agent 'fetch': no command for image 'acme/fetcher:2': pass command=[...] to "
        "deploy_agent or map the image with ProcessRuntime(images={'acme/fetcher:2': [...]})"
    )
    with pytest.raises(ConfigurationError, match=re.escape(expected)):
        await rt.launch(spec("nocommand", None, name="fetch", image="acme/fetcher:2"))
    assert (await rt.lookup("nocommand")).state is AgentState.MISSING


# -- identity, idempotence, adoption --


async def test_lookup_missing_and_wait_missing(rt: ProcessRuntime) -> None:
    assert (await rt.lookup("nobody")).state is AgentState.MISSING
    with pytest.raises(LookupError):
        await rt.wait("nobody")
    with pytest.raises(ValueError):
        await rt.lookup("../escape")


async def test_launch_is_idempotent(rt: ProcessRuntime, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    agent = spec("once", sh(f"echo run >> '{counter}'; sleep 0.3"))
    other = ProcessRuntime(root=rt.root)
    await asyncio.gather(rt.launch(agent), rt.launch(agent), other.launch(agent))
    await rt.launch(agent)
    assert (await rt.wait("once")).exit_code == 0
    await rt.launch(agent)  # exited: still adopted, not run again
    await asyncio.sleep(0.2)
    assert counter.read_text() == "run\n"
    assert not [p for p in rt.root.iterdir() if p.name.startswith(".")]  # no temp dirs left


ENGINE_SCRIPT = """
import asyncio, sys
from agentainer_flow.engine.runtimes.base import AgentSpec
from agentainer_flow.engine.runtimes.process import ProcessRuntime

async def main():
    runtime = ProcessRuntime(root=sys.argv[1])
    agent = AgentSpec(agent_id="adopted", name="slow", image="x", command=sys.argv[2:])
    await runtime.launch(agent)
    print("launched", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def start_engine(root: Path, command: list[str]) -> subprocess.Popen[bytes]:
    """Another engine process that launches one agent and then hangs."""
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, str(root), *command],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )


async def test_adopts_agent_after_engine_sigkill(tmp_path: Path) -> None:
    root = tmp_path / "agents"
    counter = tmp_path / "counter"
    command = sh(f"echo run >> '{counter}'; sleep 1.5; echo '{{\"survived\": true}}'")
    engine = start_engine(root, command)
    try:
        assert engine.stdout is not None
        assert engine.stdout.readline() == b"launched\n"
    finally:
        engine.send_signal(signal.SIGKILL)
        engine.wait()
        assert engine.stdout is not None
        engine.stdout.close()

    runtime = ProcessRuntime(root=root)
    assert (await runtime.lookup("adopted")).state is AgentState.RUNNING
    await runtime.launch(AgentSpec(agent_id="adopted", name="slow", image="x", command=command))
    outcome = await runtime.wait("adopted", timeout=30)
    assert outcome.exit_code == 0, outcome.log_tail
    assert outcome.output == {"survived": True}
    assert counter.read_text() == "run\n"
    assert (await runtime.lookup("adopted")).outcome == outcome


async def test_killed_supervisor_is_reported_lost(rt: ProcessRuntime) -> None:
    await rt.launch(spec("lost", sh("echo started; sleep 30")))
    agent_dir = rt.root / "lost"
    await until(lambda: (agent_dir / "agent.pid").exists())
    supervisor, agent = pid_of(agent_dir, "supervisor.pid"), pid_of(agent_dir, "agent.pid")
    os.kill(supervisor, signal.SIGKILL)
    await until(lambda: not running(supervisor))
    assert (await rt.lookup("lost")).state is AgentState.RUNNING  # the agent still runs
    os.killpg(agent, signal.SIGKILL)
    await until(lambda: not running(agent))
    status = await rt.lookup("lost")
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code == -1
    assert "agent lost" in status.outcome.log_tail
    assert (await rt.wait("lost")).exit_code == -1
    assert not (agent_dir / "result.json").exists()  # lookup does not write


async def test_wait_follows_agent_whose_supervisor_died(rt: ProcessRuntime) -> None:
    await rt.launch(spec("orphan", sh("sleep 0.5")))
    agent_dir = rt.root / "orphan"
    await until(lambda: (agent_dir / "agent.pid").exists())
    os.kill(pid_of(agent_dir, "supervisor.pid"), signal.SIGKILL)
    started = time.monotonic()
    outcome = await rt.wait("orphan", timeout=10)
    assert outcome.exit_code == -1 and not outcome.timed_out
    assert time.monotonic() - started < 5


async def test_reused_pid_is_not_taken_for_the_supervisor(rt: ProcessRuntime) -> None:
    await rt.launch(spec("reuse", ["true"]))
    await rt.wait("reuse")
    agent_dir = rt.root / "reuse"
    (agent_dir / "result.json").unlink()
    # a live process (this one) with another start time than the one recorded
    record = json.loads((agent_dir / "supervisor.pid").read_text())
    record.update(pid=os.getpid(), start="1")
    (agent_dir / "supervisor.pid").write_text(json.dumps(record))
    status = await rt.lookup("reuse")
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code == -1


async def test_half_launched_directory(rt: ProcessRuntime, tmp_path: Path) -> None:
    """A directory no supervisor owns: being launched while its launch lock is held, an
    interrupted launch once nobody holds it, which ``launch`` completes (no time guess)."""
    counter = tmp_path / "counter"
    agent = spec("half", sh(f"echo run >> '{counter}'; echo '{{\"done\": 1}}'"))
    agent_dir = rt.root / "half"
    agent_dir.mkdir(parents=True)
    (agent_dir / "spec.json").write_text("{}")
    lock = os.open(agent_dir / "launch.lock", os.O_RDWR | os.O_CREAT)
    try:  # a launcher at work elsewhere
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert (await rt.lookup("half")).state is AgentState.RUNNING
    finally:
        os.close(lock)
    status = await rt.lookup("half")  # the launcher is gone
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code == -1
    assert "never started" in status.outcome.log_tail
    await rt.launch(agent)
    outcome = await rt.wait("half", timeout=30)
    assert outcome.exit_code == 0 and outcome.output == {"done": 1}
    await rt.launch(agent)
    assert counter.read_text() == "run\n"


# -- timeouts, stop, cancellation --


async def test_spec_timeout_kills_and_marks_timed_out(rt: ProcessRuntime) -> None:
    started = time.monotonic()
    await rt.launch(spec("slow", sh("sleep 30"), timeout=0.5))
    outcome = await rt.wait("slow")
    assert outcome.timed_out
    assert outcome.exit_code == -signal.SIGTERM
    assert time.monotonic() - started < 10


async def test_wait_timeout_stops_the_agent(rt: ProcessRuntime) -> None:
    await rt.launch(spec("waited", sh("sleep 30")))
    started = time.monotonic()
    outcome = await rt.wait("waited", timeout=0.3)
    assert outcome.timed_out
    assert outcome.exit_code != 0
    assert time.monotonic() - started < 10
    status = await rt.lookup("waited")
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.timed_out


async def test_stop(rt: ProcessRuntime) -> None:
    await rt.launch(spec("stopme", sh("sleep 30")))
    agent_dir = rt.root / "stopme"
    await until(lambda: (agent_dir / "agent.pid").exists())
    agent = pid_of(agent_dir, "agent.pid")
    await rt.stop("stopme")
    assert not running(agent)
    status = await rt.lookup("stopme")
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code == -signal.SIGTERM
    assert not status.outcome.timed_out
    await rt.stop("stopme")  # idempotent
    await rt.stop("never-launched")
    assert (await rt.wait("stopme")).exit_code == -signal.SIGTERM


async def test_stop_escalates_to_sigkill(rt: ProcessRuntime) -> None:
    await rt.launch(spec("stubborn", sh("trap '' TERM; echo ready; sleep 30")))
    # The supervisor creates the log after launch returns: wait for it too.
    log = rt.root / "stubborn" / "stdout.log"
    await until(lambda: log.exists() and "ready" in log.read_text())
    started = time.monotonic()
    await rt.stop("stubborn")
    assert time.monotonic() - started < 5
    outcome = (await rt.lookup("stubborn")).outcome
    assert outcome is not None and outcome.exit_code == -signal.SIGKILL


async def test_stop_without_supervisor_records_a_result(rt: ProcessRuntime) -> None:
    await rt.launch(spec("headless", sh("sleep 30")))
    agent_dir = rt.root / "headless"
    await until(lambda: (agent_dir / "agent.pid").exists())
    agent = pid_of(agent_dir, "agent.pid")
    os.kill(pid_of(agent_dir, "supervisor.pid"), signal.SIGKILL)
    await rt.stop("headless")
    await until(lambda: not running(agent))
    outcome = (await rt.lookup("headless")).outcome
    assert outcome is not None and outcome.exit_code == -signal.SIGTERM
    assert (agent_dir / "result.json").exists()


async def test_cancelled_wait_leaves_agent_running(rt: ProcessRuntime) -> None:
    await rt.launch(spec("patient", sh("sleep 2; echo '{\"ok\": 1}'")))
    waiter = asyncio.create_task(rt.wait("patient"))
    await asyncio.sleep(0.2)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (await rt.lookup("patient")).state is AgentState.RUNNING
    outcome = await rt.wait("patient", timeout=10)
    assert outcome.exit_code == 0 and outcome.output == {"ok": 1}


# -- logs and remove --


async def test_logs(rt: ProcessRuntime) -> None:
    await rt.launch(spec("talk", sh("for i in 1 2 3 4; do echo out$i; echo err$i >&2; done")))
    await rt.wait("talk")
    logs = await rt.logs("talk", tail=2)
    assert logs.splitlines() == ["out3", "out4"]  # stderr first, then stdout: the last 2
    assert (await rt.logs("talk", tail=5)).splitlines() == ["err4", "out1", "out2", "out3", "out4"]
    assert "out1" in await rt.logs("talk")
    assert await rt.logs("unknown") == ""


async def test_remove(rt: ProcessRuntime) -> None:
    await rt.launch(spec("gone", ["true"]))
    await rt.wait("gone")
    await rt.remove("gone")
    assert (await rt.lookup("gone")).state is AgentState.MISSING
    assert not (rt.root / "gone").exists()
    await rt.remove("gone")  # idempotent

    await rt.launch(spec("busy", sh("sleep 30")))
    agent_dir = rt.root / "busy"
    await until(lambda: (agent_dir / "agent.pid").exists())
    agent = pid_of(agent_dir, "agent.pid")
    await rt.remove("busy")  # stops it first
    assert not running(agent)
    assert (await rt.lookup("busy")).state is AgentState.MISSING
    assert not list(rt.root.iterdir())


async def test_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FLOW_HOME", str(tmp_path / "home"))
    assert ProcessRuntime().root == tmp_path / "home" / "agents"
    monkeypatch.delenv("FLOW_HOME")
    monkeypatch.chdir(tmp_path)
    assert ProcessRuntime().root == tmp_path / ".flow" / "agents"


async def test_launch_latency(rt: ProcessRuntime) -> None:
    """launch+wait of ``true``: mostly one ``python -I -S`` start-up."""
    timings = []
    for n in range(5):
        started = time.perf_counter()
        await rt.launch(spec(f"fast-{n}", ["true"]))
        outcome = await rt.wait(f"fast-{n}")
        timings.append(time.perf_counter() - started)
        assert outcome.exit_code == 0
    assert sorted(timings)[2] < 1.0  # generous: CI machines are slow; ~20-40 ms locally


# -- launching is idempotent from every state a crash leaves --

LAUNCHER_SCRIPT = """
import asyncio, sys
from agentainer_flow.engine.runtimes.base import AgentSpec
from agentainer_flow.engine.runtimes.process import ProcessRuntime

agent = AgentSpec(agent_id="killed", name="a", image="x", command=sys.argv[2:])
asyncio.run(ProcessRuntime(root=sys.argv[1]).launch(agent))
"""


@pytest.mark.parametrize("point", ["agent.dir_created", "agent.supervisor_spawned"])
def test_launch_completes_after_launcher_was_killed(tmp_path: Path, point: str) -> None:
    root, counter = tmp_path / "agents", tmp_path / "counter"
    command = sh(f"echo run >> '{counter}'; echo '{{\"ok\": 1}}'")
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER_SCRIPT, str(root), *command],
                              env={**os.environ, "FLOW_TEST_KILL_AT": point}, timeout=60)
    assert launcher.returncode == -signal.SIGKILL
    runtime = ProcessRuntime(root=root)
    agent = AgentSpec(agent_id="killed", name="a", image="x", command=command)

    async def resume() -> None:
        await runtime.launch(agent)  # completes the launch, or adopts the orphan's supervisor
        outcome = await runtime.wait("killed", timeout=30)
        assert outcome.exit_code == 0 and outcome.output == {"ok": 1}, outcome.log_tail
        await runtime.launch(agent)

    asyncio.run(resume())
    assert counter.read_text() == "run\n"


def _launch_in_thread(root: Path, agent: AgentSpec, start: threading.Barrier,
                      errors: list[BaseException]) -> None:
    async def launch() -> None:
        runtime = ProcessRuntime(root=root)
        start.wait(timeout=30)
        await runtime.launch(agent)

    try:
        asyncio.run(launch())
    except BaseException as exc:
        errors.append(exc)


def test_concurrent_launches_run_once(tmp_path: Path) -> None:
    """Two engines launching one id at once (fresh, or completing an interrupted launch)."""
    root = tmp_path / "agents"
    runtime = ProcessRuntime(root=root)
    for n in range(20):
        counter = tmp_path / f"counter-{n}"
        agent = spec(f"race-{n}", sh(f"echo run >> '{counter}'"))
        if n % 2:  # a directory its launcher left before starting a supervisor
            (root / agent.agent_id).mkdir(parents=True)
            (root / agent.agent_id / "spec.json").write_text("{}")
        start, errors = threading.Barrier(2), []
        threads = [threading.Thread(target=_launch_in_thread, args=(root, agent, start, errors))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        outcome = asyncio.run(runtime.wait(agent.agent_id, timeout=30))
        assert outcome.exit_code == 0, outcome.log_tail
        assert counter.read_text() == "run\n", n
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_only_one_of_competing_supervisors_runs_the_agent(tmp_path: Path) -> None:
    """The supervisor's exclusive claim alone (no launch lock) keeps the agent single."""
    agent_dir, counter = tmp_path / "agents" / "claimed", tmp_path / "counter"
    agent_dir.mkdir(parents=True)
    argv = [*_supervisor_argv(sys.executable), str(agent_dir), "--",
            *sh(f"echo run >> '{counter}'")]
    starters = [subprocess.Popen(argv, cwd=agent_dir, stdin=subprocess.DEVNULL)
                for _ in range(4)]
    codes = sorted(p.wait(timeout=60) for p in starters)
    assert codes == [0, sup.EXIT_TAKEN, sup.EXIT_TAKEN, sup.EXIT_TAKEN]
    outcome = asyncio.run(ProcessRuntime(root=agent_dir.parent).wait("claimed", timeout=30))
    assert outcome.exit_code == 0
    assert counter.read_text() == "run\n"


async def test_stop_requested_before_the_supervisor_claims(rt: ProcessRuntime,
                                                            tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    agent_dir = rt.root / "early"
    agent_dir.mkdir(parents=True)
    (agent_dir / "stop").write_text("stop\n")  # left by a stop while nobody owned it
    await rt.launch(spec("early", sh(f"echo run >> '{counter}'")))
    outcome = await rt.wait("early", timeout=30)
    assert outcome.exit_code == -signal.SIGTERM and not outcome.timed_out
    assert json.loads((agent_dir / "result.json").read_text())["stopped"]
    assert not counter.exists()


async def test_stop_of_an_interrupted_launch(rt: ProcessRuntime, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    agent_dir = rt.root / "cut"
    agent_dir.mkdir(parents=True)
    (agent_dir / "spec.json").write_text("{}")
    await rt.stop("cut")
    status = await rt.lookup("cut")
    assert status.state is AgentState.EXITED and status.outcome is not None
    assert status.outcome.exit_code == -signal.SIGTERM
    await rt.launch(spec("cut", sh(f"echo run >> '{counter}'")))  # stopped: adopted, not run
    assert not (agent_dir / "supervisor.pid").exists()
    assert (await rt.wait("cut")).exit_code == -signal.SIGTERM
    assert not counter.exists()


async def test_remove_in_every_state(rt: ProcessRuntime) -> None:
    await rt.launch(spec("r-done", ["true"]))
    await rt.wait("r-done")
    await rt.launch(spec("r-stopped", sh("sleep 30")))
    await rt.stop("r-stopped")
    await rt.launch(spec("r-timeout", sh("sleep 30"), timeout=0.2))
    assert (await rt.wait("r-timeout")).timed_out
    await rt.launch(spec("r-lost", sh("sleep 30")))
    lost_dir = rt.root / "r-lost"
    await until(lambda: (lost_dir / "agent.pid").exists())
    supervisor, agent = pid_of(lost_dir, "supervisor.pid"), pid_of(lost_dir, "agent.pid")
    os.kill(supervisor, signal.SIGKILL)
    os.killpg(agent, signal.SIGKILL)
    await until(lambda: not running(supervisor) and not running(agent))
    lost = (await rt.lookup("r-lost")).outcome
    assert lost is not None and lost.exit_code == -1
    (rt.root / "r-cut").mkdir()  # an interrupted launch
    (rt.root / "r-cut" / "spec.json").write_text("{}")
    names = ["r-done", "r-stopped", "r-timeout", "r-lost", "r-cut"]
    for name in names:
        await rt.remove(name)
        assert (await rt.lookup(name)).state is AgentState.MISSING, name
        await rt.remove(name)  # already gone
    assert not list(rt.root.iterdir())


async def test_cleanup_orphans(rt: ProcessRuntime) -> None:
    await rt.launch(spec("keep", ["true"]))
    await rt.wait("keep")
    old = time.time() - 3600
    for name in (".tmp-a-1", ".trash-b-2", ".tmp-young-3", "keep"):
        path = rt.root / name
        path.mkdir(exist_ok=True)
        (path / "spec.json").write_text("{}")
        if name != ".tmp-young-3":
            os.utime(path, (old, old))
    assert await rt.cleanup_orphans(older_than=60) == 2
    assert sorted(p.name for p in rt.root.iterdir()) == [".tmp-young-3", "keep"]
    assert await rt.cleanup_orphans(older_than=60) == 0


# -- where agents live --


def test_default_agent_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FLOW_HOME", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)
    assert default_agent_root(f"sqlite:///{tmp_path}/x/flow.db") == tmp_path / "x" / "agents"
    assert default_agent_root("sqlite:///rel/flow.db") == tmp_path / "rel" / "agents"
    pg = default_agent_root("postgresql://u:secret@DB.example:5432/flow")
    assert pg.name == "agents" and pg.parent.parent == tmp_path / "state" / "agentainer-flow"
    # the same database spelled differently shares its agents; another one does not
    assert default_agent_root("postgres://u:other@db.example/flow?sslmode=require") == pg
    assert default_agent_root("postgresql://u@db.example/other") != pg
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    memory = default_agent_root("memory://")
    assert memory.is_relative_to(tmp_path / "home" / ".local" / "state" / "agentainer-flow")
    monkeypatch.setenv("FLOW_HOME", str(tmp_path / "flow-home"))  # wins over the store
    flow_home = tmp_path / "flow-home" / "agents"
    assert default_agent_root(f"sqlite:///{tmp_path}/x/flow.db") == flow_home


def test_clients_keep_agents_next_to_the_store(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from agentainer_flow import WorkflowClient
    from agentainer_flow._cli import _client

    for name in ("FLOW_HOME", "FLOW_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    url = f"sqlite:///{tmp_path}/db/flow.db"
    expected = tmp_path / "db" / "agents"
    runtime = WorkflowClient(store=url).runtime
    assert isinstance(runtime, ProcessRuntime) and runtime.root == expected
    runtime = _client(url, "process").runtime
    assert isinstance(runtime, ProcessRuntime) and runtime.root == expected
    mine = ProcessRuntime(root=tmp_path / "mine")
    assert WorkflowClient(store=url, runtime=mine).runtime is mine
