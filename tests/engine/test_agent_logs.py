"""What agents print reaches the execution's logs: live (``stream_logs`` / ``flow logs -f``),
tagged with the agent's name, secrets redacted, and kept after the agent is gone."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow.store.sqlite import SQLiteEventStore

SECRET = "tok-3f9a1c77e2b54d08"
SCRIPT = ('echo "starting with $TOKEN"; sleep 2; echo "half way" >&2; '
          'echo "{\\"done\\": true}"')


@workflow(name="agent_logs_probe")
class Talker:
    def __init__(self, image: str) -> None:
        self.image = image

    @step(name="talk")
    async def talk(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(name="talker", image=self.image,
                                       env={"TOKEN": ctx.secrets["token"]},
                                       command=["sh", "-c", SCRIPT])
        return (await agent.wait_for_completion()).output


async def test_agent_output_streams_into_the_logs(tmp_path: Path,
                                                  runtime_image: tuple[str, str]) -> None:
    runtime, image = runtime_image
    async with WorkflowClient(store=f"sqlite:///{tmp_path}/flow.db", runtime=runtime) as client:
        execution = await client.run_workflow(workflow=Talker(image), mode=ExecutionMode.ASYNC,
                                              secrets={"token": SECRET})
        arrived: dict[str, float] = {}
        async for line in client.stream_logs(execution.id):
            arrived.setdefault(line.split(" ", 1)[1], time.monotonic())
        assert await execution.get_result() == {"done": True}
        logs = await client.get_logs(execution.id)
    output = [line.split(" ", 1)[1] for line in logs if " OUTPUT " in line]
    # (the process runtime keeps stdout and stderr apart: their order within a poll is not
    # known, so the last two lines may come either way round)
    assert output[0] == "OUTPUT  [talker] starting with [secret:token]"
    assert sorted(output[1:]) == ["OUTPUT  [talker] half way",
                                  'OUTPUT  [talker] {"done": true}']
    # live: the first line was shown while the agent still slept, well before its end
    first = arrived["OUTPUT  [talker] starting with [secret:token]"]
    end = next(t for text, t in arrived.items() if "workflow completed" in text)
    assert end - first > 1.0, arrived
    assert SECRET not in "\n".join(logs)
    assert SECRET.encode() not in _store_bytes(tmp_path)


def _store_bytes(folder: Path) -> bytes:
    """The SQLite database and its WAL, raw."""
    return b"".join(f.read_bytes() for f in folder.glob("flow.db*"))


class CommitsWhenCancelled(SQLiteEventStore):
    """A real SQLite store whose appends take 0.2 s and, like Postgres committing on its
    own thread, complete even when their caller was cancelled."""

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        async def slow() -> Any:
            await asyncio.sleep(0.2)
            return await SQLiteEventStore.append(self, *args, **kwargs)

        return await asyncio.shield(asyncio.ensure_future(slow()))


@workflow(name="chatty_under_slow_commits")
class Chatty:
    @step(name="talk")
    async def talk(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(
            name="chatty", image="local-shell:latest",
            command=["sh", "-c", "for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.15; done; "
                     "echo '{\"n\": 8}'"])
        return (await agent.wait_for_completion()).output


async def test_a_flush_cancelled_mid_commit_loses_nothing(tmp_path: Path) -> None:
    """The output recorder's flush is cancelled when the agent exits, often in the middle
    of a commit the store finishes anyway: the runner must still know what is durable (an
    earlier version appended at a stale seq and failed with AppendConflictError)."""
    store = CommitsWhenCancelled(f"sqlite:///{tmp_path}/flow.db")
    async with WorkflowClient(store=store, runtime="process") as client:
        for _ in range(4):
            execution = await client.run_workflow(workflow=Chatty())
            assert await asyncio.wait_for(execution.get_result(), 30) == {"n": 8}
            printed = [line.split("] ", 1)[1] for line in await client.get_logs(execution.id)
                       if " OUTPUT " in line]
            assert printed == [str(i) for i in range(1, 9)] + ['{"n": 8}']
