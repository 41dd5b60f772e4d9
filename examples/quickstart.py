"""Quickstart: a durable word-count workflow on the embedded defaults (a SQLite file and the
process runtime, where each agent is a local subprocess).

``plan`` records how many chunks to make, three parallel ``count`` instances each deploy an
agent (``examples/agents/word_count.py``) that counts the words of one chunk, and ``total``
adds their counts up. The script starts an execution, prints its events as they happen and
then its result. Every run starts a new execution.

    python examples/quickstart.py

The history goes to ``$QUICKSTART_STORE``, else to the ``WorkflowClient`` default
(``$FLOW_STORE``, else ``sqlite:///.flow/flow.db`` in the current directory), which is also
where the ``flow`` command looks: ``flow list``, ``flow history ID``, and
``flow replay ID -m examples/quickstart.py`` show what it recorded. The workflow runs under
the CLI too (``text`` has a default, so no ``--config`` is needed)::

    flow run examples/quickstart.py \
        --image 'word-counter:latest=python examples/agents/word_count.py'
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow

HERE = Path(__file__).resolve().parent
TEXT = "the quick brown fox jumps over the lazy dog while the durable engine keeps count"


@workflow(name="word_count", description="Count words in parallel agents", max_retries=2)
class WordCount:
    def __init__(self, text: str = TEXT, chunks: int = 3) -> None:
        self.text = text
        self.chunks = chunks

    @step()
    async def plan(self, ctx: Context) -> dict:
        ctx.state["chunks"] = self.chunks
        await ctx.log(f"splitting {len(self.text.split())} words into {self.chunks} chunks")
        return {"chunks": self.chunks}

    @step(depends_on=["plan"], parallel=True, max_workers=3)
    async def count(self, ctx: Context, chunk_id: int) -> dict:
        agent = await ctx.deploy_agent(
            name=f"counter-{chunk_id}",
            image="word-counter:latest",  # mapped to a local command below
            env={
                "TEXT": self.text,
                "CHUNK_ID": str(chunk_id),
                "TOTAL_CHUNKS": str(ctx.parallel_context.total),
            },
            timeout="1m",
        )
        result = await agent.wait_for_completion()
        return result.output

    @step(depends_on=["count"], reduce=True)
    async def total(self, ctx: Context, count_results: list[dict]) -> dict:
        words = sum(r["words"] for r in count_results)
        longest = max((r["longest"] for r in count_results), key=len)
        ctx.state["words"] = words
        return {"words": words, "longest": longest}


async def main() -> int:
    store = os.environ.get("QUICKSTART_STORE") or None  # None: the client's default
    images = {"word-counter:latest": [sys.executable, str(HERE / "agents" / "word_count.py")]}
    async with WorkflowClient(store=store, runtime="process", images=images) as client:
        execution = await client.run_workflow(
            WordCount(TEXT), ExecutionMode.ASYNC, tags={"example": "quickstart"})
        async for event in execution.stream_events():
            print(f"[{event.timestamp:%H:%M:%S}] {event.step or '-':<8} {event.message}")
        result = await execution.get_result()
        print(f"execution {execution.id}: {result}")
        assert result["words"] == len(TEXT.split()), result
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
