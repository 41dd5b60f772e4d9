"""Workflows for the pre-deploy gate tests (``flow replay --check``).

Each runs one agent, then sleeps for ``nap``: with a long nap an execution stays unfinished
(suspended in the store, its first step done), which is what the gate checks. The tests
copy this file with one change and check the new code against the store.
"""

from __future__ import annotations

from typing import Any

from agentainer_flow import Context, step, workflow


@workflow(name="check_alpha")
class Alpha:
    def __init__(self, n: int = 0, nap: str = "1h") -> None:
        self.n = n
        self.nap = nap

    @step()
    async def fetch(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(name="fetcher", image="python:3", command=["fetch"])
        result = await agent.wait_for_completion()
        return {"n": self.n, **result.output}

    @step(depends_on="fetch")
    async def rest(self, ctx: Context, fetch: dict[str, Any]) -> dict[str, Any]:
        await ctx.sleep(self.nap)
        return fetch


@workflow(name="check_beta")
class Beta:
    def __init__(self, n: int = 0, nap: str = "1h") -> None:
        self.n = n
        self.nap = nap

    @step()
    async def index(self, ctx: Context) -> int:
        agent = await ctx.deploy_agent(name="indexer", image="python:3", command=["index"])
        await agent.wait_for_completion()
        return self.n

    @step(depends_on="index")
    async def rest(self, ctx: Context, index: int) -> int:
        await ctx.sleep(self.nap)
        return index
