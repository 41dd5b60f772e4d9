"""The interface between the engine and whatever runs agents (containers, processes, mocks).

Every launch carries a deterministic ``agent_id`` derived from (execution, step, instance,
attempt, command index). Runtimes must make ``launch`` idempotent on that id and must be able
to find an agent by it after the engine died, so a resumed execution adopts what is there
instead of launching it again.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..values import env_byte_limit

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "MAX_OUTPUT_BYTES_ENV",
    "AgentEntry",
    "AgentOutcome",
    "AgentOutputProblem",
    "AgentRuntime",
    "AgentSpec",
    "AgentState",
    "AgentStatus",
    "max_output_bytes",
    "read_output",
    "store_key",
    "store_label",
]

#: Default limit of an agent's output (the ``$FLOW_OUTPUT`` file or the JSON line on stdout).
#: Agent outputs are step results, kept in the event log forever: large data belongs in a
#: volume or an object store, and the output carries a reference to it.
DEFAULT_MAX_OUTPUT_BYTES = 4 * 1024 * 1024
MAX_OUTPUT_BYTES_ENV = "FLOW_MAX_OUTPUT_BYTES"
#: how much more than the limit a runtime reads of stdout's end, so that the last lines fit
STDOUT_WINDOW_SLACK = 64 * 1024


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
    #: set when the agent's output cannot be taken (too large, or JSON cut short): what is
    #: wrong with it and its size; ``output`` is then empty
    output_error: str = ""


@dataclass(frozen=True, slots=True)
class AgentEntry:
    """An agent a runtime holds (running or exited and not yet removed), for the reaper."""

    agent_id: str
    execution_id: str
    store: str = ""  # ``store_label`` of the store whose execution made it ("" if unknown)
    running: bool = False


class AgentRuntime(ABC):
    """Launches, finds, waits for, stops and cleans up agents."""

    #: short name recorded in ``AgentStarted`` events ("process", "docker", "mock")
    name: str = "runtime"
    #: whether ``follow_logs`` gives what agents print (the engine records it if so)
    follows_logs: bool = False

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
        """The last ``tail`` lines of the agent's combined output (stdout and stderr)."""

    def follow_logs(self, agent_id: str, cursor: str = "") -> AsyncIterator[tuple[str, str]]:
        """What the agent prints, as it prints it: ``(text, cursor)`` pairs of whole lines
        (stdout and stderr), until the agent has exited and all it printed was given.

        ``cursor`` (opaque, from an earlier pair) starts after what was already given, so an
        engine adopting the agent after a crash does not record lines twice. A runtime that
        cannot follow logs gives nothing."""
        return _no_logs()

    async def list_agents(self) -> list[AgentEntry]:
        """Every agent this runtime holds that an engine made (for ``flow gc``)."""
        return []

    @abstractmethod
    async def remove(self, agent_id: str) -> None:
        """Forget a finished agent (its outcome is recorded in the log by now). Idempotent."""


def store_key(url: str) -> str:
    """A store's identity: its URL without password, options and driver variant, so that
    every spelling of one database names the same store."""
    import sqlalchemy as sa

    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return url
    backend = parsed.get_backend_name()
    if backend == "postgres":
        backend = "postgresql"
    port = parsed.port
    if backend == "postgresql" and port is None:
        port = 5432
    host = (parsed.host or "").lower() or None
    normal = sa.URL.create(backend, username=parsed.username, host=host, port=port,
                           database=parsed.database)
    return normal.render_as_string(hide_password=False)


def store_label(url: str) -> str:
    """A short digest of ``store_key(url)``: agents carry it, so that the reaper of one
    store never touches the agents of another on a shared Docker engine."""
    return hashlib.sha256(store_key(url).encode()).hexdigest()[:16]


async def _no_logs() -> AsyncIterator[tuple[str, str]]:
    return
    yield  # an async generator that gives nothing


def max_output_bytes() -> int:
    """The limit of an agent's output: ``$FLOW_MAX_OUTPUT_BYTES``, else 4 MiB."""
    return env_byte_limit(MAX_OUTPUT_BYTES_ENV, DEFAULT_MAX_OUTPUT_BYTES)


