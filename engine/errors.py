"""Errors the engine raises. All derive from ``FlowError`` (see ``agentainer_flow.errors``).

    FlowError
    ├── WorkflowDefinitionError     a @workflow class is invalid (cycle, unknown step...)
    ├── NonDeterminismError         code no longer matches the recorded history
    ├── SerializationError          a value cannot be stored in the event log
    │   └── SecretLeakError         ... because it holds a secret's value
    ├── SecretNotFoundError         a secret the execution needs is not available
    ├── StepError                   raised inside steps by engine operations
    │   ├── AgentFailedError        an agent exited non-zero, timed out or was lost
    │   │   └── AgentTimeoutError
    │   ├── StepTimeoutError        a step attempt ran past its timeout
    │   └── ChildWorkflowError      a child execution did not succeed
    ├── WorkflowFailedError         ``get_result`` of a failed execution
    │   ├── WorkflowTimeoutError    the execution ran past the workflow timeout
    │   └── WorkflowCancelledError  the execution was cancelled
    ├── WorkflowNotRegisteredError  resuming an execution whose class is not importable
    │   └── WorkflowVersionNotRegisteredError  ... or whose recorded version is not loaded
    ├── StepNotFoundError           a step name the workflow does not have
    ├── ExecutionBlockedError       the execution waits for a secret only a person can give
    ├── IdempotencyConflictError    an idempotency key reused for another workflow or input
    └── ConfigurationError          bad client/runtime options
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from agentainer_flow.store.errors import FlowError

__all__ = [
    "AgentFailedError",
    "AgentTimeoutError",
    "ChildWorkflowError",
    "ConfigurationError",
    "EngineSignal",
    "ExecutionBlockedError",
    "FlowError",
    "IdempotencyConflictError",
    "NonDeterminismError",
    "RuntimeUnavailableError",
    "SecretLeakError",
    "SecretNotFoundError",
    "SerializationError",
    "StepError",
    "StepNotFoundError",
    "StepTimeoutError",
    "WorkflowCancelledError",
    "WorkflowDefinitionError",
    "WorkflowFailedError",
    "WorkflowNotRegisteredError",
    "WorkflowTimeoutError",
    "WorkflowVersionNotRegisteredError",
]


class WorkflowDefinitionError(FlowError):
    """A workflow class is invalid; lists every problem found, each naming its step."""

    code = "workflow_definition"

    def __init__(self, workflow: str, problems: list[str]) -> None:
        self.workflow = workflow
        self.problems = problems
        if len(problems) == 1:
            msg = f"invalid workflow {workflow!r}: {problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in problems)
            msg = f"invalid workflow {workflow!r} for {len(problems)} reasons:\n{lines}"
        super().__init__(msg)


class NonDeterminismError(FlowError):
    """The workflow code did something different from what its history recorded.

    ``step``, ``instance`` and ``attempt`` say where; ``index`` is the command index
    inside that attempt (``None`` for a difference in the shape of the DAG: a step's
    dependencies, instance count or ``when=`` decision); ``seq`` is the seq of the
    history event where the code diverged (``None`` when no event is tied to it);
    ``recorded`` is what the history has, ``actual`` what the code does now, ``hint``
    how to fix it. Secrets appear in them only as ``[secret:NAME]`` references.
    """

    code = "non_determinism"

    #: what to do about a difference, unless the place that found it knows better
    DEFAULT_HINT = (
        "restore the previous code to finish this execution, or version the change: put "
        "the new code under `if ctx.patched(\"some-id\"):` and keep the old code in the "
        "else branch, so that executions started before the change keep the old one"
    )

    def __init__(
        self,
        *,
        execution_id: str,
        step: str,
        instance: int,
        attempt: int,
        index: int | None,
        recorded: str,
        actual: str,
        seq: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.execution_id = execution_id
        self.step = step
        self.instance = instance
        self.attempt = attempt
        self.index = index
        self.recorded = recorded
        self.actual = actual
        self.seq = seq
        self.hint = hint if hint is not None else self.DEFAULT_HINT
        where = f"execution {execution_id}, step {step!r} (instance {instance}, attempt {attempt})"
        if index is not None:
            where += f", command {index}"
        if seq is not None:
            where += f" at event seq {seq}"
        super().__init__(
            f"{where}: the history recorded {recorded} but the code now does {actual}. "
            f"Hint: {self.hint}"
        )


class SerializationError(FlowError):
    """A value (step result, state value, input) cannot be encoded for the event log."""

    code = "serialization"


class SecretLeakError(SerializationError):
    """User data to be stored holds a secret's value. Names the secret and where it is
    (``where``, and ``path`` inside the value), never the value."""

    code = "secret_leak"

    def __init__(self, secret: str, where: str, path: str = "$") -> None:
        self.secret = secret
        self.where = where
        self.path = path
        super().__init__(
            f"secret {secret!r} found in {where} at {path}: results, state, agent outputs, "
            "inputs, tags, log fields and metric tags are stored as they are, so they must not "
            "hold a secret's value (agents get secrets through env=)"
        )


class SecretNotFoundError(FlowError, KeyError):
    """A secret is not available to this execution. Never carries the value of any secret."""

    code = "secret_not_found"

    def __init__(self, name: str, hint: str = "") -> None:
        self.name = name
        super().__init__(
            f"secret {name!r} is not available: pass it when running or resuming (secrets= "
            f"in Python, --secret {name}=... on the CLI), or set the environment variable "
            f"FLOW_SECRET_{name.upper()}"
            + (f" ({hint})" if hint else "")
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class StepError(FlowError):
    """Base of the errors engine operations raise inside a step."""

    code = "step_error"


class AgentFailedError(StepError):
    """An agent exited with a non-zero code, or was lost. ``log_tail`` has its last output."""

    code = "agent_failed"

    def __init__(
        self,
        message: str,
        *,
        agent: str = "",
        exit_code: int | None = None,
        log_tail: str = "",
    ) -> None:
        self.agent = agent
        self.exit_code = exit_code
        self.log_tail = log_tail
        full = message if not log_tail else f"{message}\n--- last output ---\n{log_tail}"
        super().__init__(full)


class AgentOutputError(AgentFailedError):
    """An agent exited 0 but its output cannot be taken: larger than
    ``$FLOW_MAX_OUTPUT_BYTES`` (4 MiB by default), or JSON cut short. The message names the
    agent, the step and the size."""

    code = "agent_output"


class AgentTimeoutError(AgentFailedError):
    """An agent ran past its ``timeout`` and was stopped."""

    code = "agent_timeout"


class StepTimeoutError(StepError):
    """A step attempt ran past the step's ``timeout``."""

    code = "step_timeout"


