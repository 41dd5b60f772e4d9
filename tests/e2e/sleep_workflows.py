"""Workflows for the suspension tests: executions that sleep in every instance."""

from __future__ import annotations

from agentainer_flow import Context, RetryPolicy, step, workflow


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


@workflow(name="backoff")
class Backoff:
    """Fails its first attempt; the retry waits 3 s (fixed backoff)."""

    @step(retry_policy=RetryPolicy(max_attempts=2, backoff="fixed", initial_delay="3s"))
    async def flaky(self, ctx: Context) -> int:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return ctx.attempt
