"""Crash-proof resume with real processes: a child process running a workflow is SIGKILLed,
a fresh process resumes it from the store. Finished step bodies never run twice, no agent
is launched twice, and the result equals an uncrashed run. On SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from agentainer_flow.store import create_store
from agentainer_flow.store.events import StepCompleted

CHILD = Path(__file__).resolve().parent / "crash_child.py"
EXPECTED = {"sum": 100, "parts": [30, 40]}  # fetch: 3*10; work: (3+0)*10, (3+1)*10


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def child(mode: str, url: str, eid: str, tmp: Path, **env: str) -> subprocess.Popen[str]:
    full = {
        **os.environ, "MARKS": str(tmp / "marks"), "LAUNCHES": str(tmp / "launches"),
        "AGENTS_DIR": str(tmp / "agents"), **env,
    }
    return subprocess.Popen([sys.executable, str(CHILD), mode, url, eid], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def completed_bodies(url: str, eid: str) -> list[str]:
    """Step instances whose completion is durable in the store right now."""
    store = create_store(url)
    async with store:
        history = await store.load(eid)
    names = {"prepare": "prepare", "fetch": "fetch", "total": "total"}
    out = []
    for s in history:
        if isinstance(s.event, StepCompleted):
            ev = s.event
            out.append(f"work{ev.instance}" if ev.step == "work" else names[ev.step])
    return out


def check_ran_once(tmp: Path, finished_before_kill: list[str]) -> None:
    marks = Counter(m.split(":")[0] for m in lines(tmp / "marks") if "agent-done" not in m)
    for body in finished_before_kill:
        assert marks[body] == 1, f"step body {body} finished before the kill but ran again"
    for body in ("prepare", "fetch", "work0", "work1", "total"):
        assert marks[body] >= 1, f"{body} never completed"
    launches = Counter(lines(tmp / "launches"))
    assert len(launches) == 3 and set(launches.values()) == {1}, launches


def kill_after_fetch_agent(store_url: str, eid: str, tmp: Path) -> None:
    """Run the workflow in a child and SIGKILL it inside ``fetch``, after its agent ended."""
    proc = child("run", store_url, eid, tmp, HANG_AFTER_AGENT="1")
    deadline = time.monotonic() + 60
    while "fetch:agent-done" not in lines(tmp / "marks"):
        if proc.poll() is not None:
            pytest.fail(f"the child ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "the child never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def test_kill_mid_step_after_agent_finished(store_url: str, tmp_path: Path) -> None:
    eid = str(uuid.uuid4())
    kill_after_fetch_agent(store_url, eid, tmp_path)
    finished = asyncio.run(completed_bodies(store_url, eid))
    assert finished == ["prepare"]
    code, out, err = finish(child("resume", store_url, eid, tmp_path))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == EXPECTED
    check_ran_once(tmp_path, finished)
    assert lines(tmp_path / "launches").count(
        next(x for x in lines(tmp_path / "launches") if "fetch" in x)) == 1


def test_changed_agent_name_after_crash_is_non_determinism(store_url: str,
                                                          tmp_path: Path) -> None:
    eid = str(uuid.uuid4())
    kill_after_fetch_agent(store_url, eid, tmp_path)
    code, _, err = finish(child("resume", store_url, eid, tmp_path, FETCHER_NAME="fetcher-v2"))
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert last.startswith("agentainer_flow.engine.errors.NonDeterminismError") or \
        "NonDeterminismError" in last, err
    assert "'fetcher'" in last and "'fetcher-v2'" in last and "step 'fetch'" in last
    # the history is untouched: resuming with the original code finishes the execution
    code, out, err = finish(child("resume", store_url, eid, tmp_path))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == EXPECTED
    assert len(lines(tmp_path / "launches")) == 3


def test_uncrashed_run(store_url: str, tmp_path: Path) -> None:
    code, out, err = finish(child("run", store_url, str(uuid.uuid4()), tmp_path))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == EXPECTED
    check_ran_once(tmp_path, ["prepare", "fetch", "work0", "work1", "total"])


@pytest.mark.slow
def test_kill_at_every_event_index(store_url: str, tmp_path: Path) -> None:
    # how long is the history of an uncrashed run?
    probe = tmp_path / "probe"
    probe.mkdir()
    eid = str(uuid.uuid4())
    code, _, err = finish(child("run", store_url, eid, probe))
    assert code == 0, err
    store = create_store(store_url)

    async def length() -> int:
        async with store:
            return len(await store.load(eid))

    total = asyncio.run(length())
    killed_at: list[int] = []
    k = 1
    while k <= total:
        tmp = tmp_path / f"k{k}"
        tmp.mkdir()
        eid = str(uuid.uuid4())
        code, _, err = finish(child("run", store_url, eid, tmp, KILL_AFTER_SEQ=str(k)))
        assert code == -signal.SIGKILL, f"k={k}: the child was not killed: {err}"
        seq = int((tmp / "killed_at").read_text())
        killed_at.append(seq)
        finished = asyncio.run(completed_bodies(store_url, eid))
        code, out, err = finish(child("resume", store_url, eid, tmp))
        assert code == 0, f"k={k}: {err}"
        assert json.loads(out.strip().splitlines()[-1]) == EXPECTED, f"k={k}"
        check_ran_once(tmp, finished)
        k = seq + 1  # the commit that took the history to seq covered every k up to it
    assert len(killed_at) >= 5, killed_at


def test_cancel_from_another_process_stops_a_running_agent(store_url: str,
                                                           tmp_path: Path) -> None:
    """``cancel`` in one process stops an execution another process is running, even while
    it only waits for a long agent (nothing is appended meanwhile)."""
    eid = str(uuid.uuid4())
    proc = child("run", store_url, eid, tmp_path, SLOW_FETCH="60")
    deadline = time.monotonic() + 60
    while not lines(tmp_path / "launches"):
        if proc.poll() is not None:
            pytest.fail(f"the child ended early: {proc.communicate()}")
        assert time.monotonic() < deadline, "the agent never started"
        time.sleep(0.05)

    async def cancel() -> None:
        store = create_store(store_url)
        async with store:
            assert await store.request_cancel(eid)

    started = time.monotonic()
    asyncio.run(cancel())
    code, _, err = finish(proc, timeout=30)
    assert time.monotonic() - started < 15
    assert code != 0 and "cancelled" in err, err
    # the agent was stopped, not left to finish its minute, and its directory removed once
    # the cancellation was durable
    assert not _agent_processes(tmp_path)
    assert not [p for p in (tmp_path / "agents").iterdir() if not p.name.startswith(".")]


def _agent_processes(tmp: Path) -> list[int]:
    """Pids of live processes started with this test's marks file in their environment."""
    needle = f"MARKS={tmp / 'marks'}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes() and \
                    (entry / "stat").read_text().split(") ")[1][0] not in "ZX":
                found.append(int(entry.name))
        except OSError:
            continue
    return found
