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


@workflow(name="counted_job")
class Counted:
    """Two steps that each append a line to ``path`` when their body runs: a body run twice
    shows as a line twice, whichever process ran it."""

    def __init__(self, n: int, path: str) -> None:
        self.n = n
        self.path = path

    def _ran(self, what: str) -> None:
        with open(self.path, "a") as f:
            f.write(f"{self.n}:{what}\n")

    @step()
    async def a(self, ctx: Context) -> int:
        self._ran("a")
        return self.n

    @step(depends_on=["a"])
    async def b(self, ctx: Context, a: int) -> int:
        self._ran("b")
        return a * 10
