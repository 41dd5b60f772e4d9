"""Runs or resumes one execution in a child process; with ``KILL_AFTER_SEQ`` set it
SIGKILLs itself as soon as the store has durably recorded that many events."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crash_workflows import SmallFlow

from agentainer_flow import WorkflowClient
from agentainer_flow.engine.runtimes.process import ProcessRuntime


async def main(mode: str, store_url: str, execution_id: str) -> None:
    kill_after = int(os.environ.get("KILL_AFTER_SEQ", "0"))
    runtime = ProcessRuntime(root=os.environ["AGENTS_DIR"])
    client = WorkflowClient(store=store_url, runtime=runtime)
    await client.open()
    store = client.store
    if kill_after:
        append, create = store.append, store.create_execution

        def die_if_due(seq: int) -> None:
            if seq >= kill_after:
                Path(os.environ["MARKS"]).parent.joinpath("killed_at").write_text(str(seq))
                os.kill(os.getpid(), signal.SIGKILL)

        async def killing_append(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = await append(*args, **kwargs)
            die_if_due(result.last_seq)
            return result

        async def killing_create(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = await create(*args, **kwargs)
            die_if_due(1)
            return result

        store.append = killing_append  # type: ignore[method-assign]
        store.create_execution = killing_create  # type: ignore[method-assign]
    if mode == "run":
        execution = await client.run_workflow(SmallFlow(3), execution_id=execution_id)
    elif mode == "runkey":  # the id is an idempotency key: concurrent callers share a run
        execution = await client.run_workflow(SmallFlow(3), idempotency_key=execution_id)
        print(f"execution {execution.id}", file=sys.stderr)
    else:
        execution = await client.resume(execution_id)
    result = await execution.get_result()
    await client.close()
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
