"""What a step instance can do: every ``ctx`` operation is a *command* with an index.

A ``StepRuntime`` lives for one attempt of one step instance. Its commands are numbered
0, 1, 2...; a command whose index is already in the history returns what was recorded,
without side effects, after checking that the code asks for the same thing (else
``NonDeterminismError``). The first command past the history is live.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import random as _random
import uuid
from collections.abc import Iterator, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from agentainer_flow.store.events import (
    AgentCompleted,
    AgentDeployRequested,
    AgentFailed,
    AgentOutput,
    AgentStarted,
    ChildWorkflowCompleted,
    ChildWorkflowStarted,
    CommandEvent,
    LogRecorded,
    MetricRecorded,
    SideEffectRecorded,
    StateSet,
    TimerFired,
    TimerStarted,
)

from . import values
from ._testhooks import reach
from .durations import Duration, parse_duration
from .errors import (
    AgentConfigurationError,
    AgentFailedError,
    AgentOutputError,
    AgentTimeoutError,
    ChildWorkflowError,
    ConfigurationError,
    NonDeterminismError,
    SerializationError,
)
from .runtimes.base import AgentOutcome, AgentSpec, AgentState
from .secrets import SecretStore
from .spec import StepSpec, get_workflow_spec
from .types import AgentResult, ParallelContext, ResourceRequirements

if TYPE_CHECKING:
    from .runner import Runner

__all__ = ["AgentHandle", "ChildWorkflowHandle", "StateView", "StepRuntime"]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _signature(ev: CommandEvent) -> str:
    """How a recorded command reads in a ``NonDeterminismError``."""
    if isinstance(ev, AgentDeployRequested):
        return f"deploy_agent(name={ev.name!r}, image={ev.image!r})"
    if isinstance(ev, StateSet):
        return f"{'del ' if ev.deleted else ''}state[{ev.key!r}]{'' if ev.deleted else ' = ...'}"
    if isinstance(ev, TimerStarted):
        return "sleep(...)"
    if isinstance(ev, SideEffectRecorded):
        return f"{ev.kind}()"
    if isinstance(ev, ChildWorkflowStarted):
        return f"run_workflow({ev.workflow_name!r})"
    if isinstance(ev, LogRecorded):
        return "log(...)"
    if isinstance(ev, MetricRecorded):
        return f"metric({ev.name!r})"
    return type(ev).__name__


class StepRuntime:
    """The engine side of ``Context`` for one attempt of one step instance."""

    def __init__(
        self,
        runner: Runner,
        step: StepSpec,
        instance: int,
        total: int,
        attempt: int,
        item: Any,
        snapshot: dict[str, Any],
    ) -> None:
        self.runner = runner
        self.step = step
        self.instance = instance
        self.total = total
        self.attempt = attempt
        self.item = item
        self._key = (step.name, instance, attempt)
        self._recorded = runner.h.commands.get(self._key) or {}
        self._index = 0
        self.handles: list[AgentHandle] = []
        self.state = StateView(self, snapshot)
        self.parallel_context = (
            ParallelContext(instance, total, item) if step.parallel else None
        )

    # identity ---------------------------------------------------------------------------
    @property
    def execution_id(self) -> str:
        return self.runner.execution_id

    @property
    def workflow_name(self) -> str:
        return self.runner.spec.name

    @property
    def step_id(self) -> str:
        return f"{self.step.name}[{self.instance}]#{self.attempt}"

    @property
    def input(self) -> Any:
        return self.runner.input

    @property
    def secrets(self) -> SecretStore:
        return self.runner.secret_store

    @property
    def replaying(self) -> bool:
        """True while this attempt is re-running commands already in the history."""
        return self._index in self._recorded

    # the command protocol ---------------------------------------------------------------
    def _command(self, actual: str, matches: Any) -> tuple[int, list[CommandEvent] | None]:
        """Allocate the next command index; check it against the history."""
        self.runner.check_alive()
        idx = self._index
        self._index = idx + 1
        recorded = self._recorded.get(idx)
        if recorded is not None and not matches(recorded[0]):
            raise self.runner.diverged(
                NonDeterminismError(
                    execution_id=self.runner.execution_id,
                    step=self.step.name,
                    instance=self.instance,
                    attempt=self.attempt,
                    index=idx,
                    recorded=_signature(recorded[0]),
                    actual=actual,
                )
            )
        return idx, recorded

    def check_finished(self) -> None:
        """At the end of a replayed attempt: the history must not hold more commands."""
        extra = [i for i in self._recorded if i >= self._index]
        if extra:
            ev = self._recorded[min(extra)][0]
            raise self.runner.diverged(
                NonDeterminismError(
                    execution_id=self.runner.execution_id,
                    step=self.step.name,
                    instance=self.instance,
                    attempt=self.attempt,
                    index=min(extra),
                    recorded=_signature(ev),
                    actual="the step returning without it",
                )
            )

    def _emit(self, ev: CommandEvent) -> Any:
        return self.runner.emit(ev)

    def _base(self, idx: int) -> dict[str, Any]:
        return {"step": self.step.name, "instance": self.instance, "attempt": self.attempt,
                "index": idx, "ts": self.runner.clock.now()}

    # agents -----------------------------------------------------------------------------
    async def deploy_agent(
        self,
        name: str,
        image: str,
        env: dict[str, Any] | None = None,
        command: Sequence[str] | None = None,
        resources: ResourceRequirements | dict[str, Any] | None = None,
        timeout: Duration | None = "30m",
        network: str | None = None,
    ) -> AgentHandle:
        """Launch an agent (at most once per command, even across crashes)."""
        clean_env = _check_env(name, env)
        cmd = [str(c) for c in command] if command is not None else None
        res = resources.to_dict() if isinstance(resources, ResourceRequirements) else dict(
            resources or {}
        )
        # refused here, not by the store after the intent is half recorded; values of env
        # and command may be secrets, so messages name where they are, never what they hold
        where = f"agent {name!r} in step {self.step.name!r}"
        values.check_text(name, f"deploy_agent in step {self.step.name!r}: the agent name "
                          f"{name!r}", allow_nul=False)
        values.check_text(image, f"{where}: the image {image!r}", allow_nul=False)
        if network is not None:
            values.check_text(network, f"{where}: the network {network!r}", allow_nul=False)
        for k, v in clean_env.items():
            values.check_text(k, f"{where}: the env name {k!r}", allow_nul=False)
            values.check_text(v, f"{where}: the value of env[{k!r}]", allow_nul=False)
        for i, arg in enumerate(cmd or ()):
            values.check_text(arg, f"{where}: command[{i}]", allow_nul=False)
        for k in res:
            values.check_text(k, f"{where}: the resources key {k!r}")
        values.dump(res, where=f"{where}: resources")
        timeout_s = parse_duration(timeout, what=f"agent {name!r} timeout")
        idx, recorded = self._command(
            f"deploy_agent(name={name!r}, image={image!r})",
            lambda ev: isinstance(ev, AgentDeployRequested)
            and ev.name == name
            and ev.image == image,
        )
        runner = self.runner
        agent_id = runner.agent_id(self.step.name, self.instance, self.attempt, idx)
        spec = AgentSpec(
            agent_id=agent_id,
            name=name,
            image=image,
            command=cmd,
            env=clean_env,
            resources=res,
            labels={
                "flow.execution": runner.execution_id,
                "flow.workflow": runner.spec.name,
                "flow.step": self.step.name,
                "flow.instance": str(self.instance),
                "flow.attempt": str(self.attempt),
                "flow.command": str(idx),
                "flow.store": runner.engine.store_label,
            },
            timeout=timeout_s,
            network=network,
        )
        if recorded is None:
            deadline = runner.clock.now() + timeout_s if timeout_s is not None else None
            self._emit(AgentDeployRequested(
                **self._base(idx), name=name, image=image, agent_id=agent_id,
                env=clean_env, command=cmd, resources=res, deadline=deadline))
            await runner.flush()  # the intent is durable before anything is launched
            reach("agent.intent_logged")
            await self._launch(idx, spec, adopted=False)
            handle = AgentHandle(self, idx, spec, deadline, None)
        else:
            req = recorded[0]
            assert isinstance(req, AgentDeployRequested)
            final = next((e for e in recorded if isinstance(e, AgentCompleted | AgentFailed)),
                         None)
            handle = AgentHandle(self, idx, spec, req.deadline, final)
            if isinstance(final, AgentFailed) and not any(
                    isinstance(e, AgentStarted) for e in recorded):
                raise _launch_error(final, name, final.error)  # as when it happened
            if final is None:
                status = await runner.runtime.lookup(agent_id)
                if any(isinstance(e, AgentStarted) for e in recorded):
                    handle.lost = status.state is AgentState.MISSING
                else:
                    # the engine died somewhere in the launch: launching again is idempotent,
                    # it adopts what is there and completes what was interrupted
                    await self._launch(idx, spec,
                                       adopted=status.state is not AgentState.MISSING)
        self.handles.append(handle)
        return handle

    async def _launch(self, idx: int, spec: AgentSpec, *, adopted: bool) -> None:
        """Launch (or adopt: launches are idempotent) and record ``AgentStarted``; a launch
        that fails is recorded as the agent failing."""
        runner = self.runner
        runner.check_alive()  # a runner that lost its lease launches nothing more
        try:
            await runner.runtime.launch(spec)
        except Exception as exc:
            msg = f"agent {spec.name!r} (image {spec.image!r}) could not be launched: {exc}"
            kind = "AgentConfigurationError" if isinstance(exc, ConfigurationError) else ""
            ev = self._emit(AgentFailed(**self._base(idx), agent_id=spec.agent_id, error=msg,
                                        error_type=kind))
            raise _launch_error(ev, spec.name, runner.redactor.text(msg)) from None
        reach("agent.started")
        self._emit(AgentStarted(**self._base(idx), agent_id=spec.agent_id,
                                runtime=runner.runtime.name, adopted=adopted))

    # child workflows --------------------------------------------------------------------
    async def run_workflow(
        self,
        workflow: object,
        wait: bool = True,
        *,
        input: Any = None,
        tags: dict[str, str] | None = None,
    ) -> Any:
        """Start a child execution (at most once); with ``wait`` return its result."""
        spec = get_workflow_spec(workflow)
        idx, recorded = self._command(
            f"run_workflow({spec.name!r})",
            lambda ev: isinstance(ev, ChildWorkflowStarted) and ev.workflow_name == spec.name,
        )
        runner = self.runner
        child_id = runner.child_id(self.step.name, self.instance, self.attempt, idx)
        final: ChildWorkflowCompleted | None = None
        if recorded is None:
            self._emit(ChildWorkflowStarted(**self._base(idx), child_id=child_id,
                                            workflow_name=spec.name))
            await runner.flush()
        else:
            final = next((e for e in recorded if isinstance(e, ChildWorkflowCompleted)), None)
        if final is None:
            await runner.engine.ensure_child(
                child_id, workflow, parent=runner, input=input, tags=tags
            )
        handle = ChildWorkflowHandle(self, idx, child_id, final)
        if wait:
            return await handle.result()
        return handle

    # time and randomness ----------------------------------------------------------------
    async def sleep(self, duration: Duration) -> None:
        """A durable timer: a crash does not restart the wait."""
        seconds = parse_duration(duration, what="sleep duration") or 0.0
        idx, recorded = self._command("sleep(...)", lambda ev: isinstance(ev, TimerStarted))
        runner = self.runner
        if recorded is None:
            fire_at = runner.clock.now() + seconds
            self._emit(TimerStarted(**self._base(idx), fire_at=fire_at))
            await runner.flush(wake_at=fire_at)
        else:
            if any(isinstance(e, TimerFired) for e in recorded):
                return
            started = recorded[0]
            assert isinstance(started, TimerStarted)
            fire_at = started.fire_at
        runner.sleeping(fire_at)
        try:
            await runner.clock.sleep_until(fire_at)
        finally:
            runner.awake()
        self._emit(TimerFired(**self._base(idx)))

    def _side_effect(self, kind: str, make: Any) -> Any:
        idx, recorded = self._command(
            f"{kind}()", lambda ev: isinstance(ev, SideEffectRecorded) and ev.kind == kind
        )
        if recorded is not None:
            ev = recorded[0]
            assert isinstance(ev, SideEffectRecorded)
            return ev.value
        value = make()
        self._emit(SideEffectRecorded(**self._base(idx), kind=kind, value=value))
        return value

    def now(self) -> dt.datetime:
        """The current time (UTC), recorded so a replay sees the same."""
        ts = self._side_effect("now", self.runner.clock.now)
        return dt.datetime.fromtimestamp(ts, dt.UTC)

    def random(self) -> float:
        """A random float in [0, 1), recorded."""
        value: float = self._side_effect("random", _random.random)
        return value

    def uuid4(self) -> uuid.UUID:
        """A random UUID, recorded."""
        return uuid.UUID(self._side_effect("uuid4", lambda: str(uuid.uuid4())))

    # observability ----------------------------------------------------------------------
    async def log(self, message: str, level: str = "info", **fields: Any) -> None:
        """A message in the execution's logs; written once, never again on replay."""
        level = level.lower()
        if level not in _LOG_LEVELS:
            raise ValueError(f"log level must be one of {', '.join(_LOG_LEVELS)}, got {level!r}")
        idx, recorded = self._command("log(...)", lambda ev: isinstance(ev, LogRecorded))
        if recorded is not None:
            return
        runner = self.runner
        text = values.safe_text(runner.redactor.text(str(message)))  # for people: redacted
        tree = values.dump(  # user data: a secret's value in a field is refused
            fields, where=f"the fields of ctx.log in step {self.step.name!r}",
            secrets=runner.redactor.scanner) if fields else {}
        self._emit(LogRecorded(**self._base(idx), level=level, message=text, fields=tree))
        runner.log_user(level, text, self, fields)

    async def metric(self, name: str, value: float, tags: dict[str, str] | None = None) -> None:
        """A metric sample, recorded once."""
        idx, recorded = self._command(
            f"metric({name!r})", lambda ev: isinstance(ev, MetricRecorded)
        )
        if recorded is not None:
            return
        clean_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        where = f"metric {name!r} in step {self.step.name!r}"
        values.check_text(str(name), f"{where}: its name", allow_nul=False)
        for k, v in clean_tags.items():
            values.check_text(k, f"{where}: the tag name {k!r}", allow_nul=False)
            values.check_text(v, f"{where}: the value of tag {k!r}", allow_nul=False)
        number = float(value)
        if not math.isfinite(number):
            raise SerializationError(f"{where}: the value {number!r} is not a finite number")
        if self.runner.redactor:  # user data: a secret's value is refused
            self.runner.redactor.check(
                {"name": name, "tags": clean_tags},
                f"metric {name!r} in step {self.step.name!r} (its name or tags)")
        self._emit(MetricRecorded(**self._base(idx), name=str(name), value=number,
                                  tags=clean_tags))

    # state ------------------------------------------------------------------------------
    def _write_state(self, key: str, tree: Any, deleted: bool) -> Any:
        idx, recorded = self._command(
            f"{'del ' if deleted else ''}state[{key!r}]{'' if deleted else ' = ...'}",
            lambda ev: isinstance(ev, StateSet) and ev.key == key and ev.deleted == deleted,
        )
        if recorded is not None:
            ev = recorded[0]
        else:
            ev = self._emit(StateSet(**self._base(idx), key=key, value=tree, deleted=deleted))
        assert isinstance(ev, StateSet)
        return ev.value


