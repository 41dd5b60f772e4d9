"""Runs or resumes a one-step workflow that deploys one agent, for the launch kill tests.

The ``process`` runtime is not configured: its agents live where the store is. The agent
appends its id to ``$RUNS`` (so the test counts its runs), waits for ``$GATE`` if set, writes
its output, touches ``$WROTE`` and waits for ``$GATE2`` if set. With ``FLOW_TEST_KILL_AT`` set
the engine SIGKILLs itself at that point of the launch.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from agentainer_flow import Context, WorkflowClient, step, workflow

AGENT = """
import json, os, time

def wait_for(name):
    path = os.environ.get(name)
    while path and not os.path.exists(path):
        time.sleep(0.02)

with open(os.environ["RUNS"], "a") as f:
    f.write(os.environ["FLOW_AGENT_ID"] + "\\n")
wait_for("GATE")
with open(os.environ["FLOW_OUTPUT"], "w") as f:
    json.dump({"value": int(os.environ["VALUE"]) * 2}, f)
if os.environ.get("WROTE"):
    open(os.environ["WROTE"], "w").close()
wait_for("GATE2")
"""

_PASSED = ("RUNS", "GATE", "WROTE", "GATE2")


def mark(what: str) -> None:
    with open(os.environ["MARKS"], "a") as f:
        f.write(what + "\n")


@workflow(name="launch_kill")
class OneAgent:
    def __init__(self, value: int) -> None:
        self.value = value

    @step()
    async def only(self, ctx: Context) -> dict:
        env = {k: os.environ[k] for k in _PASSED if os.environ.get(k)}
        agent = await ctx.deploy_agent("worker", "launch-kill:1",
                                       command=[sys.executable, "-c", AGENT],
                                       env={**env, "VALUE": str(self.value)})
        mark(f"deployed:{os.environ['MODE']}")
        result = await agent.wait_for_completion()
        return {"value": result["value"]}


async def main(mode: str, store_url: str, execution_id: str) -> None:
    os.environ["MODE"] = mode
    async with WorkflowClient(store=store_url) as client:
        if mode == "run":
            execution = await client.run_workflow(OneAgent(21), execution_id=execution_id)
        else:
            execution = await client.resume(execution_id)
        result = await execution.get_result()
        root = str(getattr(client.runtime, "root", ""))
    print(json.dumps({"result": result, "root": root}))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
