"""``flow`` through a real ``flow server`` (``--api-url``/``--api-token``, or
``$AGENTAINER_API_URL``/``$AGENTAINER_API_TOKEN``): the read and operate commands print what
they print against the store itself, refuse what a token's scope does not allow without
showing the token, and the store-only commands say they are.

Every ``flow`` is a subprocess; the server and its worker are subprocesses too, on one SQLite
file (``sqlite_stack``), so each command is run both ways on the same executions.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import ROOT, WORKFLOWS, Stack, process_env

TARGET = f"{WORKFLOWS}:MonitoredWorkflow"  # ``data_workflow``: load, then check
TICKER = f"{WORKFLOWS}:Ticker"
SECRET = f"{WORKFLOWS}:NeedsSecret"
#: fields of an execution's row the API does not carry (the store's own lease bookkeeping)
STORE_ONLY_FIELDS = ("lease_token", "lease_renewed_at")


@dataclass(frozen=True)
class Ran:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:
        return f"flow {' '.join(self.args)} -> {self.code}\n--- out ---\n{self.out}\n" \
               f"--- err ---\n{self.err}"


def flow(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> Ran:
    done = subprocess.run([sys.executable, "-m", "agentainer_flow._cli", *args],
                          env=process_env(**(env or {})), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Ran(args, done.returncode, done.stdout, done.stderr)


def api(stack: Stack, scope: str = "read") -> tuple[str, ...]:
    return ("--api-url", stack.url, "--api-token", stack.token(scope))


def both(stack: Stack, *args: str) -> tuple[Ran, Ran]:
    """The command against the store, and through the server."""
    local = flow(*args, "--store", stack.store)
    remote = flow(*args, *api(stack))
    assert local.code == remote.code == 0, f"{local}\n{remote}"
    return local, remote


def without(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in names}


def no_token_in(stack: Stack, *results: Ran) -> None:
    for r in results:
        for token in stack.tokens.values():
            assert token not in r.out + r.err, r


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("config") / "fail.json"
    path.write_text(json.dumps({"fail": True}))
    yield path


@pytest.fixture(scope="module")
def finished(sqlite_stack: Stack, config: Path) -> dict[str, str]:
    """A completed and a failed execution, started with ``flow run --api-url``."""
    ok = flow("run", TARGET, "--json", "-t", "suite=cli-remote", *api(sqlite_stack, "write"))
    assert ok.code == 0, ok
    assert (ok.json()["status"], ok.json()["result"]) == ("completed", 43)
    bad = flow("run", TARGET, "-c", str(config), "--json", *api(sqlite_stack, "write"))
    assert bad.code == 1, bad
    assert (bad.json()["status"], bad.json()["step"]) == ("failed", "check")
    assert "the check failed" in bad.json()["error"]
    no_token_in(sqlite_stack, ok, bad)
    return {"ok": ok.json()["execution_id"], "bad": bad.json()["execution_id"]}


def wait_for(stack: Stack, execution_id: str, *statuses: str, within: float = 60) -> str:
    deadline = time.monotonic() + within
    while True:
        with stack.http("read") as http:
            status: str = http.get(f"/v1/executions/{execution_id}").json()["status"]
        if status in statuses or time.monotonic() > deadline:
            assert status in statuses, f"{execution_id} is {status}, not {statuses}"
            return status
        time.sleep(0.1)


# reading: the same output both ways -------------------------------------------------------
def test_status_prints_the_same_both_ways(sqlite_stack: Stack,
                                          finished: dict[str, str]) -> None:
    for eid in finished.values():
        local, remote = both(sqlite_stack, "status", eid, "--json")
        assert local.json()["status"] in ("completed", "failed")
        assert without(remote.json(), *STORE_ONLY_FIELDS) == \
            without(local.json(), *STORE_ONLY_FIELDS)
        assert remote.json()["steps"] and remote.json()["steps"] == local.json()["steps"]
        text_local, text_remote = both(sqlite_stack, "status", eid)
        assert text_remote.out == text_local.out
    ok = flow("status", finished["ok"], "--json", *api(sqlite_stack))
    assert ok.json()["result"] == 43
    # a unique prefix names the execution through the server too
    short = flow("status", finished["ok"][:8], "--json", *api(sqlite_stack))
    assert short.code == 0, short
    assert short.json()["id"] == finished["ok"]


def test_history_and_logs_print_the_same_both_ways(sqlite_stack: Stack,
                                                   finished: dict[str, str]) -> None:
    for eid in finished.values():
        for args in (("history", eid), ("history", eid, "--json"),
                     ("history", eid, "--events"), ("history", eid, "--events", "--json"),
                     ("logs", eid)):
            local, remote = both(sqlite_stack, *args)
            assert remote.out == local.out, args
            assert remote.out.strip()
    summary = flow("history", finished["bad"], "--json", *api(sqlite_stack)).json()
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [("load", "completed"),
                                                                  ("check", "failed")]
    assert summary["steps"][0]["result"] == 42


def test_list_and_metrics_print_the_same_both_ways(sqlite_stack: Stack,
                                                   finished: dict[str, str]) -> None:
    args = ("list", "--json", "--workflow", "data_workflow", "--tag", "suite=cli-remote")
    local, remote = both(sqlite_stack, *args)
    assert [r["id"] for r in remote.json()] == [finished["ok"]]
    assert [without(r, *STORE_ONLY_FIELDS) for r in remote.json()] == \
        [without(r, *STORE_ONLY_FIELDS) for r in local.json()]
    failed_local, failed_remote = both(sqlite_stack, "list", "--status", "failed",
                                       "--workflow", "data_workflow", "--limit", "500")
    assert finished["bad"] in failed_remote.out
    assert failed_remote.out == failed_local.out
    local, remote = both(sqlite_stack, "metrics", "--workflow", "data_workflow", "--json")
    assert remote.json() == local.json()
    assert remote.json()[0]["completed"] >= 1 and remote.json()[0]["failed"] >= 1


def test_the_environment_names_the_server(sqlite_stack: Stack,
                                          finished: dict[str, str]) -> None:
    env = {"AGENTAINER_API_URL": sqlite_stack.url,
           "AGENTAINER_API_TOKEN": sqlite_stack.token("read")}
    by_env = flow("status", finished["ok"], "--json", env=env)
    by_flags = flow("status", finished["ok"], "--json", *api(sqlite_stack))
    assert by_env.code == by_flags.code == 0, by_env
    assert by_env.json() == by_flags.json()
    listed = flow("list", "--json", "--tag", "suite=cli-remote", env=env)
    assert [r["id"] for r in listed.json()] == [finished["ok"]]
    # $AGENTAINER_API_URL wins over $FLOW_STORE (as WorkflowClient() does) ...
    nowhere = f"sqlite:///{sqlite_stack.folder / 'not-there.db'}"
    over_store = flow("status", finished["ok"], "--json", env={**env, "FLOW_STORE": nowhere})
    assert over_store.code == 0 and over_store.json() == by_flags.json(), over_store
    # ... and --store on the command line over $AGENTAINER_API_URL
    local = flow("status", finished["ok"], "--json", "--store", sqlite_stack.store,
                 env=env)
    assert local.code == 0 and local.json()["lease_token"] >= 1, local
    no_token_in(sqlite_stack, by_env, listed, over_store, local)


def test_id_prefixes_through_a_server(sqlite_stack: Stack) -> None:
    stem = f"cli-{uuid.uuid4().hex[:8]}-"
    with sqlite_stack.http("write") as http:
        for n in ("1", "10"):
            started = http.post("/v1/executions", json={
                "workflow": "data_workflow", "execution_id": stem + n, "mode": "sync"})
            assert started.status_code == 201, started.text
    exact = flow("status", stem + "1", "--json", *api(sqlite_stack))
    assert exact.code == 0 and exact.json()["id"] == stem + "1"  # an exact id wins
    ambiguous = flow("status", stem, *api(sqlite_stack))
    local = flow("status", stem, "--store", sqlite_stack.store)
    assert ambiguous.code == local.code == 2, ambiguous
    assert "matches 2 executions" in ambiguous.err and stem + "10" in ambiguous.err
    missing = flow("logs", "no-such-execution", *api(sqlite_stack))
    assert missing.code == 2 and "no-such-execution" in missing.err, missing


def test_a_damaged_history_shows_the_same_both_ways(sqlite_stack: Stack) -> None:
    eid = f"cli-damaged-{uuid.uuid4().hex[:8]}"
    with sqlite_stack.http("write") as http:
        started = http.post("/v1/executions", json={
            "workflow": "data_workflow", "execution_id": eid, "mode": "sync"})
        assert started.status_code == 201 and started.json()["status"] == "completed"
    path = sqlite_stack.store.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:  # an event lost from the middle of the history
        assert db.execute("DELETE FROM flow_events WHERE execution_id = ? AND seq = 3",
                          (eid,)).rowcount == 1
    for args in (("history", eid, "--events", "--json"), ("history", eid)):
        local = flow(*args, "--store", sqlite_stack.store)
        remote = flow(*args, *api(sqlite_stack))
        assert local.code == remote.code == 1, f"{local}\n{remote}"
        assert remote.out == local.out and remote.err == local.err
        assert "DAMAGED" in remote.out or any(e["problem"] for e in remote.json())
    # its result is not handed out: the same error both ways
    local = flow("status", eid, "--json", "--store", sqlite_stack.store)
    remote = flow("status", eid, "--json", *api(sqlite_stack))
    assert local.code == remote.code == 1, f"{local}\n{remote}"
    assert remote.err == local.err and "history damaged at seq 3" in remote.err


# operating -------------------------------------------------------------------------------
def test_cancel_and_watch_through_a_server(sqlite_stack: Stack) -> None:
    started = flow("run", TICKER, "--no-wait", "-c", _ticks(sqlite_stack, 600, "100ms"),
                   *api(sqlite_stack, "write"))
    assert started.code == 0, started
    eid = started.out.strip()
    wait_for(sqlite_stack, eid, "running")
    # a read-only token may not cancel: a clear refusal, exit 2, no token shown
    refused = flow("cancel", eid, *api(sqlite_stack, "read"))
    assert refused.code == 2, refused
    assert "scope is 'read'" in refused.err and "'write'" in refused.err
    wrong = flow("cancel", eid, "--api-url", sqlite_stack.url, "--api-token",
                 "afl_" + "x" * 43)
    assert wrong.code == 2 and "valid API token" in wrong.err, wrong
    assert "x" * 43 not in wrong.out + wrong.err
    no_token_in(sqlite_stack, refused)
    assert wait_for(sqlite_stack, eid, "running") == "running"  # untouched

    cancelled = flow("cancel", eid, "--json", "--reason", "too slow",
                     *api(sqlite_stack, "write"))
    assert cancelled.code == 0, cancelled
    assert cancelled.json()["cancel_requested"] is True
    watched = flow("status", eid, "--watch", *api(sqlite_stack))
    assert watched.code == 1, watched  # it ended, not completed
    ended = flow("status", eid, "--json", *api(sqlite_stack)).json()
    assert ended["error"] == "cancelled: too slow" and ended["cancel_reason"] == "too slow"
    assert "cancelled" in watched.out.splitlines()[-1] or "cancelled" in watched.out
    again = flow("cancel", eid, *api(sqlite_stack, "write"))
    assert again.code == 0 and "nothing to cancel" in again.out, again


def test_logs_follow_through_a_server_to_the_end(sqlite_stack: Stack) -> None:
    started = flow("run", TICKER, "--no-wait", "-c", _ticks(sqlite_stack, 15, "50ms"),
                   *api(sqlite_stack, "write"))
    assert started.code == 0, started
    eid = started.out.strip()
    followed = flow("logs", eid, "-f", *api(sqlite_stack), timeout=90)
    assert followed.code == 0, followed
    ticks = [line for line in followed.out.splitlines() if " tick " in line]
    assert [line.rsplit(" ", 1)[-1] for line in ticks] == [str(i) for i in range(15)]
    assert "workflow completed" in followed.out.splitlines()[-1]
    stored = flow("logs", eid, "--store", sqlite_stack.store)
    assert followed.out == stored.out  # every line once, in order, up to the end


def test_resume_a_blocked_execution_through_a_server(sqlite_stack: Stack) -> None:
    started = flow("run", SECRET, "--no-wait", *api(sqlite_stack, "write"))
    assert started.code == 0, started
    eid = started.out.strip()
    wait_for(sqlite_stack, eid, "blocked")
    key = "sk-" + uuid.uuid4().hex
    resumed = flow("resume", eid[:10], "--secret", f"api_key={key}", "--json",
                   *api(sqlite_stack, "write"))
    assert resumed.code == 0, resumed
    assert (resumed.json()["status"], resumed.json()["result"]) == ("completed", len(key))
    assert key not in resumed.out + resumed.err
    logs = flow("logs", eid, *api(sqlite_stack))
    assert "[secret:api_key]" in logs.out and key not in logs.out
    local_only = flow("resume", eid, "--image", "x=y", *api(sqlite_stack, "write"))
    assert local_only.code == 2 and "--image" in local_only.err, local_only


def test_retry_through_a_server(sqlite_stack: Stack, finished: dict[str, str]) -> None:
    bad = finished["bad"]
    retried = flow("retry", bad[:12], "--json", *api(sqlite_stack, "write"))
    assert retried.code == 1, retried  # the same code fails the same way
    got = retried.json()
    assert got["forked_from"] == {"execution_id": bad, "step": "check"}
    assert got["status"] == "failed" and got["step"] == "check"
    queued = flow("retry", bad, "--from-step", "load", "--no-wait", "--json",
                  *api(sqlite_stack, "write"))
    assert queued.code == 0, queued
    fork = queued.json()["execution_id"]
    assert queued.json()["forked_from"] == {"execution_id": bad, "step": "load"}
    wait_for(sqlite_stack, fork, "failed")
    local, remote = both(sqlite_stack, "history", bad, "--json")
    assert remote.json() == local.json()
    assert {f["execution_id"]: f["step"] for f in remote.json()["forks"]} == {
        got["execution_id"]: "check", fork: "load"}
    nowhere = flow("retry", bad, "--from-step", "nope", *api(sqlite_stack, "write"))
    assert nowhere.code == 2 and "has no step 'nope'" in nowhere.err, nowhere
    read_only = flow("retry", bad, *api(sqlite_stack, "read"))
    assert read_only.code == 2 and "scope is 'read'" in read_only.err, read_only
    no_token_in(sqlite_stack, retried, queued, nowhere, read_only)


def test_run_on_a_queue_through_a_server(sqlite_stack: Stack) -> None:
    queued = flow("run", TARGET, "--queue", "default", "--no-wait", "--json",
                  *api(sqlite_stack, "write"))
    assert queued.code == 0, queued
    assert queued.json()["queue"] == "default"
    eid = queued.json()["execution_id"]
    wait_for(sqlite_stack, eid, "completed")
    followed = flow("run", TARGET, "--queue", "default", "-q", *api(sqlite_stack, "write"))
    assert followed.code == 0, followed
    assert json.loads(followed.out) == 43
    read_only = flow("run", TARGET, *api(sqlite_stack, "read"))
    assert read_only.code == 2 and "scope is 'read'" in read_only.err, read_only


# what a server cannot do, and asking for two places ----------------------------------------
def test_store_only_commands_and_two_places_are_usage_errors(
        sqlite_stack: Stack, finished: dict[str, str]) -> None:
    for args in (("replay", finished["ok"]), ("worker", "--once"), ("gc",),
                 ("queue", "list"), ("workers",)):
        refused = flow(*args, *api(sqlite_stack))
        assert refused.code == 2, refused
        assert "works on a store, not through a flow server" in refused.err, refused
        no_token_in(sqlite_stack, refused)
    two = flow("list", "--store", sqlite_stack.store, *api(sqlite_stack))
    assert two.code == 2 and "--store and --api-url" in two.err, two
    lonely = flow("list", "--api-token", sqlite_stack.token("read"))
    assert lonely.code == 2 and "--api-token needs --api-url" in lonely.err, lonely
    no_token_in(sqlite_stack, two, lonely)


def _ticks(stack: Stack, ticks: int, pause: str) -> str:
    path = stack.folder / f"ticks-{ticks}-{pause}.json"
    path.write_text(json.dumps({"ticks": ticks, "pause": pause}))
    return str(path)