def _check_env(agent: str, env: dict[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (env or {}).items():
        if isinstance(v, bool | int | float):
            v = str(v)
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"agent {agent!r}: env[{k!r}] must be a string, got {type(v).__name__}; "
                "convert it with str() or ctx.json()"
            )
        out[k] = v
    return out


class StateView(MutableMapping[str, Any]):
    """``ctx.state``: the workflow state as of this instance's start, plus its own writes.

    Values are stored encoded and decoded on every read, so mutating a value you read does
    not change the state: assign it back (``ctx.state["k"] = v``) to record a change.
    """

    def __init__(self, rt: StepRuntime, snapshot: dict[str, Any]) -> None:
        self._rt = rt
        self._trees = dict(snapshot)

    def __getitem__(self, key: str) -> Any:
        return values.load(self._trees[key])

    def __setitem__(self, key: str, value: Any) -> None:
        if not isinstance(key, str):
            raise TypeError(f"ctx.state keys must be strings, got {type(key).__name__}")
        values.check_text(key, f"ctx.state key {key!r} in step {self._rt.step.name!r}")
        redactor = self._rt.runner.redactor
        if redactor:  # a secret's value is refused in the key as in the value
            redactor.check(key, f"a ctx.state key in step {self._rt.step.name!r}")
        tree = values.dump(value, where=f"ctx.state[{key!r}] in step {self._rt.step.name!r}",
                           secrets=redactor.scanner)
        self._trees[key] = self._rt._write_state(key, tree, False)

    def __delitem__(self, key: str) -> None:
        if key not in self._trees:
            raise KeyError(key)
        self._rt._write_state(key, None, True)
        del self._trees[key]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._trees))

    def __len__(self) -> int:
        return len(self._trees)

    def __repr__(self) -> str:
        return f"WorkflowState({sorted(self._trees)})"


