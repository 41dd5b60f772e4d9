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


BODIES: list[str] = []  # step bodies run in this process (the in-process drain test)


@workflow(name="two_stage")
class TwoStage:
    @step()
    async def first(self, ctx: Context) -> int:
        BODIES.append("first")
        await asyncio.sleep(1.0)
        return 1

    @step(depends_on=["first"])
    async def second(self, ctx: Context, first: int) -> int:
        BODIES.append("second")
        return first + 1
