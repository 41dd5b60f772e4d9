"""``eager``: a coroutine's first step runs at once; a task finishes it only if it waits."""

from __future__ import annotations

import asyncio

import pytest

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