#: what is recorded of one agent's output (a chatty agent must not flood the event log)
MAX_RECORDED_OUTPUT = 1024 * 1024
_OUTPUT_BATCH_SECONDS = 0.5  # how long printed lines wait to be recorded together
_OUTPUT_BATCH_BYTES = 64 * 1024
_DRAIN_SECONDS = 5.0  # how long the last lines of an exited agent may take to read


class _OutputRecorder:
    """Records what a running agent prints as ``AgentOutput`` events (batched, durable
    within about half a second, so ``flow logs -f`` shows it live), from the cursor the
    history has for it. Never fails the step: output is for people."""

    def __init__(self, handle: AgentHandle, cursor: str) -> None:
        self._handle = handle
        self._cursor = cursor
        self._pending: list[str] = []
        self._pending_bytes = 0
        self._recorded = 0
        self._full = False
        self._ended = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        pump = asyncio.ensure_future(self._pump())
        try:
            while not pump.done():
                await asyncio.wait({pump}, timeout=_OUTPUT_BATCH_SECONDS)
                if self._pending and self._record():
                    await self._handle._rt.runner.flush()
        except asyncio.CancelledError:
            raise
        except BaseException:
            pass
        finally:
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump

    async def _pump(self) -> None:
        runtime = self._handle._rt.runner.runtime
        with contextlib.suppress(Exception):
            async for text, cursor in runtime.follow_logs(self._handle.id, self._cursor):
                if not self._add(text, cursor):
                    return
            self._ended = True  # the runtime gave everything: no drain needed

    def _add(self, text: str, cursor: str) -> bool:
        """Keep ``text`` for the next event; False once the cap is reached."""
        if self._full:
            return False
        room = MAX_RECORDED_OUTPUT - self._recorded - self._pending_bytes
        if len(text) > room:
            text = text[:max(room, 0)] + (
                f"\nflow: output of agent {self._handle.name!r} not recorded past "
                f"{MAX_RECORDED_OUTPUT} bytes; the runtime's own logs have it all\n")
            self._full = True
        self._pending.append(text)
        self._pending_bytes += len(text)
        if cursor:
            self._cursor = cursor
        return not self._full

    def _record(self) -> bool:
        """Emit what is pending as one event; whether there was something."""
        if not self._pending:
            return False
        handle = self._handle
        rt = handle._rt
        text = values.safe_text("".join(self._pending))
        self._recorded += self._pending_bytes
        self._pending, self._pending_bytes = [], 0
        base = rt._base(handle._index)
        rt.runner.emit(AgentOutput(**base, agent_id=handle.id, name=handle.name, text=text,
                                   cursor=self._cursor))
        return True

    async def close(self, *, drain: bool) -> None:
        """Stop following; with ``drain`` (the agent exited), record the lines it printed
        last. The events become durable with the agent's outcome."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        if drain and not self._full and not self._ended:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._drain(), _DRAIN_SECONDS)
        self._record()

    async def _drain(self) -> None:
        runtime = self._handle._rt.runner.runtime
        async for text, cursor in runtime.follow_logs(self._handle.id, self._cursor):
            if not self._add(text, cursor):
                return


def _launch_error(event: AgentFailed, agent: str, message: str) -> AgentFailedError:
    """What ``deploy_agent`` raises for a launch that failed, live and on replay alike."""
    if event.error_type == "AgentConfigurationError":
        return AgentConfigurationError(message, agent=agent)
    return AgentFailedError(message, agent=agent)


class AgentHandle:
    """A deployed agent. ``await handle.wait_for_completion()`` gives its ``AgentResult``."""

    def __init__(
        self,
        rt: StepRuntime,
        index: int,
        spec: AgentSpec,
        deadline: float | None,
        final: AgentCompleted | AgentFailed | None,
    ) -> None:
        self._rt = rt
        self._index = index
        self._spec = spec
        self._deadline = deadline
        self._final = final
        self.lost = False

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def id(self) -> str:
        """The deterministic agent id (container name / process directory)."""
        return self._spec.agent_id

    @property
    def done(self) -> bool:
        return self._final is not None

    async def wait_for_completion(self) -> AgentResult:
        """Wait for the agent to exit; raise ``AgentFailedError`` if it did not succeed."""
        if self._final is None:
            self._final = await self._collect()
        final = self._final
        if isinstance(final, AgentFailed):
            if final.error_type in ("SerializationError", "SecretLeakError"):  # unstorable
                raise SerializationError(final.error)
            cls: type[AgentFailedError] = (
                AgentOutputError if final.error_type == "AgentOutputError"
                else AgentTimeoutError if "timed out" in final.error else AgentFailedError)
            raise cls(final.error, agent=self.name, exit_code=final.exit_code,
                      log_tail=final.log_tail)
        return AgentResult(
            output=dict(final.output or {}),
            exit_code=final.exit_code,
            agent_name=self.name,
            agent_id=self.id,
            started_at=final.started_at,
            finished_at=final.finished_at,
        )

    async def _collect(self) -> AgentCompleted | AgentFailed:
        rt = self._rt
        runner = rt.runner
        if self.lost:
            outcome = AgentOutcome(
                exit_code=-1, log_tail="the agent was launched but the runtime no longer "
                "knows it (its container or process directory is gone)")
        else:
            timeout = (
                max(0.0, self._deadline - runner.clock.now()) if self._deadline else None
            )
            recorder = (_OutputRecorder(self, runner.h.output_cursors.get(self.id, ""))
                        if runner.runtime.follows_logs else None)
            try:
                with runner.clock.busy():
                    outcome = await runner.runtime.wait(self.id, timeout)
                    if recorder is not None:
                        await recorder.close(drain=True)
            except BaseException:
                if recorder is not None:
                    await recorder.close(drain=False)
                if not runner.leaves_agents:  # else left running, to be adopted
                    await runner.runtime.stop(self.id)
                raise
        redact = runner.redactor
        base = rt._base(self._index)  # stamped when the agent finished, not when we began
        ev: AgentCompleted | AgentFailed
        if outcome.exit_code == 0 and not outcome.timed_out and outcome.output_error:
            ev = AgentFailed(
                **base, agent_id=self.id, exit_code=0, error_type="AgentOutputError",
                error=values.safe_text(redact.text(
                    f"agent {self.name!r} (image {self._spec.image!r}) in step "
                    f"{rt.step.name!r}: {outcome.output_error}")),
                log_tail=values.safe_text(redact.text(outcome.log_tail[-4000:])),
                started_at=outcome.started_at, finished_at=outcome.finished_at)
        elif outcome.exit_code == 0 and not outcome.timed_out:
            try:
                output = values.dump(outcome.output, where=f"the output of agent "
                                     f"{self.name!r} (image {self._spec.image!r}) in step "
                                     f"{rt.step.name!r}", secrets=redact.scanner)
            except SerializationError as exc:  # recorded as a failure: replays raise it too
                ev = AgentFailed(
                    **base, agent_id=self.id, exit_code=0, error_type=type(exc).__name__,
                    error=f"cannot store {exc}",
                    log_tail=values.safe_text(redact.text(outcome.log_tail[-4000:])),
                    started_at=outcome.started_at, finished_at=outcome.finished_at)
            else:
                ev = AgentCompleted(
                    **base, agent_id=self.id, output=output, exit_code=0,
                    started_at=outcome.started_at, finished_at=outcome.finished_at)
        else:
            if outcome.timed_out:
                error = f"agent {self.name!r} (image {self._spec.image!r}) timed out"
            elif self.lost:
                error = f"agent {self.name!r} (image {self._spec.image!r}) was lost"
            else:
                error = (f"agent {self.name!r} (image {self._spec.image!r}) exited with code "
                         f"{outcome.exit_code}")
            ev = AgentFailed(**base, agent_id=self.id, error=error, exit_code=outcome.exit_code,
                             log_tail=values.safe_text(redact.text(outcome.log_tail[-4000:])),
                             started_at=outcome.started_at, finished_at=outcome.finished_at)
        ev = runner.emit(ev)
        runner.after_flush(self._remove)
        return ev

    async def _remove(self) -> None:
        """Once the outcome is durable: the agent is not needed any more (a crash here
        leaves it to the reaper, ``flow gc``)."""
        reach("agent.outcome_durable")
        await self._rt.runner.runtime.remove(self.id)

    async def stop(self) -> None:
        """Stop the agent; a later ``wait_for_completion`` reports it failed."""
        if self._final is None:
            await self._rt.runner.runtime.stop(self.id)

    async def logs(self, tail: int = 100) -> str:
        """The agent's last output lines, secrets redacted."""
        return self._rt.runner.redactor.text(await self._rt.runner.runtime.logs(self.id, tail))

    def __repr__(self) -> str:
        return f"AgentHandle(name={self.name!r}, id={self.id!r})"


class ChildWorkflowHandle:
    """A child execution started with ``ctx.run_workflow(wf, wait=False)``."""

    def __init__(
        self, rt: StepRuntime, index: int, child_id: str, final: ChildWorkflowCompleted | None
    ) -> None:
        self._rt = rt
        self._index = index
        self.id = child_id
        self._final = final

    async def result(self) -> Any:
        """Wait for the child; its result, or ``ChildWorkflowError``."""
        if self._final is None:
            runner = self._rt.runner
            try:
                outcome = await runner.engine.wait_outcome(self.id)
            except BaseException:
                if not runner.leaves_agents:
                    await runner.engine.cancel(self.id)
                raise
            ev = runner.emit(ChildWorkflowCompleted(
                **self._rt._base(self._index), child_id=self.id, status=outcome.status,
                result=outcome.result_tree, error=outcome.error))
            assert isinstance(ev, ChildWorkflowCompleted)
            self._final = ev
        final = self._final
        if final.error is not None or final.status != "completed":
            raise ChildWorkflowError(
                f"child workflow {self.id} {final.status}: {final.error}",
                child_id=self.id, status=final.status)
        return values.load(final.result)

    def __await__(self) -> Any:
        return self.result().__await__()


