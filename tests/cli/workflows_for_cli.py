"""Workflows the CLI tests run with ``flow run tests/cli/workflows_for_cli.py:NAME``.

Agents run on the default ``process`` runtime as tiny Python commands that print a JSON
object (the output protocol's last-stdout-line rule).
"""

from __future__ import annotations

import sys
from typing import Any

from agentainer_flow import Context, step, workflow

PRINT_X = [sys.executable, "-c", "print('{\"x\": 1}')"]
FAIL = [sys.executable, "-c", "import sys; print('boom: disk on fire'); sys.exit(3)"]
# prints the secret it gets through its environment, so redaction is exercised end to end
ECHO_TOKEN = [sys.executable, "-c",
              "import json, os, sys; t = os.environ['TOKEN']; print('token:', t);"
              " print('token:', t, file=sys.stderr); print(json.dumps({'seen': len(t)}))"]


@workflow(name="cli_ok")
class OkWorkflow:
    """Two steps: an agent, then a step combining its output, the config and the input."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config or {}

    @step()
    async def fetch(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(name="fetcher", image="python:3", command=PRINT_X)
        result = await agent.wait_for_completion()
        await ctx.log("fetched x")
        return dict(result.output)

    @step(depends_on="fetch")
    async def finish(self, ctx: Context, fetch: dict[str, Any]) -> dict[str, Any]:
        return {"x": fetch["x"], "greeting": self.config.get("greeting"), "input": ctx.input}


@workflow(name="cli_fail")
class FailWorkflow:
    """Its only agent exits non-zero."""

    @step()
    async def explode(self, ctx: Context) -> None:
        agent = await ctx.deploy_agent(name="exploder", image="python:3", command=FAIL)
        await agent.wait_for_completion()


@workflow(name="cli_secret")
class SecretWorkflow:
    """Hands a secret to an agent that prints it (its logs), logs it, and returns only
    what is not secret: a result holding the secret would be refused (SecretLeakError)."""

    @step()
    async def use_secret(self, ctx: Context) -> dict[str, Any]:
        token = ctx.secrets["token"]
        agent = await ctx.deploy_agent(name="echo", image="python:3",
                                       env={"TOKEN": token}, command=ECHO_TOKEN)
        result = await agent.wait_for_completion()
        await ctx.log(f"the token is {token}")
        return {"seen": result.output["seen"], "token_length": len(token)}


@workflow(name="cli_kwargs")
class KwargsWorkflow:
    """Takes several constructor arguments: ``--config`` passes them by name."""

    def __init__(self, greeting: str, times: int = 1) -> None:
        self.greeting = greeting
        self.times = times

    @step()
    async def greet(self, ctx: Context) -> str:
        return " ".join([self.greeting] * self.times)


@workflow(name="cli_slow")
class SlowWorkflow:
    """One agent that takes ``seconds`` to finish: long enough to stop a worker under it."""

    def __init__(self, seconds: float = 2.0) -> None:
        self.seconds = seconds

    @step()
    async def nap(self, ctx: Context) -> dict[str, Any]:
        code = f"import time; time.sleep({self.seconds}); print('{{\"slept\": true}}')"
        agent = await ctx.deploy_agent(name="napper", image="python:3",
                                       command=[sys.executable, "-c", code])
        result = await agent.wait_for_completion()
        return dict(result.output)


@workflow(name="cli_late_secret")
class LateSecretWorkflow:
    """An expensive first step (it counts its runs in a file), then a step needing a secret."""

    def __init__(self, marks: str) -> None:
        self.marks = marks

    @step()
    async def expensive(self, ctx: Context) -> int:
        with open(self.marks, "a") as f:  # noqa: ASYNC230 - a test's marker file
            f.write("expensive\n")
        return 41

    @step(depends_on=["expensive"])
    async def late(self, ctx: Context, expensive_result: int) -> dict[str, Any]:
        token = ctx.secrets["token"]
        return {"answer": expensive_result + 1, "token_length": len(token)}


@workflow(name="cli_state")
class StateWorkflow:
    """Writes the workflow state in each of its two steps (for ``replay --until``)."""

    @step()
    async def first(self, ctx: Context) -> int:
        ctx.state["stage"] = "first"
        return 1

    @step(depends_on="first")
    async def second(self, ctx: Context, first: int) -> int:
        ctx.state["stage"] = "second"
        ctx.state["total"] = first + 1
        return first + 1


@workflow(name="cli_marks")
class MarksWorkflow:
    """Two steps that each append their name to a file: which bodies ran, and how often."""

    def __init__(self, marks: str) -> None:
        self.marks = marks

    def _mark(self, name: str) -> None:
        with open(self.marks, "a") as f:
            f.write(name + "\n")

    @step()
    async def expensive(self, ctx: Context) -> int:
        self._mark("expensive")
        return 41

    @step(depends_on="expensive")
    async def cheap(self, ctx: Context, expensive: int) -> int:
        self._mark("cheap")
        return expensive + 1


@workflow(name="cli_greeter")
class Greeter:
    """One constructor parameter: ``--config {"greeting": ...}`` passes it by name."""

    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    @step()
    async def greet(self, ctx: Context) -> str:
        return f"{self.greeting}!"
