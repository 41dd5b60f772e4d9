"""The interface between the engine and whatever runs agents (containers, processes, mocks).

Every launch carries a deterministic ``agent_id`` derived from (execution, step, instance,
attempt, command index). Runtimes must make ``launch`` idempotent on that id and must be able
to find an agent by it after the engine died, so a resumed execution adopts what is there
instead of launching it again.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "AgentOutcome",
    "AgentRuntime",
    "AgentSpec",
    "AgentState",
    "AgentStatus",
    "parse_output",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentSpec:
    """Everything a runtime needs to launch one agent."""

    agent_id: str  # deterministic; the container/process directory name
    name: str
    image: str
    command: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None  # seconds; the runtime may enforce it, the engine does too
    network: str | None = None


class AgentState(StrEnum):
    """What a runtime knows of an agent id."""

    MISSING = "missing"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """Result of ``lookup``."""

    state: AgentState
    outcome: AgentOutcome | None = None  # set when EXITED


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentOutcome:
    """How an agent ended: its exit code, the output it reported and its log tail."""

    exit_code: int
    output: dict[str, Any] = field(default_factory=dict)
    log_tail: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    timed_out: bool = False


class AgentRuntime(ABC):
    """Launches, finds, waits for, stops and cleans up agents."""

    #: short name recorded in ``AgentStarted`` events ("process", "docker", "mock")
    name: str = "runtime"

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the runtime (connect to an engine, create directories)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what ``open`` took. Running agents are left alone (they are durable)."""

    @abstractmethod
    async def launch(self, spec: AgentSpec) -> None:
        """Start the agent. If ``spec.agent_id`` already exists, adopt it and do nothing."""

    @abstractmethod
    async def lookup(self, agent_id: str) -> AgentStatus:
        """What the runtime knows of ``agent_id`` (running, exited with outcome, missing)."""

    @abstractmethod
    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        """Wait until the agent exits and return its outcome.

        On ``timeout`` (seconds) the agent is stopped and the outcome has ``timed_out``.
        Cancelling the waiting task does not stop the agent: call ``stop`` for that.
        """

    @abstractmethod
    async def stop(self, agent_id: str) -> None:
        """Kill the agent if it runs. Idempotent."""

    @abstractmethod
    async def logs(self, agent_id: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the agent's combined output."""

    @abstractmethod
    async def remove(self, agent_id: str) -> None:
        """Forget a finished agent (its outcome is recorded in the log by now). Idempotent."""


def parse_output(output_file_text: str | None, stdout: str) -> dict[str, Any]:
    """The output protocol: the ``$FLOW_OUTPUT`` file's JSON object if it has one, else the
    last stdout line that parses as a JSON object, else ``{}``."""
    if output_file_text is not None and output_file_text.strip():
        try:
            value = json.loads(output_file_text)
        except ValueError:
            value = None
        if isinstance(value, dict):
            return value
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}
