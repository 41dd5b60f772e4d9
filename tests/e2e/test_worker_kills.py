"""A worker SIGKILLed between its claim and the runs it starts (``FLOW_TEST_KILL_AT``): right
after the claim returns, and after the claimed histories are read back but before any run
starts. Its leases expire, another worker claims the executions, and each completes with
its step bodies run once, with a history that has no gap and no duplicate."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from agentainer_flow import ExecutionMode, WorkflowClient
from tests.e2e.queue_workflows import Counted

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes only")

MODULE = Path(__file__).resolve().parent / "queue_workflows.py"
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT",
            "FLOW_LEASE_SECONDS")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


def worker(url: str, name: str, *args: str, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    return subprocess.Popen(
        [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(MODULE),
         "--store", url, "--id", name, "--queue", "kills", "--concurrency", "4",
         "--poll-interval", "0.1", "--grace", "0", *args],
        env={**environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("point", ["worker.claimed", "worker.run_starting"])
async def test_a_worker_killed_between_claim_and_run_loses_and_repeats_nothing(
        store_url: str, tmp_path: Path, point: str) -> None:
    bodies = tmp_path / "bodies.log"
    async with WorkflowClient(store=store_url) as client:
        executions = [await client.run_workflow(Counted(i, str(bodies)), ExecutionMode.ASYNC,
                                                queue="kills") for i in range(6)]
        doomed = worker(store_url, "doomed", FLOW_TEST_KILL_AT=point, FLOW_LEASE_SECONDS="1")
        _, err = doomed.communicate(timeout=60)
        assert doomed.returncode == -signal.SIGKILL, err
        assert not bodies.exists()  # killed before any step body ran
        holders = {(await e.describe()).lease_owner for e in executions} - {None}
        claimed = [e for e in executions if (await e.describe()).lease_owner is not None]
        assert claimed, "the killed worker claimed nothing"
        port = _free_port()
        rescuer = worker(store_url, "rescuer", "--metrics-port", str(port))
        try:
            results = [await asyncio.wait_for(e.get_result(), 60) for e in executions]
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=30)).text
        finally:
            rescuer.send_signal(signal.SIGTERM)
            out, err = rescuer.communicate(timeout=60)
        assert rescuer.returncode == 0, err
        # each claim of an expired lease is a takeover, said and counted (the metric)
        [doomed_id] = holders
        took = [line for line in (out + err).splitlines() if "taken over from" in line]
        assert len(took) == len(claimed) and all(doomed_id in line for line in took), out + err
        counted = [line for line in metrics.splitlines()
                   if line.startswith("flow_lease_takeovers_total{")]
        assert sum(float(line.rsplit(" ", 1)[1]) for line in counted) == len(claimed), metrics
        histories = [await client.store.load(e.id) for e in executions]
        records = [await e.describe() for e in executions]
    assert results == [i * 10 for i in range(6)]
    ran = bodies.read_text().split()
    assert sorted(ran) == sorted(
        f"{i}:{s}" for i in range(6) for s in "ab")  # every body once
    for history in histories:
        assert [stored.seq for stored in history] == list(range(1, len(history) + 1))
    assert all(r.lease_owner is None for r in records)
    print(f"\n{point}: {len(claimed)} claimed executions taken over, "
          f"{len(ran) - len(set(ran))} step bodies re-run")


async def test_a_dead_worker_of_this_machine_is_taken_over_without_waiting_for_its_lease(
        store_url: str, tmp_path: Path) -> None:
    """Its leases last 60 s; it is SIGKILLed once it holds executions. Another worker of
    the machine knows it is dead by its pid and start time (at its start, and at each
    heartbeat), ends its leases and takes its executions over within seconds."""
    bodies = tmp_path / "bodies.log"
    async with WorkflowClient(store=store_url) as client:
        executions = [await client.run_workflow(Counted(i, str(bodies)), ExecutionMode.ASYNC,
                                                queue="kills") for i in range(4)]
        doomed = worker(store_url, "doomed", FLOW_TEST_KILL_AT="worker.run_starting",
                        FLOW_LEASE_SECONDS="60")
        _, err = doomed.communicate(timeout=60)
        assert doomed.returncode == -signal.SIGKILL, err
        held = [e for e in executions if (await e.describe()).lease_owner is not None]
        assert held, "the killed worker held nothing"
        started = asyncio.get_running_loop().time()
        rescuer = worker(store_url, "rescuer", FLOW_LEASE_SECONDS="60")
        try:
            results = [await asyncio.wait_for(e.get_result(), 40) for e in executions]
            took = asyncio.get_running_loop().time() - started
        finally:
            rescuer.send_signal(signal.SIGTERM)
            out, err = rescuer.communicate(timeout=60)
    assert results == [i * 10 for i in range(4)], out + err
    assert took < 30, f"waited {took:.1f} s: the dead worker's 60 s leases were waited out"
    assert "is gone" in out + err, out + err
    print(f"\n{len(held)} executions of a SIGKILLed worker taken over in {took:.1f} s")
