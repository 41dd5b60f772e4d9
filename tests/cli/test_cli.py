"""Acceptance tests: the ``flow`` CLI in real subprocesses against a SQLite file.

Agents run on the default ``process`` runtime (tiny Python commands). Each CLI call costs a
second or so of interpreter start-up and imports, so independent calls run concurrently
(``Flow.many``) and the read-only tests share executions made once per module.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow.store import create_store
from agentainer_flow.store.events import AgentDeployRequested

from .flowcli import WF, Flow, Result, id_of

SECRET = "hunter2-very-secret-value"


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    return Flow(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def runs(flow: Flow) -> dict[str, Result]:
    """One completed and one failed execution, made once (concurrently) for the read tests."""
    config = flow.root / "config.json"
    config.write_text(json.dumps({"greeting": "hi"}))
    ok, failed = flow.many(
        ["run", f"{WF}:OkWorkflow", "--config", str(config), "--input", '{"n": 1}',
         "--tag", "suite=cli"],
        ["run", f"{WF}:FailWorkflow"],
    )
    return {"ok": ok, "failed": failed}


@pytest.fixture(scope="module")
def ok_id(runs: dict[str, Result]) -> str:
    return id_of(runs["ok"])


# run ------------------------------------------------------------------------------------
def test_run_wait_prints_progress_and_result(runs: dict[str, Result]) -> None:
    r = runs["ok"]
    assert r.code == 0, r
    assert r.json() == {"x": 1, "greeting": "hi", "input": {"n": 1}}
    assert "step fetch[0] completed" in r.err
    assert "fetched x" in r.err  # ctx.log lines show as progress
    assert "Traceback" not in r.text


def test_failing_workflow_exits_1_with_the_error(flow: Flow, runs: dict[str, Result]) -> None:
    r = runs["failed"]
    assert r.code == 1, r
    assert r.out == ""
    assert "error: execution" in r.err and "failed in step 'explode'" in r.err
    assert "exited with code 3" in r.err and "boom: disk on fire" in r.err
    assert "Traceback" not in r.err
    status = flow("status", id_of(r), "--json")
    assert status.json()["status"] == "failed"
    assert "exited with code 3" in status.json()["error"]


def test_run_json_and_constructor_keywords(flow: Flow) -> None:
    config = flow.root / "kwargs.json"
    config.write_text(json.dumps({"greeting": "hey", "times": 2}))
    data = flow.root / "input.json"
    data.write_text(json.dumps({"from": "file"}))
    r = flow("run", f"{WF}:cli_kwargs", "-c", str(config), "--input", f"@{data}", "--json",
             "-q")
    assert r.code == 0, r
    body = r.json()
    assert body["status"] == "completed" and body["result"] == "hey hey"
    assert body["workflow"] == "cli_kwargs" and body["error"] is None
    assert r.err == ""  # -q: no progress


def test_run_usage_errors_exit_2(flow: Flow) -> None:
    ambiguous, unknown, bad_input = flow.many(
        ["run", str(WF)],
        ["run", f"{WF}:NoSuchWorkflow"],
        ["run", f"{WF}:OkWorkflow", "--input", "{oops"],
    )
    for r in (ambiguous, unknown, bad_input):
        assert r.code == 2, r
        assert r.err.startswith("error: ") and "Traceback" not in r.err, r
    # an ambiguous file lists the candidates
    for name in ("OkWorkflow", "FailWorkflow", "SecretWorkflow", "KwargsWorkflow"):
        assert name in ambiguous.err
    assert "NoSuchWorkflow" in unknown.err and "OkWorkflow" in unknown.err
    assert "--input is not valid JSON" in bad_input.err


def test_no_wait_records_it_and_worker_once_runs_it(flow: Flow) -> None:
    started = flow("run", f"{WF}:OkWorkflow", "--no-wait", "--input", "7")
    assert started.code == 0, started
    eid = started.out.strip()
    uuid.UUID(eid)  # stdout is the id alone, for scripts
    assert "flow worker" in started.err and f"flow resume {eid}" in started.err
    pending = flow("status", eid, "--json").json()
    assert pending["status"] == "pending"
    assert pending["tags"]["flow.source"] == str(WF)

    worker = flow("worker", "--once", "--poll-interval", "0.1")
    assert worker.code == 0, worker
    assert f"{eid} cli_ok: completed" in worker.out
    done = flow("status", eid, "--json").json()
    assert done["status"] == "completed"
    assert done["result"] == {"x": 1, "greeting": None, "input": 7}
    assert done["lease_owner"] is None  # released


def test_resume_runs_a_pending_execution_to_the_end(flow: Flow) -> None:
    eid = flow("run", f"{WF}:OkWorkflow", "--no-wait").out.strip()
    r = flow("resume", eid)
    assert r.code == 0, r
    assert r.json()["x"] == 1
    assert f"resuming execution {eid}" in r.err


# reading --------------------------------------------------------------------------------
def test_status_list_history_logs(flow: Flow, ok_id: str) -> None:
    (status, status_json, listed, listed_json, history, history_json, logs,
     metrics) = flow.many(
        ["status", ok_id],
        ["status", ok_id, "--json"],
        ["list", "--workflow", "cli_ok", "--tag", "suite=cli"],
        ["list", "--status", "completed", "--tag", "suite=cli", "--json", "--limit", "5"],
        ["history", ok_id, "--events"],
        ["history", ok_id, "--events", "--json"],
        ["logs", ok_id, "--follow"],  # finished: prints everything and ends
        ["metrics", "--range", "1h"],
    )
    for r in (status, status_json, listed, listed_json, history, history_json, logs, metrics):
        assert r.code == 0, r

    assert f"execution  {ok_id}" in status.out
    assert "status     completed" in status.out
    assert "workflow   cli_ok (version 1)" in status.out
    assert "suite=cli" in status.out and '"greeting": "hi"' in status.out
    record = status_json.json()
    assert record["id"] == ok_id and record["status"] == "completed"
    assert record["result"] == {"x": 1, "greeting": "hi", "input": {"n": 1}}
    assert record["duration"] > 0 and record["finished_at"]

    header = listed.out.splitlines()[0].split()
    assert header == ["ID", "WORKFLOW", "STATUS", "CREATED", "DURATION", "HOLDER"]
    assert ok_id in listed.out and "completed" in listed.out
    assert [e["id"] for e in listed_json.json()] == [ok_id]

    assert history.out.splitlines()[0].split() == ["SEQ", "TIME", "TYPE", "STEP", "MESSAGE"]
    assert "workflow_started" in history.out and "fetch[0]" in history.out
    assert "deploying agent 'fetcher'" in history.out
    events = history_json.json()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "workflow_started"
    assert events[-1]["type"] == "workflow_completed"

    assert "[fetch] fetched x" in logs.out and "workflow completed" in logs.out

    rows = {line.split()[0]: line.split()[1:] for line in metrics.out.splitlines()[1:]}
    assert int(rows["cli_ok"][1]) >= 1 and int(rows["cli_fail"][2]) == 1  # completed, failed


def test_unknown_id_exits_2_naming_the_store(flow: Flow, ok_id: str) -> None:
    # (ok_id: the store exists; a missing store is another error, see test_debugging.py)
    results = flow.many(*([cmd, "no-such-id"] for cmd in ("status", "resume")))
    for r in results:
        assert r.code == 2, r
        assert r.err.strip() == (
            f"error: no execution with id 'no-such-id' in this store ({flow.store})"), r


def test_unreachable_store_is_one_clear_line(flow: Flow, tmp_path: Path) -> None:
    a_file = tmp_path / "plain-file"
    a_file.write_text("")
    sqlite, postgres = flow.many(
        ["list", "--store", f"sqlite:///{a_file}/flow.db"],
        ["status", "x", "--store", "postgresql://nobody@127.0.0.1:1/nothing"],
    )
    for r in (sqlite, postgres):
        assert r.code == 2, r
        assert r.err.startswith("error: ") and "Traceback" not in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r
    assert "SQLite store" in sqlite.err
    assert "127.0.0.1:1" in postgres.err


# replay ---------------------------------------------------------------------------------
def test_replay_matches_the_history(flow: Flow, ok_id: str) -> None:
    r = flow("replay", ok_id)
    assert r.code == 0, r
    verdict, *rest = r.out.splitlines()
    assert verdict == "OK: 2 step attempts match the history"  # the verdict first
    assert "workflow_completed" in "\n".join(rest)  # then the timeline
    assert ">>" not in r.out and "DIVERGED" not in r.text


def test_replay_with_changed_code_diverges(flow: Flow, ok_id: str, tmp_path: Path) -> None:
    source = WF.read_text()
    assert 'name="fetcher"' in source
    edited = tmp_path / "workflows_edited.py"
    edited.write_text(source.replace('name="fetcher"', 'name="fetcher-renamed"'))
    r = flow("replay", ok_id, "-m", str(edited), "-q")
    assert r.code == 1, r
    assert "DIVERGED" in r.err and "NonDeterminism" not in r.err  # the message, no traceback
    assert "name='fetcher'" in r.err and "name='fetcher-renamed'" in r.err


# cancel ---------------------------------------------------------------------------------
def test_cancel_a_pending_execution(flow: Flow) -> None:
    eid = flow("run", f"{WF}:OkWorkflow", "--no-wait").out.strip()
    r = flow("cancel", eid, "--reason", "wrong input file")
    assert r.code == 0, r
    assert "cancel requested" in r.out
    assert flow("status", eid, "--json").json()["cancel_reason"] == "wrong input file"
    assert "(cancel requested: wrong input file)" in flow("status", eid).out
    worker = flow("worker", "--once")
    assert f"{eid} cli_ok: cancelled" in worker.out, worker
    # the worker, another process, recorded the reason given here
    status = flow("status", eid, "--json").json()
    assert status["status"] == "cancelled" and status["error"] == "cancelled: wrong input file"


# secrets --------------------------------------------------------------------------------
def test_secret_values_never_appear_in_output(flow: Flow) -> None:
    waited = flow("run", f"{WF}:SecretWorkflow", "--secret", f"token={SECRET}")
    assert waited.code == 0, waited
    assert waited.json() == {"seen": len(SECRET), "token_length": len(SECRET)}
    # NAME alone reads FLOW_SECRET_NAME; --no-wait does not store it, the worker's env has it
    env = {"FLOW_SECRET_TOKEN": SECRET}
    queued = flow("run", f"{WF}:SecretWorkflow", "--secret", "token", "--no-wait", env=env)
    assert queued.code == 0, queued
    assert "FLOW_SECRET_TOKEN" in queued.err
    qid = queued.out.strip()
    missing = flow("resume", qid)  # no secret in this environment: it waits for one
    assert missing.code == 3 and "needs the secret 'token'" in missing.err, missing
    assert flow("status", qid, "--json").json()["status"] == "blocked"
    assert flow("worker", "--once", env=env).code == 0  # a blocked one waits for a person
    assert flow("status", qid, "--json").json()["status"] == "blocked"
    resumed = flow("resume", qid, env=env)  # with FLOW_SECRET_TOKEN it carries on
    assert resumed.code == 0 and "completed" in resumed.err, resumed
    wid = id_of(waited)
    *_, logs = flow.many(["status", wid], ["history", qid, "--json"], ["logs", qid])
    assert "the token is [secret:token]" in logs.out
    for r in flow.outputs:
        assert SECRET not in r.out and SECRET not in r.err, r


# the worker -----------------------------------------------------------------------------
def test_worker_stops_cleanly_on_sigterm(flow: Flow, tmp_path: Path) -> None:
    """With no grace period, SIGTERM hands the running execution back at once."""
    log = tmp_path / "worker.out"
    with log.open("w") as sink:
        proc = subprocess.Popen(flow._cmd(["worker", "--poll-interval", "0.1", "--worker-id",
                                           "w-test", "--grace", "0"]),
                                cwd=flow.root, env=flow.env, stdout=sink,
                                stderr=subprocess.PIPE, text=True)
    try:
        eid = flow("run", f"{WF}:SlowWorkflow", "--config", _write(flow, "slow.json", 4),
                   "--no-wait").out.strip()
        deadline = time.monotonic() + 20
        while not _deploying(flow.store, eid):  # its agent launched (or launching)
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)  # and running: handed back, it is adopted, not launched again
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stopped = Result(("worker",), proc.returncode, log.read_text(), err)
    flow.outputs.append(stopped)
    assert stopped.code == 0, stopped
    assert "SIGTERM: stopping" in stopped.err and "worker w-test stopped" in stopped.out
    left = flow("status", eid, "--json").json()
    assert left["status"] == "running" and left["lease_owner"] is None  # released
    # the next worker adopts the agent, which ran on meanwhile, and finishes the execution
    finished = flow("worker", "--once")
    assert f"{eid} cli_slow: completed" in finished.out, finished
    types = [e["type"] for e in flow("history", eid, "--events", "--json").json()]
    assert types.count("agent_deploy_requested") == 1 and types.count("agent_completed") == 1


def _write(flow: Flow, name: str, data: Any) -> str:
    path = flow.root / name
    path.write_text(json.dumps(data))
    return str(path)


def test_a_missing_secret_blocks_and_resume_carries_on(flow: Flow, tmp_path: Path) -> None:
    """`flow run` without a secret that a late step reads: the execution is blocked (exit 3),
    its finished work kept; `flow resume ID --secret` finishes it without redoing any."""
    marks = tmp_path / "marks"
    config = _write(flow, "late.json", str(marks))
    blocked = flow("run", f"{WF}:LateSecretWorkflow", "--config", config, "--json")
    assert blocked.code == 3, blocked
    assert "needs the secret 'token'" in blocked.err and "--secret token=" in blocked.err
    eid = next(w for w in blocked.err.split() if w.count("-") == 4)
    status = flow("status", eid, "--json").json()
    assert status["status"] == "blocked" and "waiting for secret 'token'" in status["error"]
    assert status["lease_owner"] is None  # nobody holds it: it waits for a person
    resumed = flow("resume", eid, "--secret", "token=s3cr3t-value-123", "--json")
    assert resumed.code == 0, resumed
    assert resumed.json()["result"] == {"answer": 42, "token_length": 16}
    assert marks.read_text().split() == ["expensive"]  # finished work was not redone
    assert "s3cr3t-value-123" not in resumed.out + resumed.err


def _deploying(store_url: str, execution_id: str) -> bool:
    """Whether the execution's history holds an agent deployment (read from the store)."""

    async def look() -> bool:
        store = create_store(store_url)
        async with store:
            history = await store.load(execution_id)
        return any(isinstance(s.event, AgentDeployRequested) for s in history)

    return asyncio.run(look())


