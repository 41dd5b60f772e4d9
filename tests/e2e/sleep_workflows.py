"""Workflows for the suspension tests: executions that sleep in every instance."""

from __future__ import annotations

from agentainer_flow import Context, step, workflow


@workflow(name="napper")
class Napper:
    def __init__(self, n: int, nap: str = "3s") -> None:
        self.n = n
        self.nap = nap

    @step(parallel=True, count=3)
    async def nap_(self, ctx: Context, index: int) -> float:
        await ctx.sleep(self.nap)
        return ctx.now().timestamp()

    @step(depends_on=["nap_"], reduce=True)
    async def woke(self, ctx: Context, nap__results: list) -> dict:
        return {"n": self.n, "woke": max(nap__results)}