class AgentOutputProblem(ValueError):
    """An agent's output cannot be taken: too large, or JSON cut short. The text says which
    output (file or stdout), its size and the limit; the engine adds the agent and step."""


def _over(what: str, size: int, limit: int, *, at_least: bool = False) -> AgentOutputProblem:
    more = "more than " if at_least else ""
    return AgentOutputProblem(
        f"{what} is {more}{size} bytes, over the limit of {limit} bytes "
        f"({MAX_OUTPUT_BYTES_ENV}): write large data to a volume or an object store and "
        "return a reference to it")


def _looks_like_json_object(line: bytes) -> bool:
    """``{`` then a key or ``}``: a line meant as a JSON object, not a log line like
    ``{progress} 40%``."""
    rest = line[1:].lstrip()
    return line.startswith(b"{") and (not rest or rest[:1] in (b'"', b"}"))


def read_output(
    output_file: bytes | None,
    stdout_tail: bytes,
    *,
    first_line_cut: int = 0,
    output_file_size: int | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """The output protocol: the agent's output, or ``AgentOutputProblem`` saying why not.

    The ``$FLOW_OUTPUT`` file's JSON object if the file is there and not empty, else the
    last stdout line if it is a JSON object, else the last earlier line that is one, else
    ``{}``. A file or line over ``limit`` bytes, a file that is not a JSON object and a last
    line that starts like a JSON object but does not parse (cut short) are errors, never a
    silent ``{}``.

    ``stdout_tail`` is the end of stdout (at least ``limit`` bytes and some, if it is
    longer); ``first_line_cut`` says how many bytes of its first line lie before it (that
    line's size is then known without reading it). ``output_file_size``, when given, is the
    file's size where ``output_file`` was not read because it was too large.
    """
    limit = max_output_bytes() if limit is None else limit
    if output_file_size is not None and output_file_size > limit:
        raise _over("its output file ($FLOW_OUTPUT)", output_file_size, limit)
    if output_file is not None and output_file.strip():
        size = len(output_file)
        if size > limit:
            raise _over("its output file ($FLOW_OUTPUT)", size, limit)
        value = _parse(output_file, f"its output file ($FLOW_OUTPUT, {size} bytes)",
                       "is not valid JSON", 'Write one JSON object, e.g. {"key": "value"}')
        if not isinstance(value, dict):
            raise AgentOutputProblem(
                f"its output file ($FLOW_OUTPUT) holds a JSON {type(value).__name__}, not an "
                'object: write one JSON object, e.g. {"result": [1, 2]}')
        return value
    lines = stdout_tail.split(b"\n")
    last = len(lines) - 1
    while last >= 0 and not lines[last].strip():
        last -= 1
    if last < 0:
        return {}
    for i in range(last, -1, -1):
        line = lines[i].strip()
        size = len(lines[i]) + (first_line_cut if i == 0 else 0)
        if i == 0 and first_line_cut:  # only its end was read
            if i == last and line.endswith(b"}"):
                raise _over("the last line of its stdout", size, limit)
            return {}
        if not line.startswith(b"{"):
            continue
        if i == last:
            if size > limit and line.endswith(b"}"):
                raise _over("the last line of its stdout", size, limit)
            if _looks_like_json_object(line):
                value = _parse(line, f"the last line of its stdout ({size} bytes)",
                               "starts like a JSON object but does not parse",
                               "Print the output as one complete line, or write it to "
                               "$FLOW_OUTPUT")
                if isinstance(value, dict):
                    return value
                continue
        if not line.endswith(b"}") or size > limit:
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return {}


def _parse(data: bytes, what: str, broken: str, hint: str) -> Any:
    """``data`` parsed as JSON, or ``AgentOutputProblem`` saying why it cannot be."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise AgentOutputProblem(
            f"{what} {broken} ({_reason(exc)}): was it cut short? {hint}") from None
    except RecursionError:
        raise AgentOutputProblem(
            f"{what} is JSON nested too deeply to be read: keep it to a few hundred "
            "levels") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise AgentOutputProblem(f"{what} cannot be read as JSON: {_reason(exc)}") from None


def _reason(exc: ValueError) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
