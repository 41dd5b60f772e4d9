"""The typed events of an execution's log, and their codec.

Events are tagged, frozen msgspec structs so a whole history decodes in one pass. Evolution
rules (msgspec's): new fields get defaults, field types never change, tags never change.
Values produced by user code (results, state, agent output) are already-encoded JSON trees
(see ``agentainer_flow.engine.values``); the store never interprets them.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "EVENT_TYPES",
    "AgentCompleted",
    "AgentDeployRequested",
    "AgentFailed",
    "AgentOutput",
    "AgentStarted",
    "CancelRequested",
    "ChildWorkflowCompleted",
    "ChildWorkflowStarted",
    "CommandEvent",
    "Event",
    "ExecutionCancelled",
    "ExecutionCompleted",
    "ExecutionFailed",
    "ExecutionStarted",
    "LogRecorded",
    "MetricRecorded",
    "PatchesDeclared",
    "SideEffectRecorded",
    "StateSet",
    "StepCompleted",
    "StepFailed",
    "StepRetryScheduled",
    "StepSkipped",
    "StepStarted",
    "TimerFired",
    "TimerStarted",
    "decode_event",
    "encode_event",
    "event_type_name",
]

#: Version of the payload encoding stored with every row, so the format can evolve.
ENCODING = 1


class Event(msgspec.Struct, tag=True, frozen=True, kw_only=True, omit_defaults=True):
    """Base of every event. ``ts`` is the wall-clock time (unix seconds) it was recorded."""

    ts: float = 0.0


class ExecutionStarted(Event, kw_only=True, frozen=True):
    """First event of every history: what was started, with which inputs."""

    workflow_name: str
    workflow_version: str = "1"
    args: Any = None  # encoded constructor (args, kwargs) of the workflow instance
    input: Any = None
    tags: dict[str, str] = {}
    secret_names: list[str] = []
    parent_id: str | None = None
    deadline: float | None = None  # absolute workflow timeout


class StepEvent(Event, kw_only=True, frozen=True):
    """An event about one attempt of one instance of a step."""

    step: str
    instance: int = 0
    attempt: int = 1


class StepStarted(StepEvent, kw_only=True, frozen=True):
    """An attempt of a step instance started; ``deadline`` is its absolute timeout.

    The first start of a step (the engine's decision to run it) carries the step's
    ``depends_on`` as the code declared it then, so that a replay can tell when the code's
    dependencies changed; later starts (other instances, retries) leave it ``None``, as do
    histories recorded before it existed.
    """

    total: int = 1
    deadline: float | None = None
    depends_on: list[str] | None = None


class StepCompleted(StepEvent, kw_only=True, frozen=True):
    """An attempt finished with ``result`` (an encoded value)."""

    result: Any = None


class StepFailed(StepEvent, kw_only=True, frozen=True):
    """An attempt failed. ``final`` marks the failure that ends the step (no retry left)."""

    error: str
    error_type: str = "Exception"
    final: bool = False
    retryable: bool = True


class StepRetryScheduled(StepEvent, kw_only=True, frozen=True):
    """The next attempt of a failed step instance will start at ``retry_at``."""

    retry_at: float


class StepSkipped(Event, kw_only=True, frozen=True):
    """The step will not run (``when`` was false, or an upstream step was skipped)."""

    step: str
    reason: str = ""
    #: the step's ``depends_on`` when it was skipped (see ``StepStarted.depends_on``)
    depends_on: list[str] | None = None


class CommandEvent(StepEvent, kw_only=True, frozen=True):
    """An event produced by the ``index``-th ``ctx`` command of a step attempt."""

    index: int


class AgentDeployRequested(CommandEvent, kw_only=True, frozen=True):
    """Intent to launch an agent under the deterministic ``agent_id``."""

    name: str
    image: str
    agent_id: str
    env: dict[str, str] = {}
    command: list[str] | None = None
    resources: dict[str, Any] = {}
    deadline: float | None = None


class AgentStarted(CommandEvent, kw_only=True, frozen=True):
    """The runtime reports the agent running (or adopted after a crash)."""

    agent_id: str
    runtime: str = ""
    adopted: bool = False


class AgentCompleted(CommandEvent, kw_only=True, frozen=True):
    """The agent exited with ``exit_code`` 0 and reported ``output``."""

    agent_id: str
    output: Any = None
    exit_code: int = 0
    started_at: float | None = None
    finished_at: float | None = None


class AgentFailed(CommandEvent, kw_only=True, frozen=True):
    """The agent exited non-zero, timed out or was lost, or its output cannot be stored
    (``error_type`` names the error that ``wait_for_completion`` raises then)."""

    agent_id: str
    error: str
    exit_code: int | None = None
    log_tail: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    error_type: str = ""


class AgentOutput(StepEvent, kw_only=True, frozen=True):
    """Lines a running agent printed (stdout and stderr, secrets redacted), for people.

    Not a command: replay ignores it. ``index`` is the agent's command index; ``cursor`` is
    where the runtime's log stood after these lines, so that an engine adopting the agent
    after a crash goes on from there instead of recording them twice."""

    index: int
    agent_id: str
    name: str
    text: str
    cursor: str = ""


class StateSet(CommandEvent, kw_only=True, frozen=True):
    """A write to ``ctx.state`` (``deleted`` marks ``del ctx.state[key]``)."""

    key: str
    value: Any = None
    deleted: bool = False


class TimerStarted(CommandEvent, kw_only=True, frozen=True):
    """A durable timer that fires at the absolute time ``fire_at``; ``duration`` is the
    wait the code asked for, in seconds (``None`` in histories recorded before it was)."""

    fire_at: float
    duration: float | None = None


class TimerFired(CommandEvent, kw_only=True, frozen=True):
    """The timer of command ``index`` fired."""


class SideEffectRecorded(CommandEvent, kw_only=True, frozen=True):
    """A non-deterministic value (now, random, uuid) recorded on first execution."""

    kind: str
    value: Any = None


class ChildWorkflowStarted(CommandEvent, kw_only=True, frozen=True):
    """A child execution was started under the deterministic ``child_id``, with ``input``
    (an encoded value; ``UNSET`` in histories recorded before it was)."""

    child_id: str
    workflow_name: str
    input: Any = msgspec.UNSET


class ChildWorkflowCompleted(CommandEvent, kw_only=True, frozen=True):
    """The child execution finished; ``error`` is set when it did not succeed."""

    child_id: str
    result: Any = None
    error: str | None = None
    status: str = "completed"


class LogRecorded(CommandEvent, kw_only=True, frozen=True):
    """A ``ctx.log`` message; ``fields`` are its keyword arguments (an encoded value)."""

    level: str = "info"
    message: str = ""
    fields: dict[str, Any] = {}


class MetricRecorded(CommandEvent, kw_only=True, frozen=True):
    """A ``ctx.metric`` sample."""

    name: str
    value: float
    tags: dict[str, str] = {}


class PatchesDeclared(Event, kw_only=True, frozen=True):
    """The patch ids (``ctx.patched``/``ctx.deprecate_patch``) the code knew when it first
    ran the execution, recorded once, before anything else it did. ``ctx.patched(id)`` is
    true in this execution exactly when ``id`` is here; an execution without this event was
    started by code that knew no patch."""

    patches: list[str] = []


class CancelRequested(Event, kw_only=True, frozen=True):
    """Someone asked for the execution to stop."""

    reason: str = ""


class ExecutionCompleted(Event, kw_only=True, frozen=True):
    """The execution succeeded with ``result`` (an encoded value)."""

    result: Any = None


class ExecutionFailed(Event, kw_only=True, frozen=True):
    """The execution failed."""

    error: str
    error_type: str = "Exception"
    step: str | None = None


class ExecutionCancelled(Event, kw_only=True, frozen=True):
    """The execution was cancelled; its ``always_run`` steps have run."""

    reason: str = ""


AnyEvent = (
    ExecutionStarted
    | StepStarted
    | StepCompleted
    | StepFailed
    | StepRetryScheduled
    | StepSkipped
    | AgentDeployRequested
    | AgentStarted
    | AgentCompleted
    | AgentFailed
    | AgentOutput
    | StateSet
    | TimerStarted
    | TimerFired
    | SideEffectRecorded
    | ChildWorkflowStarted
    | ChildWorkflowCompleted
    | LogRecorded
    | MetricRecorded
    | PatchesDeclared
    | CancelRequested
    | ExecutionCompleted
    | ExecutionFailed
    | ExecutionCancelled
)

EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls for cls in AnyEvent.__args__
}

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    """Encode one event to JSON bytes (the tag names its type)."""
    return _encoder.encode(event)


def decode_event(data: bytes | str) -> Event:
    """Decode bytes produced by :func:`encode_event`."""
    event: Event = _decoder.decode(data)
    return event


def event_type_name(event: Event | type[Event]) -> str:
    """The stable type name of an event (its class name, also its tag)."""
    cls = event if isinstance(event, type) else type(event)
    return cls.__name__
