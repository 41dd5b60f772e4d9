"""Secret values never leave in clear, and user data is never rewritten.

User data holding a secret's value (results, state, agent outputs, inputs, constructor args,
child inputs, tags, log fields, metric tags) is refused with ``SecretLeakError``; text for
people (errors, log messages, log tails, agent env and argv) is redacted. The end-to-end test
runs every way a secret could leak on a real SQLite file with real ``process`` agents, then
greps the database, the agent directories and the output of the ``flow`` commands.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs
from typer.testing import CliRunner

from agentainer_flow import (
    ConfigurationError,
    Context,
    ExecutionMode,
    SecretLeakError,
    SerializationError,
    WorkflowClient,
    WorkflowFailedError,
    step,
    workflow,
)
from agentainer_flow import _cli as cli
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.engine.runtimes.process import ProcessRuntime
from agentainer_flow.engine.secrets import Redactor
from agentainer_flow.store.events import (
    AgentDeployRequested,
    AgentFailed,
    LogRecorded,
    MetricRecorded,
    StepCompleted,
    StepFailed,
)
from agentainer_flow.testing import mock_agent, test_client

SECRET = "s3cr3t-Leak-Value-42"
DIGEST = hashlib.sha256(SECRET.encode()).hexdigest()
SEEN: dict[str, BaseException] = {}  # errors steps caught, by mode


def _agent_code(body: str) -> str:
    """A python -c agent: ``out(dict)`` reports its output, ``clean(token)`` says whether no
    file of its directory (spec.json, pid files...) holds the token."""
    return ("import hashlib, json, os, sys\n"
            "here = os.path.dirname(os.environ['FLOW_OUTPUT'])\n"
            "def out(d):\n"
            "    json.dump(d, open(os.environ['FLOW_OUTPUT'], 'w'))\n"
            "def clean(token):\n"
            "    paths = [os.path.join(here, f) for f in os.listdir(here)]\n"
            "    return all(token.encode() not in open(p, 'rb').read()\n"
            "               for p in paths if os.path.isfile(p))\n" + body)


ENV_AGENT = _agent_code(
    f"out({{'env_ok': hashlib.sha256(os.environ['TOKEN'].encode()).hexdigest() == {DIGEST!r},\n"
    "     'dir_clean': clean(os.environ['TOKEN'])})\n")
STDERR_AGENT = _agent_code(
    "sys.stderr.write('agent failing with ' + os.environ['TOKEN'] + '\\n')\nsys.exit(3)\n")
ARGV_AGENT = _agent_code(
    "spec = open(os.path.join(os.path.dirname(os.environ['FLOW_OUTPUT']), 'spec.json')).read()\n"
    f"out({{'argv_ok': hashlib.sha256(sys.argv[1].encode()).hexdigest() == {DIGEST!r},\n"
    "     'dir_clean': clean(sys.argv[1]), 'spec_ref': '[secret:token]' in spec})\n")


@workflow(name="leaks")
class Leaks:
    """One step that does with ``ctx.secrets["token"]`` what ``mode`` says."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @step()
    async def go(self, ctx: Context) -> Any:
        token = ctx.secrets["token"]
        mode = self.mode
        try:
            if mode == "env":
                agent = await ctx.deploy_agent("envy", "py", env={"TOKEN": token},
                                               command=[sys.executable, "-c", ENV_AGENT])
                return (await agent.wait_for_completion()).output
            if mode == "argv":
                agent = await ctx.deploy_agent(
                    "argv", "py", command=[sys.executable, "-c", ARGV_AGENT, token])
                return (await agent.wait_for_completion()).output
            if mode == "stderr":
                agent = await ctx.deploy_agent("noisy", "py", env={"TOKEN": token},
                                               command=[sys.executable, "-c", STDERR_AGENT])
                return (await agent.wait_for_completion()).output
            if mode == "log_message":
                await ctx.log(f"calling with {token}")
                return "logged"
            if mode == "log_fields":
                await ctx.log("calling", token=token)
            if mode == "metric_tags":
                await ctx.metric("calls", 1, tags={"token": token})
            if mode == "error":
                raise ValueError(f"the service rejected {token}")
            if mode == "bytes":
                return token.encode()
            if mode == "str":
                return {"a": [1, 2, f"Bearer {token}"]}
            if mode == "state":
                ctx.state["creds"] = {"token": token}
            return "unreachable"
        except SecretLeakError as exc:
            SEEN[mode] = exc
            raise


async def _history(client: WorkflowClient, eid: str) -> list[Any]:
    return [s.event for s in await client.store.load(eid)]


