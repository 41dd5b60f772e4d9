"""Run a coroutine's first step at once, in the caller's task; finish it in a task of its
own only if it has to wait.

A commit to a store often completes without waiting (the memory store; a Postgres write
run on the loop's thread while the loop is idle). Handed to a task, it would still cost
three turns of the event loop (the task's step, then the two callbacks of the shield that
keeps the caller's cancellation away from it) where it needs none: for a chain of steps,
half of the engine's turns. ``eager`` runs it right away; only what must wait goes to a
task, from where it stopped. Python 3.12's eager task factory does the same for a whole
loop; this does it for the calls that ask for it, on 3.11 too.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["eager"]

T = TypeVar("T")


def eager(coro: Coroutine[Any, Any, T],
          context: contextvars.Context | None = None) -> asyncio.Future[T]:
    """Start ``coro`` now. If it ends without waiting, a future already done with its
    result (or exception); else a task that goes on with it from where it stopped.

    With ``context`` the coroutine runs in it throughout, as in a task created with it
    (what it sets in context variables stays its own); without, its first step runs in
    the caller's context and the rest in a copy."""
    loop = asyncio.get_running_loop()
    try:
        yielded = coro.send(None) if context is None else context.run(coro.send, None)
    except StopIteration as stop:
        done: asyncio.Future[T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except asyncio.CancelledError:
        done = loop.create_future()
        done.cancel()
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        done = loop.create_future()
        done.set_exception(exc)
        return done
    return loop.create_task(_Resumed(coro, yielded), context=context)


class _Resumed(Coroutine[Any, Any, T]):
    """``coro``, which yielded ``yielded`` (what it waits for) outside any task, as a
    coroutine a task can run: the task's first step hands ``yielded`` to it, then each
    value or exception the task sends or throws goes to ``coro``. A cancel that comes
    before the task's first step reaches ``coro`` where it waits, as it would in a task
    that had run it from the start."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, T], yielded: Any) -> None:
        self._coro = coro
        self._yielded: Any = yielded

    def send(self, value: Any) -> Any:
        if self._yielded is not _SENT:
            yielded, self._yielded = self._yielded, _SENT
            return yielded
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self._yielded = _SENT
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(typ, val, tb)  # the 3-argument form, for older callers

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("a resumed coroutine runs in its task only")


_SENT = object()
