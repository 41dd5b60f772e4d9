"""Races between real processes on one execution, repeated, on SQLite and on Postgres.

Whatever runs an execution holds its fenced lease. A second ``resume``, or a second caller of
``run_workflow`` with the same idempotency key, follows the holder to the outcome instead of
running the execution too: no step body runs twice, no agent is launched twice, and the
process that loses a race never touches the winner's agents.
"""

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentainer_flow import WorkflowClient
from agentainer_flow.store import ExecutionStatus, create_store

from .test_crash_resume import CHILD, EXPECTED, lines

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crash_workflows import SmallFlow

#: the CI profile repeats each race 10 times; ``FLOW_SOAK=1`` (``nox -s soak``) 20 times
TRIALS = 20 if os.environ.get("FLOW_SOAK") else 10
BODIES = ("prepare", "fetch", "work0", "work1", "total")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_url"))


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MARKS": str(tmp / "marks"), "LAUNCHES": str(tmp / "launches"),
            "AGENTS_DIR": str(tmp / "agents"), **extra}


def spawn(mode: str, url: str, eid: str, tmp: Path, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CHILD), mode, url, eid],
                            env=env_for(tmp, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def record_only(url: str) -> str:
    """An execution recorded for someone else to run (as `flow run --no-wait` does)."""

    async def go() -> str:
        async with WorkflowClient(store=url, runtime="mock") as client:
            record, _ = await client.engine.start(SmallFlow(3), run_here=False)
            return record.id

    return asyncio.run(go())


def check_once(tmp: Path) -> None:
    marks = Counter(m.split(":")[0] for m in lines(tmp / "marks"))
    for body in BODIES:
        assert marks[body] == 1, f"step body {body} ran {marks[body]} times: {marks}"
    launches = Counter(lines(tmp / "launches"))
    assert len(launches) == 3 and set(launches.values()) == {1}, launches


async def final_status(url: str, eid: str) -> ExecutionStatus:
    async with create_store(url) as store:
        record = await store.get_execution(eid)
    assert record is not None
    return record.status


def two_resumes(url: str, tmp: Path, delay: float) -> None:
    eid = record_only(url)
    first = spawn("resume", url, eid, tmp, SLOW_FETCH="0.5")
    time.sleep(delay)
    second = spawn("resume", url, eid, tmp, SLOW_FETCH="0.5")
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == EXPECTED, err
    check_once(tmp)
    assert asyncio.run(final_status(url, eid)) is ExecutionStatus.COMPLETED


def test_two_resumes_of_one_execution_run_it_once(store_url: str, tmp_path: Path) -> None:
    """Two `resume`s 0 to 400 ms apart, ``TRIALS`` times: every body once, every agent once, both
    processes get the result, and the execution completes (no agent killed by the loser)."""
    delays = [0.4 * i / (TRIALS - 1) for i in range(TRIALS)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for i, delay in enumerate(delays):
            tmp = tmp_path / f"t{i}"
            tmp.mkdir()
            futures.append(pool.submit(two_resumes, store_url, tmp, delay))
        for future in futures:
            future.result()


def two_idempotent_runs(url: str, tmp: Path) -> None:
    key = f"order-{uuid.uuid4().hex[:8]}"
    procs = [spawn("runkey", url, key, tmp) for _ in range(2)]
    ids = set()
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1]) == EXPECTED, err
        assert "AppendConflictError" not in err and "LeaseLostError" not in err, err
        ids.add(next(line.split()[1] for line in err.splitlines()
                     if line.startswith("execution ")))
    assert len(ids) == 1, ids
    check_once(tmp)


def test_concurrent_idempotent_runs_share_one_execution(store_url: str,
                                                        tmp_path: Path) -> None:
    """Two processes call run_workflow(..., idempotency_key=k) at once, ``TRIALS`` times: one
    execution, run once, and both callers get its result (no AppendConflictError)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for i in range(TRIALS):
            tmp = tmp_path / f"t{i}"
            tmp.mkdir()
            futures.append(pool.submit(two_idempotent_runs, store_url, tmp))
        for future in futures:
            future.result()


def wait_for(predicate, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def worker(url: str, tmp: Path, lease: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agentainer_flow._cli", "worker", "--store", url, "-m",
         str(Path(__file__).resolve().parent / "crash_workflows.py"), "--lease", str(lease),
         "--poll-interval", "0.1", "--concurrency", "1"],
        env=env_for(tmp, SLOW_FETCH="4", FLOW_HOME=str(tmp)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("trial", range(3))
def test_a_paused_worker_never_kills_the_agents_of_the_worker_that_took_over(
        store_url: str, tmp_path: Path, trial: int) -> None:
    """A worker paused (SIGSTOP) past its lease while its agent runs; a second worker takes
    the execution over and adopts the agent; the first one wakes up, finds itself fenced
    out and stops without touching the agent. The execution completes, each agent once."""
    eid = record_only(store_url)
    first = worker(store_url, tmp_path, lease=1.5)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: any("fetch" in x for x in lines(tmp_path / "launches")),
                 "the fetch agent to start")
        first.send_signal(signal.SIGSTOP)
        time.sleep(2.5)  # past the lease
        second = worker(store_url, tmp_path, lease=1.5)
        wait_for(lambda: asyncio.run(final_status(store_url, eid)).is_terminal,
                 "the execution to end", timeout=90)
        first.send_signal(signal.SIGCONT)
        time.sleep(1.0)  # the first worker notices it lost the lease
    finally:
        first.send_signal(signal.SIGCONT)
        for proc in (first, second):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
        outs = [proc.communicate(timeout=60) for proc in (first, second) if proc is not None]
    assert asyncio.run(final_status(store_url, eid)) is ExecutionStatus.COMPLETED, outs
    launches = Counter(lines(tmp_path / "launches"))
    assert len(launches) == 3 and set(launches.values()) == {1}, launches
    agents = tmp_path / "agents"
    for result in agents.glob("*/result.json") if agents.exists() else []:
        assert json.loads(result.read_text())["exit_code"] == 0  # nobody stopped an agent