def _assert_refused(exc: BaseException, path: str) -> None:
    text = str(exc)
    assert "secret 'token'" in text and path in text, text
    assert SECRET not in text


# the rule ---------------------------------------------------------------------------------
def test_matching_rule_short_values_match_only_whole_tokens() -> None:
    r = Redactor({"env": "prod", "tok": SECRET})
    assert r.find("production-db") is None
    assert r.find("env=prod") == "env" and r.find("prod") == "env"
    assert r.find("prod_db") == "env"  # "_" is neither a letter nor a digit
    assert r.find(f"x{SECRET}y") == "tok"  # 8 characters or more: anywhere
    assert r.text("env=prod production-db") == "env=[secret:env] production-db"
    assert r.find_bytes(b"\xff\x00" + SECRET.encode()) == "tok"
    assert Redactor({"p": "pässwort-latin"}).find_bytes("<pässwort-latin>".encode("latin-1"))
    with pytest.raises(ConfigurationError, match="secret 'e' is empty"):
        Redactor({"e": ""})


def test_a_log_tail_cut_through_a_secret_keeps_no_part_of_it() -> None:
    """A runtime keeps the end of a log: its cut may fall inside a secret, leaving the
    secret's last part at the start, which no longer matches the whole value."""
    r = Redactor({"tok": SECRET})
    for cut in range(1, len(SECRET) - 4):
        shown = r.tail(SECRET[cut:] + "B" * 50 + f" and {SECRET} again\n", 4000)
        assert shown.startswith("[secret:tok]"), (cut, shown)
        assert SECRET[cut:] not in shown and SECRET not in shown
    assert r.tail("x" * 5000 + SECRET, 4000).endswith("[secret:tok]")
    assert len(r.tail("y" * 5000, 4000)) == 4000
    assert r.tail("ordinary 42-line log", 4000) == "ordinary 42-line log"


async def test_ordinary_data_is_stored_unchanged() -> None:
    @workflow(name="leaks_plain")
    class Prod:
        @step()
        async def go(self, ctx: Context) -> Any:
            ctx.state["db"] = "production-db"
            await ctx.log("connecting to production-db", db="production-db")
            return {"db": "production-db"}

    async with test_client(strict_secrets=True) as client:
        ex = await client.run_workflow(Prod(), input="production-db", tags={"db": "production"},
                                       secrets={"env": "prod"})
        assert await ex.get_result() == {"db": "production-db"}
        assert await ex.state() == {"db": "production-db"}
        events = await _history(client, ex.id)
        assert events[0].input == "production-db"
        log = next(e for e in events if isinstance(e, LogRecorded))
        assert log.message == "connecting to production-db"
        assert log.fields == {"db": "production-db"}
        done = next(e for e in events if isinstance(e, StepCompleted))
        assert done.result == {"db": "production-db"}
        # a whole token is a secret's value: refused
        with pytest.raises(SecretLeakError) as info:
            await client.run_workflow(Prod(), input={"q": "env=prod"}, secrets={"env": "prod"})
        assert str(info.value).startswith(
            "secret 'env' found in input of workflow 'leaks_plain' at $[\"q\"]: ")
        assert "env=prod" not in str(info.value)


async def test_empty_secret_values_are_refused_at_start_and_resume() -> None:
    async with test_client(strict_secrets=True) as client:
        with pytest.raises(ConfigurationError, match="secret 'token' is empty"):
            await client.run_workflow(Leaks("str"), secrets={"token": ""})
        record, _ = await client.engine.start(Leaks("log_message"), secrets={"token": SECRET})
        with pytest.raises(ConfigurationError, match="secret 'token' is empty"):
            await client.resume(record.id, secrets={"token": ""})


# refused where values enter ---------------------------------------------------------------
async def test_run_workflow_refuses_input_args_tags_and_keys() -> None:
    async with test_client(strict_secrets=True) as client:
        secrets = {"token": SECRET}
        cases: list[tuple[dict[str, Any], object, str]] = [
            ({"input": {"q": [SECRET]}}, Leaks("str"), '$["q"][0]'),
            ({"tags": {"team": f"x-{SECRET}"}}, Leaks("str"), '$["team"]'),
            ({"idempotency_key": SECRET}, Leaks("str"), "idempotency_key"),
            ({}, Leaks(SECRET), "$[0][0]"),  # constructor argument
        ]
        for kwargs, wf, path in cases:
            with pytest.raises(SecretLeakError) as info:
                await client.run_workflow(wf, secrets=secrets, **kwargs)
            _assert_refused(info.value, path)
            assert info.value.secret == "token"
        assert await client.list_executions() == []


