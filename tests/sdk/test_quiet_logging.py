"""The library prints nothing unless the application configures logging: its entries go
through structlog when the application configured structlog (as the ``flow`` CLI does), else
to standard library loggers named ``agentainer_flow...`` that have only a ``NullHandler``."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from agentainer_flow import Context, RetryPolicy, WorkflowClient, step, workflow
from agentainer_flow.store._logging import get_logger

ROOT = Path(__file__).resolve().parents[2]
#: how a structlog entry looks in its default console rendering, or in the CLI's JSON
LOG_LINE = re.compile(r"\[\s*(debug|info|warning|error|critical)\s*\]|\"event\":")

SCRIPT = """
import asyncio
import logging
import sys

from agentainer_flow import Context, RetryPolicy, WorkflowClient, step, workflow

{setup}

@workflow(name="quiet")
class Quiet:
    @step(retry_policy=RetryPolicy(max_attempts=2, initial_delay="1s"))
    async def work(self, ctx: Context) -> str:
        await ctx.log("working hard", item=7)
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")  # a warning: step_retry_scheduled
        return "done"


async def main() -> None:
    async with WorkflowClient(store="memory://", runtime="mock") as client:
        print("result:", await (await client.run_workflow(Quiet())).get_result())


asyncio.run(main())
"""


def _run_script(tmp_path: Path, setup: str = "") -> subprocess.CompletedProcess[str]:
    path = tmp_path / "app.py"
    path.write_text(SCRIPT.format(setup=textwrap.dedent(setup)))
    env = {k: v for k, v in os.environ.items() if k not in ("FLOW_STORE", "FLOW_LOG_LEVEL")}
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)


def test_the_quickstart_prints_only_its_own_output(tmp_path: Path) -> None:
    env = {**os.environ, "QUICKSTART_STORE": f"sqlite:///{tmp_path / 'q.db'}"}
    env.pop("FLOW_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "workflow completed" in proc.stdout  # it ran, and printed its events
    for line in proc.stdout.splitlines():
        assert not LOG_LINE.search(line), f"a log line on stdout: {line!r}"
    assert "execution_started" not in proc.stdout + proc.stderr
    assert "execution_finished" not in proc.stdout + proc.stderr
    assert proc.stderr == ""


def test_nothing_is_printed_without_logging_configured(tmp_path: Path) -> None:
    proc = _run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "result: done\n"
    assert proc.stderr == ""  # not even the retry's warning (no last-resort handler)


def test_standard_logging_of_the_application_shows_the_entries(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, """
        logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                            format="%(name)s %(levelname)s %(message)s")
        """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("agentainer_flow INFO execution_started execution_id='")
               for line in lines), lines
    assert any(line.startswith("agentainer_flow INFO working hard ") and "item=7" in line
               and "step='work'" in line for line in lines), lines
    assert any(line.startswith("agentainer_flow INFO step_retry_scheduled ")
               for line in lines), lines
    assert lines[-1] == "result: done"


def test_a_level_on_the_library_logger_filters(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, """
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        logging.getLogger("agentainer_flow").setLevel(logging.WARNING)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["result: done"]  # the retry is info, as is the rest


def test_structlog_configured_by_the_application_gets_the_entries(tmp_path: Path) -> None:
    proc = _run_script(tmp_path, """
        import structlog
        structlog.configure(processors=[structlog.processors.JSONRenderer()],
                            logger_factory=structlog.PrintLoggerFactory(sys.stderr))
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "result: done\n"
    assert '"event": "execution_started"' in proc.stderr
    assert '"event": "working hard"' in proc.stderr and '"item": 7' in proc.stderr


@workflow(name="quiet_in_process")
class Quiet:
    @step(retry_policy=RetryPolicy(max_attempts=1))
    async def work(self, ctx: Context) -> str:
        await ctx.log("hello", n=1)
        return "done"


async def test_capture_logs_sees_the_entries() -> None:
    with capture_logs() as entries:
        async with WorkflowClient(store="memory://", runtime="mock") as client:
            await (await client.run_workflow(Quiet())).get_result()
    events = [e["event"] for e in entries]
    assert events[0] == "execution_started" and "hello" in events
    assert events[-1] == "execution_finished"
    assert next(e for e in entries if e["event"] == "hello")["n"] == 1


async def test_unconfigured_entries_reach_standard_logging(
        caplog: pytest.LogCaptureFixture) -> None:
    assert not structlog.is_configured()
    with caplog.at_level(logging.INFO, logger="agentainer_flow"):
        async with WorkflowClient(store="memory://", runtime="mock") as client:
            await (await client.run_workflow(Quiet())).get_result()
    names = {r.name for r in caplog.records}
    assert names == {"agentainer_flow"}
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0].startswith("execution_started execution_id=")
    assert any(m.startswith("hello ") and "n=1" in m for m in messages)


def test_logger_names_and_binding() -> None:
    with pytest.raises(ValueError, match="start with 'agentainer_flow'"):
        get_logger("myapp")
    log = get_logger("agentainer_flow.store").bind(execution_id="x1")
    assert log.name == "agentainer_flow.store"
    stream = io.StringIO()
    structlog.configure(processors=[structlog.processors.KeyValueRenderer(sort_keys=True)],
                        logger_factory=structlog.PrintLoggerFactory(stream))
    log.bind(step="s").warning("it_happened", attempt=2)
    assert stream.getvalue() == "attempt=2 event='it_happened' execution_id='x1' step='s'\n"


WORKFLOW = """
from agentainer_flow import Context, step, workflow

@workflow(name="cli_quiet")
class CliQuiet:
    @step()
    async def work(self, ctx: Context) -> str:
        await ctx.log("from the step")
        return "done"
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_cli_sends_logs_to_stderr_by_its_verbosity(tmp_path: Path, verbose: bool) -> None:
    (tmp_path / "wf.py").write_text(WORKFLOW)
    env = {k: v for k, v in os.environ.items() if k not in ("FLOW_STORE", "FLOW_LOG_LEVEL")}
    args = [sys.executable, "-m", "agentainer_flow._cli", *(["-v"] if verbose else []),
            "run", "wf.py", "--store", f"sqlite:///{tmp_path / 'flow.db'}", "--quiet"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '"done"'  # stdout holds the result alone
    assert ("execution_started" in proc.stderr) is verbose
