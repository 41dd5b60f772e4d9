"""The workflow that ``queue_throughput.py`` puts on a queue: a chain of 5 trivial steps.

``flow worker -m benchmarks/_queue_bench_workflows.py`` imports it; the benchmark imports
it too, to start executions.
"""

from __future__ import annotations

from agentainer_flow import Context, step, workflow


@workflow(name="queue_bench_chain5")
class Chain5:
    """Five steps, each after the one before, each returning a small value."""

    @step()
    async def s1(self, ctx: Context) -> int:
        return 1

    @step(depends_on=["s1"])
    async def s2(self, ctx: Context, s1: int) -> int:
        return s1 + 1

    @step(depends_on=["s2"])
    async def s3(self, ctx: Context, s2: int) -> int:
        return s2 + 1

    @step(depends_on=["s3"])
    async def s4(self, ctx: Context, s3: int) -> int:
        return s3 + 1

    @step(depends_on=["s4"])
    async def s5(self, ctx: Context, s4: int) -> dict[str, int]:
        return {"n": s4 + 1}
