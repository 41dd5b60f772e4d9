"""``Context``: what a step may call. The engine implements it; this is the public face."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import MutableMapping, Sequence
from typing import Any

from agentainer_flow.engine import values
from agentainer_flow.engine.commands import AgentHandle, ChildWorkflowHandle, StepRuntime
from agentainer_flow.engine.durations import Duration
from agentainer_flow.engine.secrets import SecretStore
from agentainer_flow.engine.types import ParallelContext, ResourceRequirements

__all__ = ["Context"]


class Context:
    """The step's window on its execution: ids, durable state, secrets, input, agents,
    child workflows, durable time and randomness, logs and metrics.

    Every operation is recorded in the execution's event log, so on resume it returns what
    it returned the first time instead of doing it again.
    """

    __slots__ = ("_rt",)

    def __init__(self, runtime: StepRuntime) -> None:
        self._rt = runtime

    # metadata ---------------------------------------------------------------------------
    @property
    def execution_id(self) -> str:
        """Id of this execution."""
        return self._rt.execution_id

    @property
    def workflow_id(self) -> str:
        """Same as ``execution_id`` (the id the CLI and client take)."""
        return self._rt.execution_id

    @property
    def workflow_name(self) -> str:
        return self._rt.workflow_name

    @property
    def step_name(self) -> str:
        return self._rt.step.name

    @property
    def step_id(self) -> str:
        """``step[instance]#attempt``: unique within the execution."""
        return self._rt.step_id

    @property
    def attempt(self) -> int:
        """1 for the first try of this step instance, 2 for the first retry..."""
        return self._rt.attempt

    @property
    def is_replaying(self) -> bool:
        """True while the step re-runs commands already recorded (after a crash)."""
        return self._rt.replaying

    @property
    def state(self) -> MutableMapping[str, Any]:
        """Durable workflow state: as of this step instance's start, plus its own writes."""
        return self._rt.state

    @property
    def secrets(self) -> SecretStore:
        """Secrets given at run time; never recorded in clear."""
        return self._rt.secrets

    @property
    def input(self) -> Any:
        """The ``input`` the execution was started with."""
        return self._rt.input

    @property
    def parallel_context(self) -> ParallelContext | None:
        """``index``/``total`` (and ``item``) in a parallel step, else ``None``."""
        return self._rt.parallel_context

    # operations -------------------------------------------------------------------------
    async def deploy_agent(
        self,
        name: str,
        image: str,
        env: dict[str, str] | None = None,
        command: Sequence[str] | None = None,
        resources: ResourceRequirements | dict[str, Any] | None = None,
        timeout: Duration | None = "30m",
        network: str | None = None,
    ) -> AgentHandle:
        """Deploy an agent; launched at most once, even if the engine crashes meanwhile."""
        return await self._rt.deploy_agent(name, image, env, command, resources, timeout,
                                           network)

    async def run_workflow(
        self,
        workflow: object,
        wait: bool = True,
        *,
        input: Any = None,
        tags: dict[str, str] | None = None,
    ) -> Any:
        """Run a child workflow (started at most once). With ``wait`` (default) returns its
        result; with ``wait=False`` a handle to ``await`` later."""
        result: Any | ChildWorkflowHandle = await self._rt.run_workflow(
            workflow, wait, input=input, tags=tags)
        return result

    async def sleep(self, duration: Duration) -> None:
        """Wait durably: a crash does not restart the wait."""
        await self._rt.sleep(duration)

    def now(self) -> dt.datetime:
        """Current UTC time, recorded (use instead of ``datetime.now()``)."""
        return self._rt.now()

    def random(self) -> float:
        """A float in [0, 1), recorded (use instead of ``random.random()``)."""
        return self._rt.random()

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded (use instead of ``uuid.uuid4()``)."""
        return self._rt.uuid4()

    # versioning -------------------------------------------------------------------------
    def patched(self, patch_id: str) -> bool:
        """Whether this execution runs the code of patch ``patch_id``: version a change of
        a step under executions in flight.

        ::

            if ctx.patched("audit-step"):
                ...  # the new code
            else:
                ...  # the old code, for executions started before the change

        Decided once per execution, the same in every step, on every resume and replay:
        true for executions whose first run had code naming ``patch_id``; false for those
        started before (even in a step they had not reached when the code changed). Not a
        command: adding it to a step in flight does not shift that step's history.

        Write ``patch_id`` as a string literal (or a module-level constant) in the workflow
        class or a function of its module: the engine finds the ids there to record, when
        an execution starts, which patches its code has. An id it cannot find there (one
        computed at run time) raises ``WorkflowDefinitionError``, since new executions could
        never take its new branch.
        """
        return self._rt.patched(patch_id)

    def deprecate_patch(self, patch_id: str) -> None:
        """Mark that the old branch of patch ``patch_id`` was removed (keep only the new
        code, and this call in its place).

        A no-op for executions started with the patch. An execution started before it
        cannot run this code: it fails here with ``NonDeterminismError`` and is left
        resumable by the code that still has the old branch. Once no such execution is
        left, this call can go too.
        """
        self._rt.deprecate_patch(patch_id)

    def json(self, obj: Any, **kwargs: Any) -> str:
        """JSON text of ``obj``; models, dataclasses and agent results become objects."""
        return values.dumps_json(obj, **kwargs)

    async def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """Write to the execution's logs (once: not again on replay)."""
        await self._rt.log(message, level, **fields)

    async def metric(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        """Record a metric sample (once)."""
        await self._rt.metric(name, value, tags)

    def __repr__(self) -> str:
        return f"Context(execution_id={self.execution_id!r}, step_id={self.step_id!r})"
