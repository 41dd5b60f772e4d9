"""Workflows for the child-suspension tests: parents whose step waits for a child workflow,
and children that sleep durably (``ctx.sleep``, suspended themselves) or hold their worker
slot (``asyncio.sleep``, busy in the process)."""

from __future__ import annotations

import asyncio

from agentainer_flow import Context, step, workflow


@workflow(name="napping_child")
class NappingChild:
    """Sleeps durably, then answers ``n * 10``."""

    def __init__(self, n: int, nap: str = "3s") -> None:
        self.n = n
        self.nap = nap

    @step()
    async def nap_(self, ctx: Context) -> int:
        await ctx.sleep(self.nap)
        return self.n * 10


@workflow(name="busy_child")
class BusyChild:
    """Holds its worker slot for ``hold`` seconds (not a durable sleep), then answers
    ``n * 10``."""

    def __init__(self, n: int, hold: float = 0.5) -> None:
        self.n = n
        self.hold = hold

    @step()
    async def work(self, ctx: Context) -> int:
        await asyncio.sleep(self.hold)
        return self.n * 10


@workflow(name="waiting_parent")
class WaitingParent:
    """One step that runs a child (``busy``: a ``BusyChild`` holding its slot ``wait``
    seconds, else a ``NappingChild`` sleeping ``wait``) and waits for its result."""

    def __init__(self, n: int, wait: str = "3s", busy: bool = False) -> None:
        self.n = n
        self.wait = wait
        self.busy = busy

    @step()
    async def spawn(self, ctx: Context) -> dict:
        child = (BusyChild(self.n, float(self.wait.rstrip("s"))) if self.busy
                 else NappingChild(self.n, self.wait))
        result = await ctx.run_workflow(child)
        return {"n": self.n, "child": result}
