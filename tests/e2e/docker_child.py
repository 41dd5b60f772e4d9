"""Runs or resumes a one-step workflow whose agent is a container, for the docker kill tests.

The agent prints ``tick N`` four times a second for ``$SLEEP`` seconds, then its output as
its last stdout line. With ``TWO_STEPS`` set a second step runs a second container. With
``FLOW_TEST_KILL_AT`` set the engine SIGKILLs itself at that point of the launch.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from agentainer_flow import Context, WorkflowClient, step, workflow

IMAGE = "agentainer-flow-test/busybox:1"


@workflow(name="docker_kill")
class OneContainer:
    def __init__(self, value: int) -> None:
        self.value = value

    @step()
    async def only(self, ctx: Context) -> dict:
        agent = await ctx.deploy_agent(
            "worker", IMAGE, env={"VALUE": str(self.value), "SLEEP": os.environ["SLEEP"]},
            command=["sh", "-c", 'i=0; while [ $i -lt $((SLEEP * 4)) ]; do echo "tick $i"; '
                     'i=$((i + 1)); sleep 0.25; done; echo "{\\"value\\": $((VALUE * 2))}"'])
        result = await agent.wait_for_completion()
        return {"value": result["value"]}

    @step(depends_on=["only"])
    async def then(self, ctx: Context, only: dict) -> dict:
        if os.environ.get("TWO_STEPS"):  # a second container, while the first is done
            agent = await ctx.deploy_agent("second", IMAGE, command=["sh", "-c", "sleep 2"])
            await agent.wait_for_completion()
        return only


async def main(mode: str, store_url: str, execution_id: str) -> None:
    async with WorkflowClient(store=store_url, runtime="docker") as client:
        if mode == "run":
            execution = await client.run_workflow(OneContainer(21), execution_id=execution_id)
        else:
            execution = await client.resume(execution_id)
        result = await execution.get_result()
    print(json.dumps({"result": result}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
