"""What a step instance can do: every ``ctx`` operation is a *command* with an index.

A ``StepRuntime`` lives for one attempt of one step instance. Its commands are numbered
0, 1, 2...; a command whose index is already in the history returns what was recorded,
without side effects, after checking that the code asks for the same thing, every argument
compared in its recorded form (else ``NonDeterminismError``). The first command past the
history is live.

``ctx.patched``/``ctx.deprecate_patch`` are not commands (adding one to a step in flight
must not shift the indexes of the commands after it): they read the patch ids the
execution's first run declared (``PatchesDeclared``), found in the workflow's code by
``declared_patches``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import dis
import inspect
import math
import random as _random
import types
import uuid
import weakref
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

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
    RuntimeUnavailableError,
    SerializationError,
    WorkflowDefinitionError,
)
from .observe import AttemptRef
from .runtimes.base import AgentOutcome, AgentSpec, AgentState
from .secrets import Redactor, SecretStore
from .spec import StepSpec, get_workflow_spec
from .types import AgentResult, ParallelContext, ResourceRequirements

if TYPE_CHECKING:
    from .runner import Runner

__all__ = [
    "AgentHandle",
    "ChildWorkflowHandle",
    "StateView",
    "StepRuntime",
    "declared_patches",
]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# what a command is, compared with what the history recorded -------------------------------
class _Unknown:
    """An argument an older history did not record: it matches anything."""

    def __repr__(self) -> str:
        return "<not recorded>"


_UNKNOWN: Any = _Unknown()
_SHOW_LIMIT = 200  # characters of one argument in an error message
_TREES = ("value", "input")  # arguments holding ``values.dump`` trees


def _canon(value: Any) -> Any:
    """``value`` as the store gives it back (tuples become lists, dicts come back in
    stored order), so that what the code does now compares equal to what was recorded."""
    try:
        return msgspec.json.decode(msgspec.json.encode(value))
    except (TypeError, ValueError, msgspec.MsgspecError):
        return value


@dataclass(frozen=True, slots=True)
class _Call:
    """A command as the code asks for it, or as the history recorded it: what it is
    (``op``) and its arguments in their recorded form (encoded, secrets as references)."""

    op: str
    args: tuple[tuple[str, Any], ...] = ()

    def matches(self, recorded: _Call) -> bool:
        if self.op != recorded.op:
            return False
        mine = dict(self.args)
        return all(v is _UNKNOWN or (k in mine and mine[k] == v) for k, v in recorded.args)

    def render(self, against: _Call | None = None) -> str:
        """How it reads in an error; with ``against`` (the other side), arguments equal
        there are elided as ``...``."""
        other = dict(against.args) if against is not None and against.op == self.op else None

        def equal(name: str, value: Any) -> bool:
            if other is None:
                return False
            theirs = other.get(name, _UNKNOWN)
            return theirs is _UNKNOWN or value is _UNKNOWN or theirs == value

        if self.op in ("state", "del state"):
            key, value = dict(self.args).get("key"), dict(self.args).get("value")
            if self.op == "del state":
                return f"del state[{key!r}]"
            shown = "..." if equal("value", value) else _show(value, tree=True)
            return f"state[{key!r}] = {shown}"
        parts: list[str] = []
        for name, value in self.args:
            if value is _UNKNOWN and other is None:
                continue
            if equal(name, value):
                if not parts or parts[-1] != "...":
                    parts.append("...")
            elif name == "duration" and isinstance(value, int | float):
                parts.append(f"{name}={value:g}s")
            else:
                parts.append(f"{name}={_show(value, tree=name in _TREES)}")
        return f"{self.op}({', '.join(parts)})"


def _show(value: Any, *, tree: bool = False) -> str:
    """A value for an error message: decoded if it is a stored tree, cut if long."""
    if tree:
        try:
            value = values.load(value)
        except Exception:  # shown as stored
            pass
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[:_SHOW_LIMIT - 3] + "..."


def _recorded_call(ev: CommandEvent, refs: Redactor) -> _Call:
    """What the first event of a recorded command says the code asked for (secrets in
    agents' env and command as ``[secret:NAME]`` references, by ``refs``)."""
    if isinstance(ev, AgentDeployRequested):
        return _Call("deploy_agent", (
            ("name", ev.name), ("image", ev.image), ("command", _canon(refs.tree(ev.command))),
            ("env", _canon(refs.tree(ev.env))), ("resources", _canon(ev.resources))))
    if isinstance(ev, StateSet):
        if ev.deleted:
            return _Call("del state", (("key", ev.key),))
        return _Call("state", (("key", ev.key), ("value", _canon(ev.value))))
    if isinstance(ev, TimerStarted):
        return _Call("sleep", (("duration", _UNKNOWN if ev.duration is None else ev.duration),))
    if isinstance(ev, SideEffectRecorded):
        return _Call(ev.kind)
    if isinstance(ev, ChildWorkflowStarted):
        recorded_input = _UNKNOWN if ev.input is msgspec.UNSET else _canon(ev.input)
        return _Call("run_workflow", (("workflow", ev.workflow_name), ("input", recorded_input)))
    if isinstance(ev, LogRecorded):
        return _Call("log")
    if isinstance(ev, MetricRecorded):
        return _Call("metric", (("name", ev.name),))
    return _Call(type(ev).__name__)


# patches ----------------------------------------------------------------------------------
_PATCH_METHODS = frozenset({"patched", "deprecate_patch"})
_patch_cache: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def declared_patches(cls: type) -> frozenset[str]:
    """The patch ids the code of workflow class ``cls`` names: the first argument of every
    ``<x>.patched(...)``/``<x>.deprecate_patch(...)`` call in its methods (those of its
    base classes too) and in the functions of their module they call, when that argument
    is a string literal, a module-level constant or a class attribute (``self.PATCH``).

    Read from the compiled code, not the source file: it works for classes built with
    ``exec``, and a file changed on disk under a running process does not change what
    that process declares. An id computed at run time cannot be found: ``ctx.patched``
    refuses it (see ``StepRuntime.patched``).
    """
    found = _patch_cache.get(cls)
    if found is None:
        ids: set[str] = set()
        seen: set[types.CodeType] = set()
        for klass in cls.__mro__:
            if klass is object:
                continue
            for member in vars(klass).values():
                fn = member.__func__ if isinstance(member, staticmethod | classmethod) else (
                    member.fget if isinstance(member, property) else member)
                if not inspect.isfunction(fn):
                    continue
                try:
                    fn = inspect.unwrap(fn)
                except ValueError:  # a __wrapped__ cycle: scan the function as it is
                    pass
                if inspect.isfunction(fn):
                    _scan_code(fn.__code__, fn.__globals__, klass, ids, seen)
        found = _patch_cache[cls] = frozenset(ids)
    return found


def _scan_code(code: types.CodeType, globs: dict[str, Any], klass: type, ids: set[str],
               seen: set[types.CodeType]) -> None:
    if code in seen:
        return
    seen.add(code)
    instructions = list(dis.get_instructions(code))

    def calls_at(j: int) -> bool:
        """Whether the argument loaded just before ``j`` is the whole argument: the call
        (or its keyword names) comes next, not more of an expression."""
        if j >= len(instructions):
            return False
        op = instructions[j].opname
        if op.startswith("CALL") or op in ("PRECALL", "KW_NAMES"):
            return True
        return (op == "LOAD_CONST" and isinstance(instructions[j].argval, tuple)
                and j + 1 < len(instructions)
                and instructions[j + 1].opname.startswith("CALL"))

    for i, ins in enumerate(instructions):
        if ins.opname in ("LOAD_METHOD", "LOAD_ATTR") and ins.argval in _PATCH_METHODS:
            arg = instructions[i + 1] if i + 1 < len(instructions) else None
            value: Any = None
            if arg is None:
                continue
            if arg.opname.startswith("LOAD_CONST") and calls_at(i + 2):
                value = arg.argval
            elif arg.opname in ("LOAD_GLOBAL", "LOAD_NAME") and calls_at(i + 2):
                value = globs.get(arg.argval)
            elif (arg.opname.startswith(("LOAD_FAST", "LOAD_DEREF"))
                  and i + 2 < len(instructions)
                  and instructions[i + 2].opname in ("LOAD_ATTR", "LOAD_METHOD")
                  and calls_at(i + 3)):
                value = getattr(klass, instructions[i + 2].argval, None)
            if isinstance(value, str):
                ids.add(value)
        elif ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
            # a helper of the same module called from a step: it may ask for patches too
            helper = globs.get(ins.argval)
            if inspect.isfunction(helper) and helper.__globals__ is globs:
                _scan_code(helper.__code__, globs, klass, ids, seen)
    for const in code.co_consts:  # nested functions, lambdas, comprehensions
        if isinstance(const, types.CodeType):
            _scan_code(const, globs, klass, ids, seen)


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
        #: the last recorded command index: past it, the attempt has caught up
        self._last_recorded = max(self._recorded, default=-1)
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
    def ref(self) -> AttemptRef:
        """This attempt, as the engine's observer is told of it."""
        return AttemptRef(self.runner.execution_id, self.runner.spec.name, *self._key)

    @property
    def replaying(self) -> bool:
        """True while this attempt is re-running commands already in the history."""
        return self._index in self._recorded

    # the command protocol ---------------------------------------------------------------
    def _command(self, call: _Call) -> tuple[int, list[CommandEvent] | None]:
        """Allocate the next command index; check ``call`` against the history."""
        self.runner.check_alive()
        idx = self._index
        self._index = idx + 1
        recorded = self._recorded.get(idx)
        if recorded is not None:
            was = _recorded_call(recorded[0], self.runner.secret_refs)
            if not call.matches(was):
                raise self._diverged(idx, was.render(), call.render(against=was))
        if idx == self._last_recorded:
            self.runner.caught_up(self._key)
        return idx, recorded

    def _diverged(self, idx: int, recorded: str, actual: str) -> NonDeterminismError:
        seq = self.runner.h.command_seqs.get(self._key, {}).get(idx)
        return self.runner.diverged(NonDeterminismError(
            execution_id=self.runner.execution_id, step=self.step.name,
            instance=self.instance, attempt=self.attempt, index=idx, seq=seq,
            recorded=recorded, actual=actual))

    def check_finished(self) -> None:
        """At the end of a replayed attempt: the history must not hold more commands."""
        extra = [i for i in self._recorded if i >= self._index]
        if extra:
            first = min(extra)
            was = _recorded_call(self._recorded[first][0], self.runner.secret_refs)
            raise self._diverged(first, was.render(), "the step returning without it")

    # versioning -------------------------------------------------------------------------
    def _patch_known(self, patch_id: str, call: str) -> bool:
        """Whether the execution's first run knew ``patch_id``; refuses an id the code
        does not name where ``declared_patches`` can find it."""
        self.runner.check_alive()
        if not isinstance(patch_id, str) or not patch_id:
            raise TypeError(f"{call} in step {self.step.name!r}: the patch id must be a "
                            f"non-empty string, got {patch_id!r}")
        declared = self.runner.h.patches
        if declared is not None and patch_id in declared:
            return True
        if patch_id not in self.runner.code_patches:
            raise WorkflowDefinitionError(self.runner.spec.name, [
                f"step {self.step.name!r} calls {call}({patch_id!r}), but no call "
                f"{call}({patch_id!r}) with that id written as a string literal (or a "
                "module-level constant) is in the workflow class or the functions of its "
                "module, so executions cannot record at their start that their code has "
                "this patch; write the id as a literal"])
        return False

    def patched(self, patch_id: str) -> bool:
        """True if this execution was started by code that has patch ``patch_id``."""
        return self._patch_known(patch_id, "ctx.patched")

    def deprecate_patch(self, patch_id: str) -> None:
        """Refuse to run an execution started before patch ``patch_id`` (its branch is
        gone); a no-op for the others."""
        if self._patch_known(patch_id, "ctx.deprecate_patch"):
            return
        raise self.runner.diverged(NonDeterminismError(
            execution_id=self.runner.execution_id, step=self.step.name,
            instance=self.instance, attempt=self.attempt, index=None,
            recorded=f"an execution started before patch {patch_id!r} (by code that did "
            "not have it)",
            actual=f"ctx.deprecate_patch({patch_id!r}): the code for executions started "
            "before that patch was removed",
            hint=f"restore the `if ctx.patched({patch_id!r}):` branch and the old code in "
            "its else branch until every execution started before the patch has "
            "finished, then deprecate it again"))

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
        runner = self.runner
        redact = runner.secret_refs  # secrets are compared by reference, as recorded
        # a name, image or network has no reason to hold a secret, and they are shown as
        # they are (history, logs, container names): refused, naming the secret, not it
        for what, text in (("name", name), ("image", image), ("network", network)):
            if text is not None:
                redact.check(text, f"deploy_agent in step {self.step.name!r}: the agent {what}")
        idx, recorded = self._command(_Call("deploy_agent", (
            ("name", name), ("image", image), ("command", _canon(redact.tree(cmd))),
            ("env", _canon(redact.tree(clean_env))), ("resources", _canon(res)))))
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
                try:
                    status = await runner.runtime.lookup(agent_id)
                except RuntimeUnavailableError as exc:
                    runner.halt(exc)
                    raise
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
        except RuntimeUnavailableError as exc:  # not the agent's failure: resumed later
            runner.halt(exc)
            raise
        except Exception as exc:
            msg = f"agent {spec.name!r} (image {spec.image!r}) could not be launched: {exc}"
            kind = "AgentConfigurationError" if isinstance(exc, ConfigurationError) else ""
            ev = self._emit(AgentFailed(**self._base(idx), agent_id=spec.agent_id, error=msg,
                                        error_type=kind))
            runner.engine.observer.agent_finished(
                self.ref, agent=spec.name, image=spec.image, agent_id=spec.agent_id,
                outcome="launch_failed", exit_code=None, started_at=None, finished_at=None)
            raise _launch_error(ev, spec.name, runner.redactor.text(msg)) from None
        reach("agent.started")
        self._emit(AgentStarted(**self._base(idx), agent_id=spec.agent_id,
                                runtime=runner.runtime.name, adopted=adopted))
        if not adopted:
            runner.engine.observer.agent_launched(self.ref, agent=spec.name, image=spec.image,
                                                  agent_id=spec.agent_id)

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
        runner = self.runner
        # encoded as the child records it (a secret's value in it is refused here)
        input_tree = values.dump(input, where=f"input of workflow {spec.name!r}",
                                 secrets=runner.redactor.scanner)
        idx, recorded = self._command(_Call("run_workflow", (
            ("workflow", spec.name), ("input", _canon(input_tree)))))
        child_id = runner.child_id(self.step.name, self.instance, self.attempt, idx)
        final: ChildWorkflowCompleted | None = None
        if recorded is None:
            self._emit(ChildWorkflowStarted(**self._base(idx), child_id=child_id,
                                            workflow_name=spec.name, input=input_tree))
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
        seconds = float(parse_duration(duration, what="sleep duration") or 0.0)
        idx, recorded = self._command(_Call("sleep", (("duration", seconds),)))
        runner = self.runner
        if recorded is None:
            fire_at = runner.clock.now() + seconds
            self._emit(TimerStarted(**self._base(idx), fire_at=fire_at, duration=seconds))
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
        idx, recorded = self._command(_Call(kind))
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
        idx, recorded = self._command(_Call("log"))
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
        idx, recorded = self._command(_Call("metric", (("name", str(name)),)))
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
            _Call("del state", (("key", key),)) if deleted
            else _Call("state", (("key", key), ("value", _canon(tree)))))
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
            # stored encoded: a key like the engine's own "__flow__" comes back as given
            output=dict(values.load(final.output) or {}),
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
            except BaseException as exc:
                if isinstance(exc, RuntimeUnavailableError):
                    runner.halt(exc)  # not the agent's failure: the run stops, resumable
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
                log_tail=values.safe_text(redact.tail(outcome.log_tail, 4000)),
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
                    log_tail=values.safe_text(redact.tail(outcome.log_tail, 4000)),
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
                             log_tail=values.safe_text(redact.tail(outcome.log_tail, 4000)),
                             started_at=outcome.started_at, finished_at=outcome.finished_at)
        ev = runner.emit(ev)
        ended = ("completed" if isinstance(ev, AgentCompleted) else
                 "timed_out" if outcome.timed_out else "lost" if self.lost else "failed")
        runner.engine.observer.agent_finished(
            rt.ref, agent=self.name, image=self._spec.image, agent_id=self.id, outcome=ended,
            exit_code=ev.exit_code, started_at=ev.started_at, finished_at=ev.finished_at)
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
                outcome = await runner.wait_for_child(self.id)
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


