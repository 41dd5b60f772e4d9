"""``eager``: a coroutine's first step runs at once; a task finishes it only if it waits."""

from __future__ import annotations

import asyncio
import contextvars
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import WorkflowClient, step, workflow
from agentainer_flow.engine.eager import eager


async def test_a_coroutine_that_does_not_wait_needs_no_task() -> None:
    ran: list[str] = []

    async def quick() -> int:
        ran.append("body")
        return 7

    before = len(asyncio.all_tasks())
    fut = eager(quick())
    assert ran == ["body"]  # ran before eager returned
    assert fut.done() and fut.result() == 7
    assert not isinstance(fut, asyncio.Task)
    assert len(asyncio.all_tasks()) == before


async def test_an_error_raised_before_any_wait_is_the_futures() -> None:
    async def broken() -> None:
        raise ValueError("no")

    fut = eager(broken())
    assert fut.done()
    with pytest.raises(ValueError, match="no"):
        fut.result()


async def test_a_cancel_raised_before_any_wait_cancels_the_future() -> None:
    async def stops() -> None:
        raise asyncio.CancelledError

    assert eager(stops()).cancelled()


async def test_a_coroutine_that_waits_goes_on_in_a_task_from_where_it_stopped() -> None:
    gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def slow() -> str:
        steps.append("before")
        got = await gate
        steps.append(f"after {got}")
        await asyncio.sleep(0)  # a bare yield, too
        steps.append("end")
        return got * 2

    fut = eager(slow())
    assert steps == ["before"] and not fut.done()
    assert isinstance(fut, asyncio.Task)
    gate.set_result("x")
    assert await fut == "xx"
    assert steps == ["before", "after x", "end"]


async def test_an_error_after_a_wait_reaches_the_task() -> None:
    async def later() -> None:
        await asyncio.sleep(0.001)
        raise KeyError("gone")

    fut = eager(later())
    with pytest.raises(KeyError, match="gone"):
        await fut


async def test_cancelling_the_task_reaches_the_coroutine_where_it_waits() -> None:
    seen: list[str] = []
    started = asyncio.Event()

    async def guarded() -> str:
        try:
            started.set()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            await asyncio.sleep(0)  # it may still wait while it cleans up
            return "cleaned up"
        return "slept"

    fut = eager(guarded())
    assert started.is_set()
    fut.cancel()
    assert await fut == "cleaned up"  # it swallowed the cancel: its result stands
    assert seen == ["cancelled"]

    async def plain() -> None:
        await asyncio.sleep(10)

    fut2 = eager(plain())
    await asyncio.sleep(0)
    fut2.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fut2


async def test_a_caller_cancelled_while_shielding_the_task_leaves_it_running() -> None:
    """What ``Runner.flush`` relies on: the commit goes on when its caller is cancelled."""
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def commit() -> str:
        await gate
        return "committed"

    fut = eager(commit())

    async def caller() -> None:
        await asyncio.shield(fut)

    waiting = asyncio.ensure_future(caller())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not fut.done()
    gate.set_result(None)
    assert await fut == "committed"


async def test_a_context_given_holds_what_the_coroutine_sets_before_and_after_a_wait() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="caller")

    async def sets() -> str:
        var.set("first step")
        await asyncio.sleep(0)
        seen = var.get()
        var.set("later")
        return seen

    context = contextvars.copy_context()
    fut = eager(sets(), context)
    assert var.get() == "caller"  # the first step's set stayed in its own context
    assert await fut == "first step"
    assert var.get() == "caller" and context[var] == "later"


# -- the runner starts each attempt eagerly ------------------------------------------------

STEP_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("step_var", default="unset")
SEEN: list[str] = []


@workflow(name="eager_chain")
class EagerChain:
    """Ten steps that only compute, then one that waits, with context variables set."""

    @step()
    async def s0(self, ctx: Any) -> int:
        SEEN.append(STEP_VAR.get())
        STEP_VAR.set("s0")  # an attempt's context is its own, as a task's would be
        return 0

    @step(depends_on=["s0"])
    async def s1(self, ctx: Any, s0_result: int) -> int:
        SEEN.append(STEP_VAR.get())
        return s0_result + 1

    @step(depends_on=["s1"], timeout=30)
    async def waits(self, ctx: Any, s1_result: int) -> int:
        STEP_VAR.set("waits")
        await asyncio.sleep(0.01)
        SEEN.append(STEP_VAR.get())
        return s1_result + 1


async def test_steps_that_do_not_wait_run_without_a_task_of_their_own(tmp_path: Path) -> None:
    SEEN.clear()
    created: list[str] = []
    loop = asyncio.get_running_loop()

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        inner = getattr(coro, "_coro", coro)  # what eager() resumes in a task
        created.append(getattr(inner, "__qualname__", type(inner).__name__))
        return asyncio.Task(coro, loop=loop, **kwargs)

    async with WorkflowClient(store=f"sqlite:///{tmp_path / 'flow.db'}",
                              runtime="mock") as client:
        loop.set_task_factory(factory)
        try:
            execution = await client.run_workflow(EagerChain())
        finally:
            loop.set_task_factory(None)
        assert await execution.get_result() == 2
    assert SEEN == ["unset", "unset", "waits"]
    assert STEP_VAR.get() == "unset"
    # the run's own task, and one for the attempt of the step that waits (its timeout
    # gives its body a task and a timer too); none for s0 and s1
    attempts = [name for name in created if name == "Runner._observed_attempt"]
    assert len(attempts) == 1, created
    assert "EagerChain.waits" in created
