"""The chaos test's workflow: parallel steps, a durable sleep and agents (process runtime).

Every step body appends ``body <execution> <step> <instance> <attempt>`` to ``$CHAOS_BODIES``
when it starts, and every agent appends its agent id to ``$CHAOS_RUNS``: the test counts
re-run bodies and agent launches from outside the engine.
"""

from __future__ import annotations

import os

from agentainer_flow import Context, step, workflow

AGENT = 'echo "$FLOW_AGENT_ID" >> "$CHAOS_RUNS"; sleep 0.2; echo "{\\"v\\": $((N * 2))}"'


def _mark(ctx: Context, step_name: str, instance: int) -> None:
    with open(os.environ["CHAOS_BODIES"], "a") as f:
        f.write(f"body {ctx.execution_id} {step_name} {instance} {ctx.attempt}\n")


@workflow(name="chaos")
class Chaos:
    def __init__(self, n: int) -> None:
        self.n = n

    @step(parallel=True, count=3)
    async def fan(self, ctx: Context, index: int) -> int:
        _mark(ctx, "fan", index)
        agent = await ctx.deploy_agent(
            name=f"fan-{index}", image="chaos:1", command=["sh", "-c", AGENT],
            env={"N": str(self.n + index), "CHAOS_RUNS": os.environ["CHAOS_RUNS"]})
        return int((await agent.wait_for_completion())["v"])

    @step(depends_on=["fan"], reduce=True)
    async def nap(self, ctx: Context, fan_results: list) -> int:
        _mark(ctx, "nap", 0)
        await ctx.sleep("3s")  # long enough for the worker to let it go (suspend)
        return sum(fan_results)

    @step(depends_on=["nap"])
    async def total(self, ctx: Context, nap_result: int) -> dict:
        _mark(ctx, "total", 0)
        agent = await ctx.deploy_agent(
            name="total", image="chaos:1", command=["sh", "-c", AGENT],
            env={"N": str(nap_result), "CHAOS_RUNS": os.environ["CHAOS_RUNS"]})
        return {"n": self.n, "v": int((await agent.wait_for_completion())["v"])}
