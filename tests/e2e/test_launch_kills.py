"""An engine killed anywhere in an agent's launch, resumed by a fresh process from another
working directory: the agent runs exactly once and the execution gets its result.

Real processes throughout: the child engine dies by SIGKILL (at a test hook inside the
launch, or from outside while the agent runs), the resume runs in a new process whose
working directory differs and which is given no agent root, so it must find the agents from
the store's location alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from agentainer_flow.engine.runtimes.process import default_agent_root

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")

CHILD = Path(__file__).resolve().parent / "launch_child.py"
EXPECTED = {"value": 42}
HOOK_POINTS = ["agent.intent_logged", "agent.dir_created", "agent.supervisor_spawned",
               "agent.started"]
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> str:
    for name in _CLEARED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # where Postgres's agents go
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


class Run:
    """One execution, its files, and the two working directories of its engines."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.eid = str(uuid.uuid4())
        self.runs = tmp / "runs"
        self.marks = tmp / "marks"
        self.root = default_agent_root(url)
        self.cwds = [tmp / "cwd-first", tmp / "cwd-resume"]
        for cwd in self.cwds:
            cwd.mkdir()

    def child(self, mode: str, **env: str) -> subprocess.Popen[str]:
        full = {**os.environ, "RUNS": str(self.runs), "MARKS": str(self.marks), **env}
        cwd = self.cwds[0] if mode == "run" else self.cwds[1]
        return subprocess.Popen([sys.executable, str(CHILD), mode, self.url, self.eid],
                                cwd=cwd, env=full, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def resume(self, **env: str) -> dict:
        """Resume in a fresh process; its printed result and agent root."""
        return finish(self.child("resume", **env))

    def resume_deployed(self) -> bool:
        """Whether the resumed engine holds the agent's handle (it adopted the agent)."""
        return self.marks.exists() and "deployed:resume" in self.marks.read_text()

    def ran(self) -> list[str]:
        """The agent ids that started, once per run."""
        return self.runs.read_text().split() if self.runs.exists() else []

    def check(self, answer: dict) -> None:
        assert answer["result"] == EXPECTED
        assert answer["root"] == str(self.root)
        runs = self.ran()
        assert len(runs) == 1, f"the agent ran {len(runs)} times: {runs}"
        for cwd in self.cwds:  # nothing is kept relative to an engine's working directory
            assert not (cwd / ".flow").exists()


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    answer: dict = json.loads(out.strip().splitlines()[-1])
    return answer


def killed(proc: subprocess.Popen[str], *, kill: bool = True) -> None:
    """SIGKILL the engine (unless it kills itself at a hook) and check it died of it."""
    if kill:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"the engine was not killed: {err}"


def wait_until(proc: subprocess.Popen[str] | None, what: str,
               predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the engine ended before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("point", HOOK_POINTS)
def test_kill_inside_the_launch(store_url: str, tmp_path: Path, point: str) -> None:
    run = Run(store_url, tmp_path)
    killed(run.child("run", FLOW_TEST_KILL_AT=point), kill=False)
    if point in ("agent.intent_logged", "agent.dir_created"):
        assert not run.ran()  # killed before any supervisor existed
    run.check(run.resume())


def test_kill_while_the_agent_runs_then_adopt_from_elsewhere(store_url: str,
                                                             tmp_path: Path) -> None:
    run = Run(store_url, tmp_path)
    gate = tmp_path / "gate"
    first = run.child("run", GATE=str(gate))
    wait_until(first, "the agent started", lambda: bool(run.ran()))
    killed(first)
    resumed = run.child("resume", GATE=str(gate))
    # the agent is still blocked on the gate when the resumed engine gets its handle
    wait_until(resumed, "the resume adopted the agent", run.resume_deployed)
    gate.touch()
    run.check(finish(resumed))


@pytest.mark.parametrize("agent_state", ["output_written", "result_written"])
def test_kill_after_the_agent_wrote_its_output(store_url: str, tmp_path: Path,
                                               agent_state: str) -> None:
    run = Run(store_url, tmp_path)
    wrote, gate2 = tmp_path / "wrote", tmp_path / "gate2"
    env = {"WROTE": str(wrote), "GATE2": str(gate2)}
    first = run.child("run", **env)
    wait_until(first, "the agent wrote its output", wrote.exists)
    killed(first)
    if agent_state == "result_written":  # the agent ended while no engine was there
        gate2.touch()
        result = run.root / run.ran()[0] / "result.json"
        wait_until(None, "the supervisor recorded the result", result.exists)
        run.check(run.resume(**env))
        return
    resumed = run.child("resume", **env)
    wait_until(resumed, "the resume adopted the agent", run.resume_deployed)
    gate2.touch()
    run.check(finish(resumed))


def test_an_agent_left_after_its_outcome_is_reaped_by_flow_gc(store_url: str,
                                                               tmp_path: Path) -> None:
    """Killed once the outcome was durable, before the agent's directory was removed:
    ``flow gc`` removes the directory; the execution still gives its result, and the agent
    ran once."""
    run = Run(store_url, tmp_path)
    proc = run.child("run", FLOW_TEST_KILL_AT="agent.outcome_durable")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in run.root.iterdir() if not p.name.startswith(".")]
    assert len(left) == 1
    gc = subprocess.run(
        [sys.executable, "-m", "agentainer_flow._cli", "gc", "--runtime", "process", "--json",
         "--store", store_url], env={**os.environ}, capture_output=True, text=True,
        timeout=120)
    assert gc.returncode == 0, gc.stderr
    removed = json.loads(gc.stdout)["removed"]
    assert [r["agent_id"] for r in removed] == [left[0].name]
    assert removed[0]["reason"] in ("outcome recorded", "execution completed")
    assert not left[0].exists()
    run.check(run.resume())
    assert len(run.ran()) == 1