def test_sigterm_lets_running_executions_finish_within_the_grace(flow: Flow,
                                                                  tmp_path: Path) -> None:
    """The first SIGTERM stops claiming and lets the running execution finish (its agent
    takes about 2 s of the 20 s grace); the worker then exits."""
    log = tmp_path / "worker.out"
    with log.open("w") as sink:
        proc = subprocess.Popen(flow._cmd(["worker", "--poll-interval", "0.1", "--worker-id",
                                           "w-grace", "--grace", "20"]),
                                cwd=flow.root, env=flow.env, stdout=sink,
                                stderr=subprocess.PIPE, text=True)
    try:
        eid = flow("run", f"{WF}:SlowWorkflow", "--config", _write(flow, "slow2.json", 2),
                   "--no-wait").out.strip()
        deadline = time.monotonic() + 20
        # its step attempt is running once its agent's deployment is durable (a claim
        # alone is not: a worker stopped before the attempt starts hands the execution back)
        while not _deploying(flow.store, eid):
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        late = flow("run", f"{WF}:SlowWorkflow", "--config", _write(flow, "slow3.json", 1),
                    "--no-wait").out.strip()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    stopped = Result(("worker",), proc.returncode, log.read_text(), err)
    assert stopped.code == 0, stopped
    assert f"{eid} cli_slow: completed" in stopped.out, stopped
    assert flow("status", eid, "--json").json()["status"] == "completed"
    assert flow("status", late, "--json").json()["status"] == "pending"  # not claimed
