"""Acceptance tests of the CLI as a debugger and for a new user's first hour: ``flow replay``
(verdict, marked divergence, ``--until``, ``--step``, ``--json``, exit codes), the per-step
history, ``status --watch``, ``retry --from-step``, id prefixes, read commands that never
create a store, ``-v`` after the command, ``| head``, and ``--config`` by name.

Real subprocesses against a SQLite file, as in ``test_cli.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import WorkflowClient

from .flowcli import WF, Flow, id_of
from .workflows_for_cli import OkWorkflow


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    return Flow(tmp_path_factory.mktemp("debug"))


@pytest.fixture(scope="module")
def runs(flow: Flow) -> dict[str, str]:
    """Executions made once (concurrently) for the read-only tests: their ids."""
    ok, failed, state = flow.many(
        ["run", f"{WF}:OkWorkflow", "--input", '{"n": 1}'],
        ["run", f"{WF}:FailWorkflow"],
        ["run", f"{WF}:StateWorkflow"],
    )
    assert ok.code == 0 and failed.code == 1 and state.code == 0, (ok, failed, state)
    return {"ok": id_of(ok), "failed": id_of(failed), "state": id_of(state)}


def _edited(tmp_path: Path, old: str, new: str) -> Path:
    source = WF.read_text()
    assert old in source
    edited = tmp_path / "workflows_edited.py"
    edited.write_text(source.replace(old, new))
    return edited


def _events(flow: Flow, eid: str) -> list[dict[str, Any]]:
    shown = flow("history", eid, "--events", "--json")
    assert shown.code == 0, shown
    events: list[dict[str, Any]] = shown.json()
    return events


# replay: the debugger -------------------------------------------------------------------
def test_replay_diverged_gives_the_verdict_first_and_marks_the_event(
        flow: Flow, runs: dict[str, str], tmp_path: Path) -> None:
    eid = runs["ok"]
    before = _events(flow, eid)
    deploy = next(e["seq"] for e in before if e["type"] == "agent_deploy_requested")
    edited = _edited(tmp_path, 'name="fetcher"', 'name="fetcher-renamed"')
    shown, as_json = flow.many(["replay", eid, "-m", str(edited)],
                               ["replay", eid, "-m", str(edited), "--json"])
    assert shown.code == 1 and as_json.code == 1, (shown, as_json)

    lines = shown.out.splitlines()
    assert lines[0] == (f"DIVERGED at seq {deploy}: step 'fetch' (instance 0, attempt 1, "
                        "command 0)")
    assert lines[1].startswith("history") and "name='fetcher'" in lines[1]
    assert lines[2].startswith("code") and "name='fetcher-renamed'" in lines[2]
    assert lines[3].startswith("hint") and "ctx.patched" in lines[3]
    marked = [line for line in lines if line.startswith(">>")]
    assert len(marked) == 1, shown
    assert marked[0].split()[1] == str(deploy) and "agent_deploy_requested" in marked[0]
    assert marked[0].rstrip().endswith("DIVERGED here")
    assert "workflow_completed" in shown.out  # the whole timeline follows
    assert "DIVERGED" in shown.err and "Traceback" not in shown.text  # the closing line

    body = as_json.json()
    assert body["ok"] is False and body["execution_id"] == eid
    divergence = body["divergence"]
    assert (divergence["step"], divergence["instance"], divergence["attempt"],
            divergence["index"], divergence["seq"]) == ("fetch", 0, 1, 0, deploy)
    assert "name='fetcher'" in divergence["recorded"]
    assert "name='fetcher-renamed'" in divergence["actual"]
    assert divergence["hint"] and divergence["message"]
    assert [e["seq"] for e in body["events"] if e["diverged"]] == [deploy]
    assert len(body["events"]) == len(before)
    assert _events(flow, eid) == before  # replay changed nothing


def test_replay_json_of_a_matching_history(flow: Flow, runs: dict[str, str]) -> None:
    r = flow("replay", runs["ok"][:8], "--json")  # a prefix of the id will do
    assert r.code == 0, r
    body = r.json()
    assert body["ok"] is True and body["divergence"] is None
    assert body["attempts_checked"] == 2 and body["in_flight"] == []
    assert not any(e["diverged"] for e in body["events"])
    assert [s["step"] for s in body["steps"]] == ["fetch", "finish"]


def test_replay_until_shows_the_state_and_results_at_that_event(
        flow: Flow, runs: dict[str, str]) -> None:
    eid = runs["state"]
    events = _events(flow, eid)
    first_done = next(e["seq"] for e in events
                      if e["type"] == "step_completed" and e["step"] == "first")
    shown, as_json = flow.many(["replay", eid, "--until", str(first_done)],
                               ["replay", eid, "--until", str(first_done), "--json"])
    assert shown.code == 0 and as_json.code == 0, (shown, as_json)
    assert shown.out.splitlines()[0].startswith("OK: 2 step attempts")
    tail = shown.out.split(f"as of seq {first_done}", 1)[1]
    assert "stage = \"first\"" in tail and "total" not in tail
    assert "first" in tail and "second" not in tail
    timeline_rows = [line.split()[0] for line in shown.out.split("as of")[0].splitlines()
                     if line.split() and line.split()[0].isdigit()]
    assert timeline_rows == [str(n) for n in range(1, first_done + 1)]  # it stops there
    body = as_json.json()
    assert body["until"] == first_done and body["state"] == {"stage": "first"}
    assert [(s["step"], s["status"], s["result"]) for s in body["steps"]] == [
        ("first", "completed", 1)]
    final = flow("replay", eid, "--json").json()
    assert final["state"] == {"stage": "second", "total": 2}


def test_replay_step_shows_one_step_in_detail(flow: Flow, runs: dict[str, str]) -> None:
    r = flow("replay", runs["ok"], "--step", "fetch")
    assert r.code == 0, r
    assert r.out.splitlines()[0].startswith("OK:")
    assert "agent_deploy_requested" in r.out and '"name": "fetcher"' in r.out
    assert '"command": [' in r.out and "step_completed" in r.out and '"x": 1' in r.out
    assert "finish[0]" not in r.out  # only that step


def test_replay_usage_errors_exit_2(flow: Flow, runs: dict[str, str]) -> None:
    eid = runs["ok"]
    results = flow.many(
        ["replay"],
        ["replay", "no-such-id"],
        ["replay", eid, "--until", "999"],
        ["replay", eid, "--until", "0"],
        ["replay", eid, "--step", "nope"],
        ["replay", eid, "--sample", "2"],
        ["replay", "--check"],
        ["replay", eid, "--check", "-m", str(WF)],
    )
    for r in results:
        assert r.code == 2, r
        assert "Traceback" not in r.err, r
    assert "has 11 events" in results[2].err
    assert "no event of step 'nope'" in results[4].err and "fetch, finish" in results[4].err
    assert "-m FILE" in results[6].err


# the per-step history -------------------------------------------------------------------
def test_history_is_a_per_step_summary(flow: Flow, runs: dict[str, str]) -> None:
    ok, failed, ok_json, failed_json = flow.many(
        ["history", runs["ok"]], ["history", runs["failed"]],
        ["history", runs["ok"], "--json"], ["history", runs["failed"], "--json"])
    for r in (ok, failed, ok_json, failed_json):
        assert r.code == 0, r
    header = next(line for line in ok.out.splitlines() if line.startswith("STEP"))
    assert header.split() == ["STEP", "STATUS", "ATTEMPTS", "DURATION", "RESULT", "/",
                              "ERROR", "AGENTS"]
    rows = {line.split()[0]: line for line in ok.out.splitlines()[
        ok.out.splitlines().index(header) + 1:]}
    assert rows["fetch"].split()[1:3] == ["completed", "1"]
    assert '{"x": 1}' in rows["fetch"] and "fetcher (completed)" in rows["fetch"]
    assert '"input": {"n": 1}' in rows["finish"]
    assert "explode" in failed.out and "failed" in failed.out
    assert "exited with code 3" in failed.out and "exploder (failed)" in failed.out

    body = ok_json.json()
    assert body["execution_id"] == runs["ok"] and body["status"] == "completed"
    fetch, finish = body["steps"]
    assert (fetch["step"], fetch["status"], fetch["attempts"]) == ("fetch", "completed", 1)
    assert fetch["result"] == {"x": 1} and fetch["duration"] > 0
    assert [(a["name"], a["status"], a["exit_code"]) for a in fetch["agents"]] == [
        ("fetcher", "completed", 0)]
    assert finish["result"] == {"x": 1, "greeting": None, "input": {"n": 1}}
    (explode,) = failed_json.json()["steps"]
    assert explode["status"] == "failed" and "exited with code 3" in explode["error"]
    assert explode["error_type"] == "AgentFailedError"


def test_status_watch_follows_a_running_execution_to_its_end(flow: Flow) -> None:
    config = flow.root / "slow.json"
    config.write_text("3")
    eid = flow("run", f"{WF}:SlowWorkflow", "--config", str(config), "--no-wait").out.strip()
    watcher = flow.popen("status", eid[:8], "--watch")
    worker = flow.popen("worker", "--once", "--poll-interval", "0.1")
    watched = flow.finish(["status", "--watch"], watcher, timeout=60)
    flow.finish(["worker"], worker, timeout=60)
    assert watched.code == 0, watched  # it completed
    frames = watched.out.split("execution  ")
    assert len(frames) >= 3, watched  # pending or running first, then the end
    running = next(f for f in frames if "status     running" in f)
    assert "nap" in running and "running" in running.split("STEP", 1)[1]
    assert "status     completed" in frames[-1] and "napper (completed)" in frames[-1]


# retry --from-step ----------------------------------------------------------------------
def test_retry_from_a_step_reuses_the_others_and_links_both_ways(flow: Flow,
                                                                  tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    config = tmp_path / "marks.json"
    config.write_text(json.dumps(str(marks)))
    first = flow("run", f"{WF}:MarksWorkflow", "--config", str(config))
    assert first.code == 0 and first.json() == 42, first
    old = id_of(first)
    assert marks.read_text().split() == ["expensive", "cheap"]

    again = flow("retry", old[:8], "--from-step", "cheap", "--json")
    assert again.code == 0, again
    assert again.json()["result"] == 42 and again.json()["status"] == "completed"
    new = again.json()["execution_id"]
    assert new != old and f"forked from {old} at step 'cheap'" in again.err
    assert marks.read_text().split() == ["expensive", "cheap", "cheap"]  # expensive reused

    old_history, new_history, old_status = flow.many(
        ["history", old], ["history", new], ["status", old, "--json"])
    assert f"forks      {new} at step 'cheap' (completed)" in old_history.out
    assert f"forked     from {old} at step 'cheap'" in new_history.out
    assert old_status.json()["forks"] == [
        {"execution_id": new, "step": "cheap", "status": "completed"}]
    assert flow("status", new, "--json").json()["forked_from"] == {
        "execution_id": old, "step": "cheap"}


def test_retry_without_a_step_redoes_the_failed_one(flow: Flow,
                                                    runs: dict[str, str]) -> None:
    again = flow("retry", runs["failed"], "--no-wait", "--json")
    assert again.code == 0, again
    body = again.json()
    assert body["forked_from"] == {"execution_id": runs["failed"], "step": "explode"}
    assert body["status"] == "pending"
    done = flow("retry", runs["ok"])  # nothing failed: it says to name a step
    assert done.code == 2 and "--from-step" in done.err and "fetch, finish" in done.err


# ids, stores, flags -----------------------------------------------------------------------
async def _with_ids(url: str, ids: list[str]) -> None:
    async with WorkflowClient(store=url, runtime="mock") as client:
        for eid in ids:
            await client.engine.start(OkWorkflow(), execution_id=eid, run_here=False)


def test_ids_may_be_shortened_to_a_unique_prefix(flow: Flow, runs: dict[str, str]) -> None:
    asyncio.run(_with_ids(flow.store, ["cafe-0001", "cafe-0002"]))
    eid = runs["ok"]
    results = flow.many(["status", eid[:6], "--json"], ["history", eid[:6], "--json"],
                        ["logs", eid[:6]], ["replay", eid[:6], "-q"],
                        ["status", "cafe-0001", "--json"], ["cancel", "cafe-0002"],
                        ["status", "cafe"], ["history", "cafe"])
    status, history, logs, replayed, exact, cancelled, ambiguous, ambiguous2 = results
    for r in (status, history, logs, replayed, exact, cancelled):
        assert r.code == 0, r
    assert status.json()["id"] == eid and history.json()["execution_id"] == eid
    assert "fetched x" in logs.out and replayed.out.startswith("OK:")
    assert exact.json()["id"] == "cafe-0001"
    assert "cancel requested for cafe-0002" in cancelled.out
    for r in (ambiguous, ambiguous2):
        assert r.code == 2, r
        assert "the id prefix 'cafe' matches 2 executions" in r.err
        assert "cafe-0001" in r.err and "cafe-0002" in r.err and flow.store in r.err


def test_read_commands_never_create_a_store(flow: Flow, tmp_path: Path) -> None:
    missing = tmp_path / "typo" / "flow.db"
    url = f"sqlite:///{missing}"
    reads = [["status", "x"], ["list"], ["logs", "x"], ["history", "x"], ["replay", "x"],
             ["queue", "list"], ["metrics"], ["replay", "--check", "-m", str(WF)],
             ["resume", "x"], ["cancel", "x"], ["retry", "x"]]
    *failed, workers = flow.many(*([*cmd, "--store", url] for cmd in reads),
                                 ["workers", "--json", "--store", url])
    for r in failed:
        assert r.code == 2, r
        assert r.err.startswith("error: ") and len(r.err.strip().splitlines()) == 1, r
        assert str(missing) in r.err and "does not exist" in r.err, r
    # workers make the store when they start: before, none is listed (and it is said why)
    assert workers.code == 0 and workers.json() == [], workers
    assert str(missing) in workers.err and "does not exist" in workers.err
    assert not missing.parent.exists()
    # the default store (.flow/flow.db under the working directory) is not made either
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in flow.env.items() if k != "FLOW_STORE"}
    proc = subprocess.run([sys.executable, "-m", "agentainer_flow._cli", "list"], cwd=empty,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and ".flow/flow.db" in proc.stderr, proc.stderr
    assert list(empty.iterdir()) == []


def test_verbose_works_after_the_command(flow: Flow) -> None:
    quiet, after, before = flow.many(["worker", "--once"], ["worker", "--once", "-v"],
                                     ["-v", "worker", "--once"])
    for r in (quiet, after, before):
        assert r.code == 0, r
    assert '"level": "info"' not in quiet.err
    assert '"level": "info"' in after.err and '"level": "info"' in before.err
    listed = flow("list", "-vv", "--limit", "1")
    assert listed.code == 0 and "Traceback" not in listed.err, listed


def test_a_closed_pipe_ends_quietly(flow: Flow, runs: dict[str, str]) -> None:
    # the reader is gone before anything is written: every write meets a broken pipe
    for args in (["list"], ["history", runs["ok"], "--events"], ["replay", runs["ok"]]):
        proc = flow.popen(*args)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        with proc.stderr:
            err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, err
        assert err == "", err
    shell = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"{sys.executable} -m agentainer_flow._cli list | head -1"],
        cwd=flow.root, env=flow.env, capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0 and shell.stderr == "", shell
    assert shell.stdout.split() == ["ID", "WORKFLOW", "STATUS", "CREATED", "DURATION",
                                    "HOLDER"]


def test_config_keys_name_constructor_parameters(flow: Flow) -> None:
    one = flow.root / "greeter.json"
    one.write_text(json.dumps({"greeting": "hello"}))
    whole = flow.root / "whole.json"
    whole.write_text(json.dumps({"greeting": "hi", "other": 1}))
    greeted, as_config, missing = flow.many(
        ["run", f"{WF}:Greeter", "--config", str(one), "-q"],
        ["run", f"{WF}:OkWorkflow", "--config", str(whole), "-q", "--input", "2"],
        ["run", f"{WF}:KwargsWorkflow", "--config", str(whole), "-q"])
    assert greeted.code == 0 and greeted.json() == "hello!", greeted
    # keys that are not all parameter names: the one parameter gets the whole object
    assert as_config.code == 0, as_config
    assert as_config.json() == {"x": 1, "greeting": "hi", "input": 2}
    assert missing.code == 2 and "other" in missing.err, missing
