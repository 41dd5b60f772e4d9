"""Testing helpers: ``WorkflowTestCase`` (in-memory store, mock agents, virtual time),
``mock_agent`` rules with glob patterns, ``check_determinism`` (crash a workflow at every
point of its history and check each resume) and ``check_replay`` (the pre-deploy gate: would
new workflow code break the executions a store holds?).

    class TestMine(WorkflowTestCase):
        async def test_it(self):
            with mock_agent("fetcher") as fetcher:
                fetcher.returns({"data_path": "/x"})
            result = await self.run_workflow(MyWorkflow(config))
            assert self.workflow_state["raw_data"] == "/x"

Mocks stay registered after their ``with`` block, until the test ends.

``agentainer_flow.testing.strategies`` holds hypothesis strategies (crash points, agent
results and failures, generated workflows) for property tests; it is the only part that
needs hypothesis (``pip install 'agentainer-flow[testing]'``).
"""

from __future__ import annotations

import unittest
from collections.abc import Iterable, Mapping
from typing import Any

from agentainer_flow._client import ExecutionMode, WorkflowClient, WorkflowExecution
from agentainer_flow._determinism import (
    CrashPoints,
    DeterminismReport,
    NondeterministicCall,
    check_determinism,
)
from agentainer_flow._events import ExecutionEvent
from agentainer_flow._replay_check import ReplayCheckReport, check_replay
from agentainer_flow.engine.clock import VirtualClock
from agentainer_flow.engine.runtimes.mock import (
    MockAgent,
    MockCall,
    MockRegistry,
    MockRuntime,
    default_registry,
)
from agentainer_flow.store import MemoryEventStore

__all__ = [
    "CrashPoints",
    "DeterminismReport",
    "MockAgent",
    "MockCall",
    "MockRegistry",
    "MockRuntime",
    "NondeterministicCall",
    "ReplayCheckReport",
    "VirtualClock",
    "WorkflowTestCase",
    "check_determinism",
    "check_replay",
    "mock_agent",
    "reset_mocks",
    "test_client",
]


def mock_agent(pattern: str, *, registry: MockRegistry | None = None) -> MockAgent:
    """Register a rule answering deployments of agents whose name matches ``pattern``
    (a glob such as ``"processor-*"``). Configure it with ``.returns(...)`` or
    ``.fails(...)``; inspect ``.calls`` afterwards."""
    return MockAgent(pattern, registry)


def reset_mocks() -> None:
    """Forget every registered ``mock_agent`` rule."""
    default_registry.reset()


def placeholder_secret(name: str) -> str:
    """The value a test gets for a secret it did not pass."""
    return f"test-secret-{name}"


def test_client(*, strict_secrets: bool = False, clock: VirtualClock | None = None
                ) -> WorkflowClient:
    """A client on an in-memory store, the mock runtime and virtual time."""
    return WorkflowClient(
        store=MemoryEventStore(), runtime=MockRuntime(), clock=clock or VirtualClock(),
        secret_fallback=None if strict_secrets else placeholder_secret)


test_client.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


class WorkflowTestCase(unittest.IsolatedAsyncioTestCase):
    """Base class for workflow tests: each test gets a fresh in-memory store, the mock
    runtime (answering from ``mock_agent`` rules) and a virtual clock, so retries, backoff
    and ``ctx.sleep`` take no real time.

    Secrets a run does not pass resolve to ``"test-secret-<name>"`` unless
    ``strict_secrets = True``.
    """

    strict_secrets = False

    async def asyncSetUp(self) -> None:
        await super().asyncSetUp()
        self.clock = VirtualClock()
        self.client = test_client(strict_secrets=self.strict_secrets, clock=self.clock)
        await self.client.open()
        self.execution: WorkflowExecution | None = None
        self.workflow_state: dict[str, Any] = {}
        self.events: list[ExecutionEvent] = []

    async def asyncTearDown(self) -> None:
        await self.client.close()
        reset_mocks()
        await super().asyncTearDown()

    async def run_workflow(
        self,
        workflow: object,
        *,
        input: Any = None,
        secrets: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> Any:
        """Run ``workflow`` to its end and return its result (raising
        ``WorkflowFailedError`` if it failed). Afterwards ``self.workflow_state`` holds its
        final state, ``self.events`` its history and ``self.execution`` its handle."""
        execution = await self.client.run_workflow(
            workflow, ExecutionMode.SYNC, input=input, secrets=secrets, tags=tags)
        self.execution = execution
        self.workflow_state = await execution.state()
        self.events = await execution.history()
        return await execution.get_result()

    async def assert_deterministic(
        self,
        make_workflow: Any,
        *,
        input: Any = None,
        secrets: Mapping[str, str] | None = None,
        crash_points: Iterable[int] | CrashPoints | None = None,
        registry: MockRegistry | None = None,
    ) -> DeterminismReport:
        """Crash the workflow at every event of its history and check each resume ends the
        same way, records the same history and launches no agent twice; run every step a
        second time with other random seeds and clocks, and name the step (and the likely
        cause: ``random.random()``, ``time.time()``, ``uuid.uuid4()``, the wall clock) that
        records something else (see ``check_determinism``). ``make_workflow`` builds a fresh
        instance."""
        return await check_determinism(make_workflow, input=input, secrets=secrets,
                                       crash_points=crash_points, registry=registry)

    def event_types(self) -> list[str]:
        """Types of the last run's events, in order."""
        return [e.type for e in self.events]