async def test_child_input_agent_output_and_metric_tags_are_refused() -> None:
    @workflow(name="leaks_child")
    class Child:
        @step()
        async def go(self, ctx: Context) -> str:
            return "child"

    @workflow(name="leaks_parent")
    class Parent:
        def __init__(self, mode: str) -> None:
            self.mode = mode

        @step()
        async def go(self, ctx: Context) -> Any:
            token = ctx.secrets["token"]
            if self.mode == "child":
                return await ctx.run_workflow(Child(), input={"token": token})
            if self.mode == "metric":
                await ctx.metric("calls", 1, tags={"who": token})
            agent = await ctx.deploy_agent("echo", "e:1", env={"TOKEN": token})
            return (await agent.wait_for_completion()).output

    reg = MockRegistry()
    mock_agent("echo", registry=reg).returns(lambda call: {"echo": [call.env["TOKEN"]]})
    async with WorkflowClient(store="memory://", runtime=MockRuntime(reg)) as client:
        for mode, path in (("child", '$["token"]'), ("metric", '$["tags"]["who"]'),
                           ("agent", '$["echo"][0]')):
            ex = await client.run_workflow(Parent(mode), secrets={"token": SECRET})
            with pytest.raises(WorkflowFailedError) as info:
                await ex.get_result()
            _assert_refused(info.value, path)
            events = await _history(client, ex.id)
            assert SECRET not in repr(events)
            assert not any(isinstance(e, MetricRecorded) for e in events)
            failed = next(e for e in events if isinstance(e, StepFailed))
            assert failed.error_type in ("SecretLeakError", "SerializationError")


@pytest.mark.parametrize("where", ["name", "image", "network"])
async def test_a_secret_in_an_agent_name_image_or_network_is_refused(where: str) -> None:
    """They are shown as they are (history, logs, container names): an agent launched with
    a secret in one is refused before anything is recorded or launched."""

    @workflow(name=f"leaks_agent_{where}")
    class Deploys:
        @step()
        async def go(self, ctx: Context) -> Any:
            token = ctx.secrets["token"]
            args = {"name": "echo", "image": "e:1", "network": None}
            args[where] = f"x-{token}"
            agent = await ctx.deploy_agent(args["name"], args["image"],
                                           network=args["network"])
            return (await agent.wait_for_completion()).output

    reg = MockRegistry()
    mock_agent("*", registry=reg).returns({"ok": True})
    async with WorkflowClient(store="memory://", runtime=MockRuntime(reg)) as client:
        ex = await client.run_workflow(Deploys(), secrets={"token": SECRET})
        with pytest.raises(WorkflowFailedError) as info:
            await ex.get_result()
        events = await _history(client, ex.id)
    assert f"the agent {where}" in str(info.value) and "'token'" in str(info.value)
    assert SECRET not in repr(events) + str(info.value)
    assert not any(isinstance(e, AgentDeployRequested) for e in events)


async def test_refusals_are_ordinary_step_errors() -> None:
    @workflow(name="leaks_caught")
    class Caught:
        @step()
        async def go(self, ctx: Context) -> str:
            try:
                ctx.state["k"] = ("ok", ctx.secrets["token"])
            except SerializationError as exc:  # SecretLeakError is one
                assert isinstance(exc, SecretLeakError) and exc.path == "$[1]"
                ctx.state["k"] = "without it"
            return "done"

    async with test_client(strict_secrets=True) as client:
        ex = await client.run_workflow(Caught(), secrets={"token": SECRET})
        assert await ex.get_result() == "done"
        assert await ex.state() == {"k": "without it"}


async def test_log_fields_reach_structlog_and_the_event_and_messages_are_redacted() -> None:
    @workflow(name="leaks_log")
    class Logs:
        @step()
        async def go(self, ctx: Context) -> str:
            await ctx.log(f"using {ctx.secrets['token']}", level="warning", user="ann", n=3)
            return "ok"

    async with test_client(strict_secrets=True) as client:
        with capture_logs() as logs:
            ex = await client.run_workflow(Logs(), secrets={"token": SECRET})
        assert await ex.get_result() == "ok"
        line = next(entry for entry in logs if entry.get("step") == "go")
        assert line["event"] == "using [secret:token]"
        assert line["user"] == "ann" and line["n"] == 3 and line["log_level"] == "warning"
        assert SECRET not in repr(logs)
        log = next(e for e in await _history(client, ex.id) if isinstance(e, LogRecorded))
        assert log.fields == {"user": "ann", "n": 3}