class ChildWorkflowError(StepError):
    """A child execution started with ``ctx.run_workflow`` failed or was cancelled."""

    code = "child_workflow_failed"

    def __init__(self, message: str, *, child_id: str, status: str) -> None:
        self.child_id = child_id
        self.status = status
        super().__init__(message)


class WorkflowFailedError(FlowError):
    """The execution failed; raised by ``get_result``. ``error_type`` names the cause."""

    code = "workflow_failed"

    def __init__(
        self,
        message: str,
        *,
        execution_id: str = "",
        step: str | None = None,
        error_type: str = "Exception",
    ) -> None:
        self.execution_id = execution_id
        self.step = step
        self.error_type = error_type
        super().__init__(message)


class WorkflowTimeoutError(WorkflowFailedError):
    """The execution ran past the workflow's ``timeout``."""

    code = "workflow_timeout"


class WorkflowCancelledError(WorkflowFailedError):
    """The execution was cancelled."""

    code = "workflow_cancelled"


class WorkflowNotRegisteredError(FlowError):
    """An execution names a workflow this process does not know."""

    code = "workflow_not_registered"


class ExecutionSuspended(FlowError):
    """The run let go of the execution: every step instance waits for a timer (or a retry
    backoff) due at ``wake_at``, or the engine drains (a worker shutting down) and the
    running attempts are done. Its history is durable, its lease released; a worker claims
    it again (when it is due). Not a failure: raised to the runner's caller only."""

    code = "execution_suspended"

    def __init__(self, execution_id: str, wake_at: float | None) -> None:
        self.execution_id = execution_id
        self.wake_at = wake_at  # None: handed back by a draining engine, claimable now
        why = "handed back" if wake_at is None else f"sleeps until {wake_at:.3f}; suspended"
        super().__init__(f"execution {execution_id} {why}")


