"""Workflows the test server and its workers load (next to the seed's ``DataWorkflow``,
loaded from ``tests/sdk/seed_workflows.py``)."""

from __future__ import annotations

from agentainer_flow import Context, step, workflow


@workflow(name="data_workflow")
class MonitoredWorkflow:
    """The workflow the seed's section 8 watches: two steps; the second fails when asked."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    @step(name="load")
    async def load(self, ctx: Context) -> int:
        return 42

    @step(name="check", depends_on=["load"])
    async def check(self, ctx: Context, load_result: int) -> int:
        if self.fail:
            raise ValueError("the check failed, as asked")
        return load_result + 1


@workflow(name="ticker")
class Ticker:
    """Many events, spread over time: ``ticks`` log lines, ``pause`` apart."""

    def __init__(self, ticks: int = 20, pause: str = "100ms") -> None:
        self.ticks = ticks
        self.pause = pause

    @step(name="tick")
    async def tick(self, ctx: Context) -> int:
        for i in range(self.ticks):
            await ctx.log(f"tick {i}")
            await ctx.sleep(self.pause)
        return self.ticks


@workflow(name="needs_secret")
class NeedsSecret:
    """Reads a secret, so that leaks of it can be looked for."""

    @step(name="use")
    async def use(self, ctx: Context) -> int:
        key = ctx.secrets["api_key"]
        await ctx.log(f"calling the service with key {key}")  # recorded redacted
        return len(key)