# end to end: SQLite, process agents, the CLI ---------------------------------------------
REFUSED = {
    "log_fields": '$["token"]',
    "metric_tags": '$["tags"]["token"]',
    "bytes": "$",
    "str": '$["a"][2]',
    "state": '$["token"]',
}


async def _run_all(url: str, agents: Path) -> dict[str, str]:
    """Run every mode; returns execution ids by mode."""
    ids: dict[str, str] = {}
    secrets = {"token": SECRET}
    runtime = ProcessRuntime(root=agents, poll_interval=0.02)
    async with WorkflowClient(store=url, runtime=runtime) as client:
        for mode in ("env", "argv", "stderr", "log_message", "error", *REFUSED):
            ex = await client.run_workflow(Leaks(mode), ExecutionMode.SYNC, secrets=secrets)
            ids[mode] = ex.id
            events = await _history(client, ex.id)
            if mode == "env":
                assert await ex.get_result() == {"env_ok": True, "dir_clean": True}
                req = next(e for e in events if isinstance(e, AgentDeployRequested))
                assert req.env == {"TOKEN": "[secret:token]"}
            elif mode == "argv":
                assert await ex.get_result() == {"argv_ok": True, "dir_clean": True,
                                                 "spec_ref": True}
                req = next(e for e in events if isinstance(e, AgentDeployRequested))
                assert req.command is not None and req.command[-1] == "[secret:token]"
            elif mode == "log_message":
                assert await ex.get_result() == "logged"
                assert any("calling with [secret:token]" in line for line in await ex.logs())
            elif mode == "stderr":
                with pytest.raises(WorkflowFailedError, match=r"\[secret:token\]"):
                    await ex.get_result()
                failed = next(e for e in events if isinstance(e, AgentFailed))
                assert "agent failing with [secret:token]" in failed.log_tail
            elif mode == "error":
                with pytest.raises(WorkflowFailedError,
                                   match=r"the service rejected \[secret:token\]"):
                    await ex.get_result()
            else:
                with pytest.raises(WorkflowFailedError) as info:
                    await ex.get_result()
                assert info.value.error_type == "SecretLeakError"
                _assert_refused(info.value, REFUSED[mode])
                if mode != "bytes" and mode != "str":  # raised inside the step's own code
                    assert isinstance(SEEN[mode], SecretLeakError)
                    assert SEEN[mode].path == REFUSED[mode]  # type: ignore[attr-defined]
        for kwargs in ({"tags": {"t": SECRET}}, {"input": {"q": SECRET}}):
            with pytest.raises(SecretLeakError) as refused:
                await client.run_workflow(Leaks("str"), secrets=secrets, **kwargs)
            _assert_refused(refused.value, '$["t"]' if "tags" in kwargs else '$["q"]')
    return ids


def _flow(args: list[str]) -> str:
    cli._out = cli._Output()  # what main() does: a fresh output, no secret known
    result = CliRunner().invoke(cli.app, args, catch_exceptions=False)
    return f"{result.stdout}\n{result.stderr}\nexit {result.exit_code}"


def test_no_secret_in_sqlite_agent_dirs_or_cli_output(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flow.db'}"
    agents = tmp_path / "agents"
    ids = asyncio.run(_run_all(url, agents))
    needle = SECRET.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    database = b"".join(p.read_bytes() for p in files if p.name.startswith("flow.db"))
    assert b"[secret:token]" in database  # the grep looks where the events are
    for path in files:
        assert needle not in path.read_bytes(), path
    outputs = []
    try:
        outputs.append(_flow(["list", "--store", url]))
        outputs.append(_flow(["list", "--store", url, "--json"]))
        for eid in ids.values():
            for command in ("status", "history", "replay"):
                for extra in ([], ["--json"]):
                    outputs.append(_flow([command, eid, "--store", url, *extra]))
            outputs.append(_flow(["logs", eid, "--store", url]))
    finally:
        structlog.reset_defaults()  # the CLI configured logging to its captured stderr
    text = "\n".join(outputs)
    assert "[secret:token]" in text and ids["env"] in text
    assert SECRET not in text
    assert "Traceback" not in text


def test_cli_redacts_secrets_from_error_messages() -> None:
    try:
        out = _flow(["run", "missing.py", "--secret", f"token={SECRET}", "--tag", SECRET])
    finally:
        structlog.reset_defaults()
    assert "--tag must look like KEY=VALUE" in out and "[secret:token]" in out, out
    assert SECRET not in out