class ExecutionBlockedError(FlowError):
    """The execution is suspended (status ``blocked``) until it is resumed with a secret.

    Finished work is kept: ``resume(id, secrets={name: ...})`` (``flow resume ID --secret
    NAME=...``) carries on from where it stopped.
    """

    code = "execution_blocked"

    def __init__(self, execution_id: str, secret: str) -> None:
        self.execution_id = execution_id
        self.secret = secret
        super().__init__(
            f"execution {execution_id} is blocked: it needs the secret {secret!r}, which was "
            f"not given; resume it with the secret (resume(..., secrets={{{secret!r}: ...}}) "
            f"in Python, flow resume {execution_id} --secret {secret}=... on the CLI, or set "
            f"FLOW_SECRET_{secret.upper()})"
        )


class IdempotencyConflictError(FlowError):
    """An idempotency key was reused with another workflow or other arguments or input."""

    code = "idempotency_conflict"

    def __init__(self, key: str, execution_id: str, what: str) -> None:
        self.key = key
        self.execution_id = execution_id
        super().__init__(
            f"idempotency key {key!r} already belongs to execution {execution_id}, which was "
            f"started with {what}; use another key for a different run"
        )


class ConfigurationError(FlowError):
    """Bad options given to a client or runtime."""

    code = "configuration"


class AgentConfigurationError(AgentFailedError, ConfigurationError):
    """An agent cannot be launched as asked: its image is not on the engine, its resources
    are more than the engine has, no command is known for its image. Never retried: the
    same request fails the same way until the configuration changes."""

    code = "agent_configuration"


class RuntimeUnavailableError(FlowError):
    """The agent runtime cannot be reached (the Docker engine is down or restarting) and
    did not come back within its retry time. Not a failure of the step: the run stops where
    it is, with nothing recorded, and the execution resumes (its agents adopted) once the
    runtime is back, by ``flow resume``, ``recover()`` or a worker."""

    code = "runtime_unavailable"


class EngineSignal(BaseException):
    """Engine control flow raised through user code; ``except Exception`` cannot catch it."""


def describe_error(exc: BaseException) -> dict[str, Any]:
    """Type name and message of an exception, as recorded in events."""
    return {"error_type": type(exc).__name__, "error": str(exc) or type(exc).__name__}


class WorkflowVersionNotRegisteredError(WorkflowNotRegisteredError):
    """An execution was started under a version of its workflow that no code loaded in this
    process declares. Nothing was changed: the execution waits for a process that has it.

    ``available`` lists the versions of the workflow this process has (oldest first).
    """

    code = "workflow_version_not_registered"

    def __init__(self, *, workflow: str, version: str, available: Sequence[str],
                 execution_id: str | None = None) -> None:
        self.execution_id = execution_id
        self.workflow = workflow
        self.version = version
        self.available = tuple(available)
        which = f"execution {execution_id}" if execution_id else "the execution"
        has = ", ".join(repr(v) for v in self.available) or "none"
        super().__init__(
            f"{which} was started on version {version!r} of workflow {workflow!r}, but this "
            f"process only has version(s) {has} of it; it was left as it is. Keep the class "
            f"declaring @workflow(name={workflow!r}, version={version!r}) importable next to "
            "the new one (e.g. in a module of its own) until the executions started on it "
            "have finished, and import it where they are resumed"
        )


class StepNotFoundError(FlowError, ValueError):
    """A step name that the workflow does not have (e.g. ``fork(from_step=...)``)."""

    code = "step_not_found"

    def __init__(self, workflow: str, step: str, steps: Sequence[str]) -> None:
        self.workflow = workflow
        self.step = step
        self.steps = tuple(steps)
        close = difflib.get_close_matches(step, list(self.steps), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        super().__init__(
            f"workflow {workflow!r} has no step {step!r} (steps: {', '.join(self.steps)})"
            + hint)
