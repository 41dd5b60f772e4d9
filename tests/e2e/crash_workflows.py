"""Workflows for the crash tests. Step bodies and agents leave marks in files named by
environment variables, so the test can count what ran, across processes."""

from __future__ import annotations

import asyncio
import os
import sys

from agentainer_flow import Context, step, workflow

AGENT = (
    "import json, os, time\n"
    "with open(os.environ['LAUNCHES'], 'a') as f: f.write(os.environ['FLOW_AGENT_ID'] + '\\n')\n"
    "time.sleep(float(os.environ.get('AGENT_SECONDS', '0')))\n"
    "json.dump({'value': int(os.environ['VALUE']) * 10},"
    " open(os.environ['FLOW_OUTPUT'], 'w'))\n"
)


def mark(what: str) -> None:
    with open(os.environ["MARKS"], "a") as f:
        f.write(what + "\n")


async def run_agent(ctx: Context, name: str, value: int, seconds: float = 0.0) -> int:
    agent = await ctx.deploy_agent(
        name, "crash-agent:1", command=[sys.executable, "-c", AGENT],
        env={"VALUE": str(value), "LAUNCHES": os.environ["LAUNCHES"],
             "AGENT_SECONDS": str(seconds)})
    result = await agent.wait_for_completion()
    return int(result["value"])


@workflow(name="crash_small")
class SmallFlow:
    def __init__(self, base: int) -> None:
        self.base = base

    @step()
    async def prepare(self, ctx: Context) -> int:
        mark(f"prepare:{ctx.attempt}")
        ctx.state["base"] = self.base
        return self.base

    @step(depends_on=["prepare"])
    async def fetch(self, ctx: Context, prepare_result: int) -> int:
        # FETCHER_NAME lets a test change the code between a crash and the resume
        name = os.environ.get("FETCHER_NAME", "fetcher")
        seconds = float(os.environ.get("SLOW_FETCH", "0.2"))
        value = await run_agent(ctx, name, prepare_result, seconds=seconds)
        if os.environ.get("HANG_AFTER_AGENT"):
            mark("fetch:agent-done")
            await asyncio.sleep(3600)  # the test SIGKILLs the process here
        mark(f"fetch:{ctx.attempt}")
        return value

    @step(depends_on=["fetch"], parallel=True, count=2)
    async def work(self, ctx: Context, i: int) -> int:
        value = await run_agent(ctx, f"worker-{i}", ctx.state["base"] + i)
        ctx.state[f"w{i}"] = value
        mark(f"work{i}:{ctx.attempt}")
        return value

    @step(depends_on=["work", "fetch"])
    async def total(self, ctx: Context, work_results: list[int], fetch_result: int) -> dict:
        mark(f"total:{ctx.attempt}")
        return {"sum": sum(work_results) + fetch_result, "parts": work_results}
