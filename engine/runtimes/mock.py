"""The ``mock`` runtime: agents answered by registered ``MockAgent`` rules, for tests.

Rules match agent names with glob patterns (``"processor-*"``); an exact name beats a
pattern, and among patterns the latest registered wins. Every launch is recorded on the rule
that answered it, so tests can assert what was deployed with which env.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

from .base import AgentOutcome, AgentRuntime, AgentSpec, AgentState, AgentStatus

__all__ = ["MockAgent", "MockCall", "MockRegistry", "MockRuntime", "default_registry"]


@dataclass(frozen=True)
class MockCall:
    """One deployment a mock answered."""

    name: str
    image: str
    env: dict[str, str]
    command: list[str] | None
    agent_id: str
    resources: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Answer:
    output: dict[str, Any] | Callable[[MockCall], dict[str, Any]] | None = None
    exit_code: int = 0
    error: str = ""
    delay: float = 0.0


class MockAgent:
    """A rule answering deployments whose name matches ``pattern``.

    ``with mock_agent("fetcher") as m: m.returns({...})`` registers the rule; it stays
    registered after the ``with`` block (until the registry is reset), so rules can be set
    up in blocks before the run, as the seed's tests do.
    """

    def __init__(self, pattern: str, registry: MockRegistry | None = None) -> None:
        self.pattern = pattern
        self.calls: list[MockCall] = []
        self._queue: list[_Answer] = []
        self._default = _Answer(output={})
        (registry or default_registry).add(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def returns(
        self,
        output: dict[str, Any] | Callable[[MockCall], dict[str, Any]] | None = None,
        *,
        times: int | None = None,
        delay: float = 0.0,
    ) -> Self:
        """Answer with ``output`` (a dict, or a function of the call returning one).

        With ``times=N`` only the next N calls get it; otherwise it becomes the default.
        """
        self._set(_Answer(output=output if output is not None else {}, delay=delay), times)
        return self

    def fails(
        self,
        error: str = "mock agent failed",
        *,
        exit_code: int = 1,
        times: int | None = None,
        delay: float = 0.0,
    ) -> Self:
        """Fail with ``exit_code`` and ``error`` as the log tail (N times, or always)."""
        if exit_code == 0:
            raise ValueError("fails(): exit_code must be non-zero")
        self._set(_Answer(exit_code=exit_code, error=error, delay=delay), times)
        return self

    def _set(self, answer: _Answer, times: int | None) -> None:
        if times is None:
            self._default = answer
        else:
            self._queue.extend([answer] * times)

    def _next(self) -> _Answer:
        return self._queue.pop(0) if self._queue else self._default

    @property
    def call_count(self) -> int:
        return len(self.calls)

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def last_call(self) -> MockCall | None:
        return self.calls[-1] if self.calls else None

    def assert_called(self, times: int | None = None) -> None:
        """Raise ``AssertionError`` unless called (exactly ``times`` times, if given)."""
        if times is None and not self.calls:
            raise AssertionError(f"mock agent {self.pattern!r} was never deployed")
        if times is not None and len(self.calls) != times:
            raise AssertionError(
                f"mock agent {self.pattern!r} was deployed {len(self.calls)} times, "
                f"expected {times}"
            )

    def __repr__(self) -> str:
        return f"MockAgent({self.pattern!r}, calls={len(self.calls)})"


class MockRegistry:
    """The rules a ``MockRuntime`` consults."""

    def __init__(self) -> None:
        self.agents: list[MockAgent] = []

    def add(self, agent: MockAgent) -> None:
        self.agents.append(agent)

    def reset(self) -> None:
        self.agents.clear()

    def match(self, name: str) -> MockAgent | None:
        for agent in reversed(self.agents):
            if agent.pattern == name:
                return agent
        for agent in reversed(self.agents):
            if fnmatch.fnmatchcase(name, agent.pattern):
                return agent
        return None


default_registry = MockRegistry()


class MockRuntime(AgentRuntime):
    """Answers deployments from a ``MockRegistry``; keeps outcomes in memory by agent id."""

    name = "mock"

    def __init__(self, registry: MockRegistry | None = None) -> None:
        self.registry = registry or default_registry
        self._outcomes: dict[str, asyncio.Future[AgentOutcome]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.launches: list[AgentSpec] = []

    async def launch(self, spec: AgentSpec) -> None:
        if spec.agent_id in self._outcomes:
            return
        fut: asyncio.Future[AgentOutcome] = asyncio.get_running_loop().create_future()
        self._outcomes[spec.agent_id] = fut
        self.launches.append(spec)
        rule = self.registry.match(spec.name)
        started = time.time()
        if rule is None:
            fut.set_result(
                AgentOutcome(
                    exit_code=127,
                    log_tail=f"no mock_agent matches agent {spec.name!r}: register one with "
                    f"mock_agent({spec.name!r}).returns({{...}})",
                    started_at=started,
                    finished_at=started,
                )
            )
            return
        call = MockCall(spec.name, spec.image, dict(spec.env), spec.command, spec.agent_id,
                        dict(spec.resources))
        rule.calls.append(call)
        answer = rule._next()

        async def finish() -> None:
            if answer.delay:
                await asyncio.sleep(answer.delay)
            output = answer.output(call) if callable(answer.output) else answer.output
            fut.set_result(
                AgentOutcome(
                    exit_code=answer.exit_code,
                    output=dict(output or {}) if answer.exit_code == 0 else {},
                    log_tail=answer.error,
                    started_at=started,
                    finished_at=time.time(),
                )
            )

        if answer.delay:
            self._tasks[spec.agent_id] = asyncio.ensure_future(finish())
        else:
            await finish()

    async def lookup(self, agent_id: str) -> AgentStatus:
        fut = self._outcomes.get(agent_id)
        if fut is None:
            return AgentStatus(AgentState.MISSING)
        if not fut.done():
            return AgentStatus(AgentState.RUNNING)
        return AgentStatus(AgentState.EXITED, fut.result())

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        fut = self._outcomes[agent_id]
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            await self.stop(agent_id)
            return AgentOutcome(exit_code=137, log_tail="timed out", timed_out=True)

    async def stop(self, agent_id: str) -> None:
        task = self._tasks.pop(agent_id, None)
        if task is not None:
            task.cancel()
        fut = self._outcomes.get(agent_id)
        if fut is not None and not fut.done():
            fut.set_result(AgentOutcome(exit_code=137, log_tail="stopped"))

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        fut = self._outcomes.get(agent_id)
        if fut is None or not fut.done():
            return ""
        return "\n".join(fut.result().log_tail.splitlines()[-tail:])

    async def remove(self, agent_id: str) -> None:
        # Outcomes stay: a test may resume and must still find what ran.
        self._tasks.pop(agent_id, None)
