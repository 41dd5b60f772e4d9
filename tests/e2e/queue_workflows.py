"""Workflows for the queue tests: a job that records when it ran, to measure overlap."""

from __future__ import annotations

import asyncio

from agentainer_flow import Context, step, workflow


@workflow(name="queued_job")
class Job:
    def __init__(self, n: int, hold: float = 0.4) -> None:
        self.n = n
        self.hold = hold

    @step()
    async def work(self, ctx: Context) -> dict:
        start = ctx.now()
        await asyncio.sleep(self.hold)  # busy, holding its place in the queue
        return {"n": self.n, "start": start, "end": ctx.now()}
