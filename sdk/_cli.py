"""``flow``: run, watch, replay and operate workflow executions from a shell.

The engine is embedded: whichever process runs ``flow run --wait``, ``flow resume`` or
``flow worker`` is the one executing the workflow. To let another process pick an execution
up, ``flow run`` records the workflow file's absolute path in the tag ``flow.source``;
``resume``, ``worker`` and ``replay`` import that file when the workflow's name is not
registered yet (``-m PATH`` imports more files first, e.g. a newer version of the code).

Output is for people (tables, progress on stderr) with ``--json`` for scripts. Exit codes:
0 ok, 1 the workflow failed (or replay diverged), 2 usage error or not found. Secret values
given with ``--secret`` (or found in ``FLOW_SECRET_*``) are redacted from everything printed.
See ``docs/cli.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import importlib.util
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import structlog
import typer

from agentainer_flow.engine import Outcome, values
from agentainer_flow.engine.engine import rebuild_workflow
from agentainer_flow.engine.errors import (
    ConfigurationError,
    ExecutionBlockedError,
    SecretNotFoundError,
    WorkflowDefinitionError,
    WorkflowNotRegisteredError,
)
from agentainer_flow.engine.leases import holder_is_dead, make_owner_id
from agentainer_flow.engine.replayer import replay_history
from agentainer_flow.engine.secrets import Redactor
from agentainer_flow.engine.spec import SPEC_ATTR
from agentainer_flow.store import (
    AuditedEvent,
    ExecutionNotFoundError,
    ExecutionRecord,
    ExecutionStatus,
    FlowError,
    HistoryCorruptedError,
    QueueConfig,
    StoredEvent,
    StoreUnavailableError,
)
from agentainer_flow.store.events import EVENT_TYPES, ExecutionStarted

from ._client import DEFAULT_STORE, ExecutionMode, WorkflowClient
from ._context import Context
from ._events import ExecutionEvent, event_type
from ._loading import (
    SOURCE_TAG,
    UsageError,
    ensure_registered,
    import_file,
    import_modules,
    instantiate,
    module_file,
    pick_workflow,
    split_target,
)
from ._queues import Queue
from ._worker import HEARTBEAT_INTERVAL, Worker

__all__ = ["SOURCE_TAG", "app", "main"]


_PROGRESS_TYPES = frozenset({
    "step_started", "step_completed", "step_failed", "step_retry_scheduled", "step_skipped",
    "log_recorded", "child_workflow_started", "child_workflow_completed", "cancel_requested",
})
# errors that mean "you asked for something that is not there / not possible": exit 2
_USAGE_ERRORS: tuple[type[FlowError], ...] = (
    ExecutionNotFoundError, StoreUnavailableError, ConfigurationError, SecretNotFoundError,
    WorkflowNotRegisteredError, WorkflowDefinitionError,
)


# output ---------------------------------------------------------------------------------
class _Output:
    """Everything printed goes through here, so secret values are always redacted."""

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {
            k[len("FLOW_SECRET_"):].lower(): v for k, v in os.environ.items()
            if k.startswith("FLOW_SECRET_") and v
        }
        self.redactor = Redactor(self._secrets)
        self.running: str | None = None  # the execution this process runs, for ^C

    def add_secrets(self, secrets: Mapping[str, str]) -> None:
        self._secrets.update(secrets)
        self.redactor = Redactor(self._secrets)

    def clean(self, text: str) -> str:
        return self.redactor.text(text)

    def out(self, text: str = "") -> None:
        typer.echo(self.clean(text))

    def info(self, text: str, *, fg: str | None = None) -> None:
        typer.secho(self.clean(text), err=True, fg=fg)

    def error(self, text: str) -> None:
        typer.secho("error: " + self.clean(text), err=True, fg="red")

    def json(self, data: Any) -> None:
        # redacted before encoding, so a value JSON would escape is still found
        typer.echo(json.dumps(self.redactor.tree(_jsonable(data)), indent=2, ensure_ascii=False))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]],
              *, wrap: Sequence[str] = ()) -> None:
        """A table; wide and unwrapped when stdout is not a terminal, so it greps well."""
        from rich import box
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        tty = sys.stdout.isatty()
        console = Console(width=None if tty else 400, highlight=False, soft_wrap=not tty)
        table = Table(box=box.SIMPLE_HEAD if tty else None, show_edge=False, pad_edge=False)
        for h in headers:
            table.add_column(h.upper(), overflow="fold",
                             no_wrap=not (tty and h in wrap))
        for row in rows:
            table.add_row(*(Text(self.clean(c)) for c in row))  # Text: no markup parsing
        if tty:
            console.print(table)
            return
        with console.capture() as captured:
            console.print(table)
        typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


_out = _Output()


def _jsonable(value: Any) -> Any:
    try:
        return values.to_jsonable(value)
    except FlowError:
        return str(value)


def _configure_logging(verbose: int, quiet_level: int) -> None:
    """Engine logs go to stderr (stdout is for results), JSON unless stderr is a terminal.

    Without ``-v`` only ``quiet_level`` and above are shown; ``$FLOW_LOG_LEVEL`` overrides.
    """
    name = os.environ.get("FLOW_LOG_LEVEL", "").upper()
    level = {0: quiet_level, 1: logging.INFO}.get(verbose, logging.DEBUG)
    if name in logging.getLevelNamesMapping():
        level = logging.getLevelNamesMapping()[name]

    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        redacted: dict[str, Any] = _out.redactor.tree(dict(event))
        return redacted

    def redact_rendered(_: Any, __: str, line: Any) -> Any:
        # values the tree pass cannot see (objects rendered with str()) are redacted here
        return _out.clean(line) if isinstance(line, str) else line

    renderer: Any = (structlog.dev.ConsoleRenderer() if sys.stderr.isatty()
                     else structlog.processors.JSONRenderer(default=str))
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True), redact, renderer,
                    redact_rendered],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _ts(t: float | None, *, ms: bool = False) -> str:
    if t is None:
        return "-"
    when = dt.datetime.fromtimestamp(t, dt.UTC)
    return when.isoformat(sep=" ", timespec="milliseconds" if ms else "seconds").replace(
        "+00:00", "Z")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _holder(r: ExecutionRecord) -> tuple[str, bool] | None:
    """Who holds a running execution, and whether that holder is gone (orphaned: its lease
    expired or its process died); ``None`` when nobody holds it."""
    if r.status.is_terminal or r.lease_owner is None:
        return None
    gone = not r.lease_live(time.time()) or holder_is_dead(r.lease_owner)
    return r.lease_owner, gone


def _record_dict(r: ExecutionRecord) -> dict[str, Any]:
    holder = _holder(r)
    return {
        "lease_token": r.lease_token, "lease_renewed_at": _iso(r.lease_renewed_at),
        "lease_expires_at": _iso(r.lease_expires_at),
        "orphaned": holder is not None and holder[1],
        "id": r.id, "workflow": r.workflow_name, "version": r.workflow_version,
        "status": r.status.value, "created_at": _iso(r.created_at),
        "updated_at": _iso(r.updated_at), "finished_at": _iso(r.finished_at),
        "duration": r.duration, "tags": r.tags, "error": r.error, "parent_id": r.parent_id,
        "idempotency_key": r.idempotency_key, "cancel_requested": r.cancel_requested,
        "lease_owner": r.lease_owner, "events": r.last_seq,
    }


def _status_text(r: ExecutionRecord) -> str:
    holder = _holder(r)
    if holder is not None and holder[1]:
        return f"{r.status.value} (orphaned)"
    return r.status.value


def _holder_text(r: ExecutionRecord) -> str:
    holder = _holder(r)
    if holder is None:
        return "-"
    owner, gone = holder
    if gone:
        return f"{owner} (gone; lease expired {_ts(r.lease_expires_at)}: resume takes it over)"
    return f"{owner} (lease until {_ts(r.lease_expires_at)})"


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()


# parsing arguments ----------------------------------------------------------------------
def _pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def _parse_secrets(items: Sequence[str] | None) -> dict[str, str]:
    """``NAME=VALUE``, or ``NAME`` alone for the value of ``$FLOW_SECRET_NAME``."""
    out: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not name:
            raise UsageError("--secret needs a NAME (as NAME=VALUE or NAME)")  # no value echoed
        if not sep:
            env = f"FLOW_SECRET_{name.upper()}"
            found = os.environ.get(env)
            if found is None:
                raise SecretNotFoundError(name, f"--secret {name} reads ${env}, which is not set")
            value = found
        out[name] = value
    _out.add_secrets(out)
    return out


def _parse_images(items: Sequence[str] | None) -> dict[str, list[str]]:
    images: dict[str, list[str]] = {}
    for image, command in _pairs(items, "--image").items():
        argv = shlex.split(command)
        if not argv:
            raise UsageError(f"--image {image}= needs a command")
        images[image] = argv
    return images


def _read_data(path: Path, what: str) -> Any:
    """A JSON file, or YAML (``.yaml``/``.yml``) when PyYAML is installed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            yaml = importlib.import_module("yaml")
        except ImportError:
            raise UsageError(f"{what} {path} is YAML but PyYAML is not installed; "
                             "pip install pyyaml, or use a JSON file") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UsageError(f"{what} {path} is not valid YAML: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def _parse_input(text: str | None) -> Any:
    if text is None:
        return None
    if text.startswith("@"):
        return _read_data(Path(text[1:]), "input file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not valid JSON ({exc}); quote strings as '\"text\"' "
                         "or pass a file as @path.json") from None


# running --------------------------------------------------------------------------------
def _client(store: str, runtime: str = "mock", images: Mapping[str, Sequence[str]] | None = None,
            **engine_options: Any) -> WorkflowClient:
    """A client; read-only commands use the mock runtime, which touches nothing."""
    return WorkflowClient(store or DEFAULT_STORE, runtime, images=images or None,
                          **engine_options)


async def _progress(client: WorkflowClient, execution_id: str, after_seq: int) -> None:
    async for ev in client.stream_events(execution_id, after_seq=after_seq):
        if ev.type in _PROGRESS_TYPES:
            fg = "red" if ev.type == "step_failed" else None
            when = ev.timestamp.strftime("%H:%M:%S")
            where = f"[{ev.step}] " if ev.type == "log_recorded" and ev.step else ""
            _out.info(f"  {when} {where}{ev.message}", fg=fg)


async def _follow(client: WorkflowClient, execution_id: str, *, after_seq: int,
                  as_json: bool, quiet: bool) -> int:
    """Wait for the execution (running in this process) to end, showing progress."""
    _out.running = execution_id
    watcher = None if quiet else asyncio.ensure_future(
        _progress(client, execution_id, after_seq))
    try:
        outcome = await client.engine.wait_outcome(execution_id)
    except BaseException:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        raise
    if watcher is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(watcher, 2.0)  # it ends at the terminal event
    _out.running = None
    record = await client.describe(execution_id)
    return _report_outcome(outcome, record, as_json=as_json)


def _report_outcome(outcome: Outcome, record: ExecutionRecord, *, as_json: bool) -> int:
    result = outcome.result if outcome.status == "completed" else None
    if as_json:
        _out.json({"execution_id": outcome.execution_id, "workflow": record.workflow_name,
                   "status": outcome.status, "result": result, "error": outcome.error,
                   "error_type": outcome.error_type, "step": outcome.step,
                   "duration": record.duration})
    elif outcome.status == "completed":
        _out.info(f"execution {outcome.execution_id} completed in {_dur(record.duration)}",
                  fg="green")
        _out.out(json.dumps(_jsonable(result), indent=2, ensure_ascii=False))
    else:
        where = f" in step {outcome.step!r}" if outcome.step else ""
        _out.error(f"execution {outcome.execution_id} {outcome.status}{where}: {outcome.error}")
    return 0 if outcome.status == "completed" else 1


def _exit_code(exc: FlowError) -> int:
    if isinstance(exc, ExecutionBlockedError):
        return 3
    return 2 if isinstance(exc, (*_USAGE_ERRORS, UsageError)) else 1


def _go(make: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run a command's coroutine; FlowErrors become one line on stderr and an exit code."""

    async def runner() -> int:
        return await make()

    try:
        code = asyncio.run(runner())
    except FlowError as exc:
        _out.error(str(exc))
        code = _exit_code(exc)
    except KeyboardInterrupt:
        hint = (f"; execution {_out.running} stays resumable: flow resume {_out.running}"
                if _out.running else "")
        _out.info("interrupted" + hint)
        code = 130
    except Exception as exc:
        if os.environ.get("FLOW_DEBUG"):
            raise
        _out.error(f"internal error: {type(exc).__name__}: {exc} "
                   "(set FLOW_DEBUG=1 for the traceback)")
        code = 1
    raise typer.Exit(code)


# the app --------------------------------------------------------------------------------
app = typer.Typer(
    name="flow",
    help="Run, watch, replay and operate durable agentainer-flow workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks show locals, which may hold secrets
)

StoreOpt = Annotated[str, typer.Option(
    "--store", envvar="FLOW_STORE", show_envvar=True,
    help="Event store URL: sqlite:///path.db or postgresql://user@host:5432/db.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines.")]
ModulesOpt = Annotated[list[Path] | None, typer.Option(
    "--module", "-m", help="Import this workflow file first (repeatable).")]
SecretsOpt = Annotated[list[str] | None, typer.Option(
    "--secret", help="NAME=VALUE, or NAME to read $FLOW_SECRET_NAME (repeatable). "
    "Never printed.")]
RuntimeOpt = Annotated[str, typer.Option(
    "--runtime", envvar="FLOW_RUNTIME", help="Agent runtime: process, docker or mock.")]
ImagesOpt = Annotated[list[str] | None, typer.Option(
    "--image", help="IMAGE=COMMAND: run agents of IMAGE as this local command "
    "(process runtime; repeatable).")]
IdArg = Annotated[str, typer.Argument(help="Execution id.", show_default=False)]


def _version(value: bool) -> None:
    if value:
        from agentainer_flow import __version__

        typer.echo(f"flow (agentainer-flow) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="Engine logs on stderr (-vv: debug).")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
) -> None:
    """Run, watch, replay and operate durable agentainer-flow workflows.

    The store defaults to $FLOW_STORE, else sqlite:///.flow/flow.db. Exit codes: 0 ok,
    1 the workflow failed (or replay diverged), 2 usage error or not found.
    """
    # a worker's log is its record of what happened; elsewhere progress lines say it all
    _configure_logging(verbose, logging.WARNING if ctx.invoked_subcommand == "worker"
                       else logging.ERROR)


@app.command()
def run(
    target: Annotated[str, typer.Argument(metavar="FILE[:WORKFLOW]", show_default=False,
                                          help="Python file, and the @workflow class to run "
                                          "if it has several.")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="JSON (or YAML) file for the constructor: the single "
        "argument if __init__ takes one, else keyword arguments.")] = None,
    input_: Annotated[str | None, typer.Option(
        "--input", "-i", help="Execution input: JSON text, or @file.json.")] = None,
    secret: SecretsOpt = None,
    tag: Annotated[list[str] | None, typer.Option(
        "--tag", "-t", help="k=v tag (repeatable).")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Run it here to the end, or only record it for "
        "`flow worker` / `flow resume`.")] = True,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    idempotency_key: Annotated[str | None, typer.Option(
        "--idempotency-key", help="Starting twice with one key gives one execution.")] = None,
    queue: Annotated[str | None, typer.Option(
        "--queue", help="Record it for the workers of this queue (`flow worker --queue`) "
        "instead of running it here; with --wait, follow it to the end.")] = None,
    priority: Annotated[int, typer.Option(
        "--priority", help="With --queue: higher runs first.")] = 0,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Start an execution of a workflow defined in FILE."""

    async def body() -> int:
        secrets = _parse_secrets(secret)
        tags = _pairs(tag, "--tag")
        images = _parse_images(image)
        value = _parse_input(input_)
        file, cls_name = split_target(target)
        module = import_file(file)
        cls = pick_workflow(module, cls_name)
        data = _read_data(config, "config file") if config is not None else None
        workflow = instantiate(cls, data, has_config=config is not None)
        tags.setdefault(SOURCE_TAG, str(module_file(module)))
        async with _client(store, runtime, images) as client:
            if queue is not None:
                queued = await client.run_workflow(
                    workflow, ExecutionMode.ASYNC, input=value, secrets=secrets, tags=tags,
                    idempotency_key=idempotency_key, queue=queue, priority=priority)
                if not wait:
                    if as_json:
                        _out.json({"execution_id": queued.id, "queue": queue,
                                   "status": (await queued.status()).value})
                    else:
                        _out.out(queued.id)
                    return 0
                if not quiet:
                    _out.info(f"execution {queued.id} queued on {queue!r}; following it")
                return await _follow(client, queued.id, after_seq=0, as_json=as_json,
                                     quiet=quiet)
            if not wait:
                record, _ = await client.engine.start(
                    workflow, input=value, tags=tags, secrets=secrets,
                    idempotency_key=idempotency_key, run_here=False)
                if as_json:
                    _out.json({"execution_id": record.id, "workflow": record.workflow_name,
                               "status": record.status.value})
                else:
                    _out.out(record.id)
                    _no_wait_hint(record, secrets)
                return 0
            execution = await client.run_workflow(
                workflow, ExecutionMode.ASYNC, input=value, secrets=secrets, tags=tags,
                idempotency_key=idempotency_key)
            if not quiet:
                _out.info(f"execution {execution.id} ({getattr(cls, SPEC_ATTR).name}) started")
            return await _follow(client, execution.id, after_seq=0, as_json=as_json,
                                 quiet=quiet)

    _go(body)


def _no_wait_hint(record: ExecutionRecord, secrets: Mapping[str, str]) -> None:
    _out.info(f"execution {record.id} recorded ({record.status.value}); nothing runs it yet: "
              f"start `flow worker` on this store, or `flow resume {record.id}`")
    if secrets and not os.environ.get("FLOW_SECRETS_KEY"):
        names = ", ".join(f"FLOW_SECRET_{n.upper()}" for n in sorted(secrets))
        _out.info(f"secrets are not stored (FLOW_SECRETS_KEY is not set): the process that "
                  f"runs it needs {names} in its environment")


@app.command()
def resume(
    execution_id: IdArg,
    module: ModulesOpt = None,
    secret: SecretsOpt = None,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Take it over now even if a live process holds its lease (that "
        "process is fenced out: it stops before its next step).")] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run an unfinished execution to its end in this process, from its history."""

    async def body() -> int:
        secrets = _parse_secrets(secret)
        images = _parse_images(image)
        import_modules(module)
        async with _client(store, runtime, images) as client:
            record = await client.describe(execution_id)
            ensure_registered(record)
            holder = _holder(record)
            if not quiet and holder is not None and not holder[1] and not force:
                _out.info(f"execution {record.id} is running in {holder[0]}: following it "
                          "to its end (it is taken over here if that process dies; --force "
                          "takes it over now)")
            elif not quiet and not record.status.is_terminal:
                _out.info(f"resuming execution {record.id} ({record.workflow_name}) from "
                          f"{record.last_seq} events")
            await client.resume(record.id, secrets=secrets, wait=False, takeover=force)
            return await _follow(client, record.id, after_seq=record.last_seq,
                                 as_json=as_json, quiet=quiet)

    _go(body)


@app.command()
def status(execution_id: IdArg, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False
           ) -> None:
    """Show an execution: status, workflow, times, error, result."""

    async def body() -> int:
        async with _client(store) as client:
            r = await client.describe(execution_id)
            result: Any = None
            if r.status is ExecutionStatus.COMPLETED:
                result = (await client.engine.wait_outcome(r.id)).result
            if as_json:
                _out.json({**_record_dict(r), "result": result})
                return 0
            color = {"completed": "green", "failed": "red", "cancelled": "yellow"}
            rows = [
                ("execution", r.id),
                ("workflow", f"{r.workflow_name} (version {r.workflow_version})"),
                ("status", _status_text(r) + (" (cancel requested)" if r.cancel_requested
                                              and not r.status.is_terminal else "")),
                ("created", _ts(r.created_at)),
                ("updated", _ts(r.updated_at)),
                ("finished", _ts(r.finished_at)),
                ("duration", _dur(r.duration)),
                ("events", str(r.last_seq)),
            ]
            if r.parent_id:
                rows.append(("parent", r.parent_id))
            if r.tags:
                rows.append(("tags", ", ".join(f"{k}={v}" for k, v in sorted(r.tags.items()))))
            if _holder(r) is not None:
                rows.append(("held by", _holder_text(r)))
                rows.append(("renewed", _ts(r.lease_renewed_at)))
            for key, value in rows:
                if key == "status":
                    _out.out(f"{key:<10} " + typer.style(_out.clean(value),
                                                         fg=color.get(r.status.value)))
                else:
                    _out.out(f"{key:<10} {value}")
            if r.error:
                _out.out(f"{'error':<10} {r.error}")
            if r.status is ExecutionStatus.COMPLETED:
                _out.out(f"{'result':<10} "
                         + json.dumps(_jsonable(result), ensure_ascii=False))
            return 0

    _go(body)


@app.command("list")
def list_(
    workflow: Annotated[str | None, typer.Option("--workflow", "-w",
                                                 help="Only this workflow.")] = None,
    status_: Annotated[list[ExecutionStatus] | None, typer.Option(
        "--status", "-s", help="Only these statuses (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t",
                                                  help="Only with tag k=v (repeatable).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """List executions, newest first."""

    async def body() -> int:
        async with _client(store) as client:
            rows = await client.list_executions(
                workflow_name=workflow, statuses=status_ or None,
                tags=_pairs(tag, "--tag") or None, limit=limit)
        if as_json:
            _out.json([_record_dict(r) for r in rows])
            return 0
        if not rows:
            _out.info("no executions")
            return 0
        _out.table(["id", "workflow", "status", "created", "duration", "holder"],
                   [(r.id, r.workflow_name, _status_text(r), _ts(r.created_at),
                     _dur(r.duration), _holder_text(r)) for r in rows])
        return 0

    _go(body)


@app.command()
def logs(
    execution_id: IdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f",
                                         help="Keep printing until it ends.")] = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Print an execution's log: ctx.log messages and step milestones."""

    async def body() -> int:
        async with _client(store) as client:
            if follow:
                async for line in client.stream_logs(execution_id):
                    _out.out(line)
            else:
                for line in await client.get_logs(execution_id):
                    _out.out(line)
        return 0

    _go(body)


def _where(ev: ExecutionEvent) -> str:
    if ev.step is None:
        return ""
    out = f"{ev.step}[{ev.instance or 0}]"
    return out + (f"#{ev.attempt}" if ev.attempt and ev.attempt > 1 else "")


def _timeline(events: Sequence[ExecutionEvent]) -> None:
    _out.table(["seq", "time", "type", "step", "message"],
               [(str(e.seq), _ts(e.timestamp.timestamp(), ms=True), e.type, _where(e),
                 e.message) for e in events], wrap=("message",))


@app.command()
def history(execution_id: IdArg, store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False
            ) -> None:
    """Print an execution's event history as a timeline."""

    async def body() -> int:
        async with _client(store) as client:
            try:
                events = await client.get_history(execution_id)
            except HistoryCorruptedError as exc:
                # show what can be read, the damage marked, and fail with the error
                _damaged_timeline(execution_id, await client.store.audit(execution_id),
                                  as_json=as_json)
                _out.error(str(exc))
                return 1
        if as_json:
            _out.json([e.to_dict() for e in events])
        else:
            _timeline(events)
        return 0

    _go(body)


def _damaged_timeline(execution_id: str, audit: Sequence[AuditedEvent], *, as_json: bool
                      ) -> None:
    """A damaged history as ``flow history`` shows it: every readable event, and the
    damage marked where it is (a changed or unreadable event, a gap, a missing tail)."""
    rows: list[dict[str, Any]] = []
    cells: list[tuple[str, ...]] = []
    for entry in audit:
        mark = f"DAMAGED: {entry.problem}" if entry.problem else ""
        if entry.event is not None:
            ev = ExecutionEvent.from_stored(StoredEvent(execution_id, entry.seq, entry.event))
            rows.append({**ev.to_dict(), "problem": entry.problem})
            cells.append((str(ev.seq), _ts(ev.timestamp.timestamp(), ms=True), ev.type,
                          _where(ev), ev.message, mark))
            continue
        what = "(unreadable)" if entry.type else "(missing)"
        known = EVENT_TYPES.get(entry.type)
        kind = event_type(known) if known is not None else entry.type
        rows.append({"execution_id": execution_id, "seq": entry.seq, "type": kind or None,
                     "timestamp": None, "step": None, "instance": None, "attempt": None,
                     "message": what, "details": {}, "problem": entry.problem})
        cells.append((str(entry.seq), "", kind, "", what, mark))
    if as_json:
        _out.json(rows)
    else:
        _out.table(["seq", "time", "type", "step", "message", "damage"], cells,
                   wrap=("message", "damage"))


@app.command()
def replay(
    execution_id: IdArg,
    module: ModulesOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check the stored history against the current code, with no side effects."""

    async def body() -> int:
        import_modules(module)
        async with _client(store) as client:
            record = await client.describe(execution_id)
            stored = await client.store.load(record.id)
        spec = ensure_registered(record)
        started = stored[0].event
        assert isinstance(started, ExecutionStarted)
        if spec.version != started.workflow_version:
            _out.info(f"note: the execution ran version {started.workflow_version!r} of "
                      f"{spec.name!r}; the code has version {spec.version!r}", fg="yellow")
        workflow = rebuild_workflow(spec, started)
        report = await replay_history(spec, workflow, record, stored, context_factory=Context)
        if as_json:
            _out.json({"execution_id": record.id, "workflow": record.workflow_name,
                       "ok": report.ok, "attempts_checked": report.attempts_checked,
                       "in_flight": report.in_flight,
                       "error": None if report.error is None else str(report.error)})
        else:
            if not quiet:
                _timeline([ExecutionEvent.from_stored(s) for s in stored])
                _out.out()
            if report.ok:
                flight = (f" ({len(report.in_flight)} in flight: "
                          f"{', '.join(report.in_flight)})" if report.in_flight else "")
                _out.out(f"OK: {report.attempts_checked} step attempts match the history"
                         + flight)
            else:
                _out.info(f"DIVERGED: {report.error}", fg="red")
        return 0 if report.ok else 1

    _go(body)


@app.command()
def workers(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Workers that reported themselves: id, host, queues, executions held, last heartbeat
    (one silent for 15 s is shown as lost)."""

    async def body() -> int:
        async with _client(store) as client:
            found = await client.store.list_workers()
        now = time.time()
        rows: list[dict[str, Any]] = [{"name": w.name, "id": w.id, "host": w.host, "pid": w.pid,
                                       "queues": list(w.queues) or ["*"], "held": w.held,
                                       "concurrency": w.concurrency,
                                       "started_at": w.started_at,
                                       "heartbeat_at": w.heartbeat_at,
                                       "alive": now - w.heartbeat_at < 3 * HEARTBEAT_INTERVAL}
                                      for w in found]
        if as_json:
            _out.json(rows)
            return 0
        _out.table(["worker", "host", "queues", "held", "heartbeat", "state"],
                   [(r["name"], f"{r['host']}:{r['pid']}", ",".join(r["queues"]),
                     f"{r['held']}/{r['concurrency']}", f"{now - r['heartbeat_at']:.1f}s ago",
                     "alive" if r["alive"] else "lost") for r in rows])
        return 0

    _go(body)


queue_app = typer.Typer(help="Queues: their limits and load.", no_args_is_help=True)
app.add_typer(queue_app, name="queue")


@queue_app.command("set")
def queue_set(
    name: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", min=1, help="Executions running at once, across every worker.")
    ] = None,
    rate_limit: Annotated[str | None, typer.Option(
        "--rate-limit", help="Starts per period, e.g. 10/m, 5/s, 3/30s.")] = None,
    key_tag: Annotated[str | None, typer.Option(
        "--concurrency-key", help="A tag name: limit executions per value of this tag.")
    ] = None,
    key_concurrency: Annotated[int | None, typer.Option(
        "--key-concurrency", min=1, help="With --concurrency-key: at most this many per "
        "value (default 1).")] = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Create a queue or replace its limits (an option left out is no limit)."""

    async def body() -> int:
        q = Queue(name, concurrency=concurrency, rate_limit=rate_limit,
                  concurrency_key=key_tag, key_concurrency=key_concurrency)
        async with _client(store) as client:
            await client.store.set_queue(q.config())
        _out.out(f"queue {name}: {_limits(q.config())}")
        return 0

    _go(body)


@queue_app.command("list")
def queue_list(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False) -> None:
    """Every queue with limits or unfinished executions: its depth, running and limits."""

    async def body() -> int:
        async with _client(store) as client:
            stats = await client.store.list_queues()
        if as_json:
            _out.json([{"name": q.config.name, "pending": q.pending, "running": q.running,
                        "sleeping": q.sleeping, "concurrency": q.config.concurrency,
                        "rate_count": q.config.rate_count,
                        "rate_seconds": q.config.rate_seconds,
                        "concurrency_key": q.config.key_tag,
                        "key_concurrency": q.config.key_concurrency} for q in stats])
            return 0
        _out.table(["queue", "pending", "running", "sleeping", "limits"],
                   [(q.config.name, str(q.pending), str(q.running), str(q.sleeping),
                     _limits(q.config)) for q in stats])
        return 0

    _go(body)


def _limits(config: QueueConfig) -> str:
    parts = []
    if config.concurrency is not None:
        parts.append(f"concurrency {config.concurrency}")
    if config.rate_count is not None:
        parts.append(f"rate {config.rate_count}/{config.rate_seconds:g}s")
    if config.key_tag is not None:
        parts.append(f"{config.key_concurrency or 1} per {config.key_tag}")
    return ", ".join(parts) or "no limits"


@app.command()
def gc(
    runtime: Annotated[str, typer.Option(
        "--runtime", envvar="FLOW_RUNTIME",
        help="Where to look: process, docker, or all (docker only if an engine answers).")
    ] = "all",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be removed; remove nothing.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Remove agents that crashes left behind: containers and agent directories of ended
    executions, or whose outcome is recorded. Never touches running commands' agents or
    another store's."""

    async def body() -> int:
        names = ["process", "docker"] if runtime == "all" else [runtime]
        rows: list[dict[str, Any]] = []
        for name in names:
            try:
                async with _client(store, name) as client:
                    reaped = await client.gc(dry_run=dry_run)
            except ConfigurationError as exc:
                if runtime == "all" and name == "docker":
                    _out.info(f"docker: skipped ({exc})")
                    continue
                raise
            rows += [{"runtime": name, "agent_id": r.agent_id,
                      "execution_id": r.execution_id, "reason": r.reason,
                      "was_running": r.was_running} for r in reaped]
        if as_json:
            _out.json({"dry_run": dry_run, "removed": rows})
            return 0
        verb = "would remove" if dry_run else "removed"
        if rows:
            _out.table(["runtime", "agent", "execution", "why"],
                       [(r["runtime"], r["agent_id"], r["execution_id"],
                         r["reason"] + (" (was running)" if r["was_running"] else ""))
                        for r in rows])
        _out.out(f"{verb} {len(rows)} agent{'s' if len(rows) != 1 else ''}")
        return 0

    _go(body)


@app.command()
def cancel(
    execution_id: IdArg,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Ask an execution to stop (its agents are stopped, always_run steps still run)."""

    async def body() -> int:
        async with _client(store) as client:
            ok = await client.cancel(execution_id)
            record = await client.describe(execution_id)
        if as_json:
            _out.json({"execution_id": record.id, "cancel_requested": ok,
                       "status": record.status.value})
        elif ok:
            _out.out(f"cancel requested for {record.id} ({record.status.value}); it stops at "
                     "its next step event where it runs (a pending execution is cancelled "
                     "when a worker or `flow resume` picks it up)")
        else:
            _out.out(f"execution {record.id} already {record.status.value}; nothing to cancel")
        return 0

    _go(body)


@app.command()
def metrics(
    workflow: Annotated[str | None, typer.Option("--workflow", "-w",
                                                 help="One workflow (default: all).")] = None,
    range_: Annotated[str, typer.Option("--range", "-r",
                                        help="Time range: 1h, 24h, 7d...")] = "24h",
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
) -> None:
    """Totals, success rate and average duration per workflow over a time range."""

    async def body() -> int:
        from agentainer_flow.engine.durations import parse_duration

        try:
            seconds = parse_duration(range_, what="--range") or 0.0
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        async with _client(store) as client:
            if workflow is not None:
                names = [workflow]
            else:
                rows = await client.list_executions(created_after=time.time() - seconds,
                                                    limit=None)
                names = sorted({r.workflow_name for r in rows})
            found = [await client.get_workflow_metrics(n, range_) for n in names]
        if as_json:
            _out.json(found)
            return 0
        if not found:
            _out.info(f"no executions in the last {range_}")
            return 0
        _out.table(
            ["workflow", "total", "completed", "failed", "cancelled", "running", "success",
             "avg duration"],
            [(m.workflow_name, str(m.total_executions), str(m.completed), str(m.failed),
              str(m.cancelled), str(m.running), f"{m.success_rate:g}%", _dur(m.avg_duration))
             for m in found])
        return 0

    _go(body)


# the worker -----------------------------------------------------------------------------
@app.command()
def worker(
    module: ModulesOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1,
                                             help="Executions run at once.")] = 4,
    poll_interval: Annotated[float, typer.Option("--poll-interval", min=0.05,
                                                 help="Seconds between claims.")] = 1.0,
    once: Annotated[bool, typer.Option(
        "--once", help="Process what is claimable now, then exit.")] = False,
    worker_id: Annotated[str | None, typer.Option(
        "--worker-id", "--id", help="A name for this worker (its lease owner id is "
        "host:pid:start:boot:NAME). Default: random.")] = None,
    lease: Annotated[float | None, typer.Option(
        "--lease", min=0.5, envvar="FLOW_LEASE_SECONDS",
        help="Seconds a lease lasts without renewal (renewed every third of it); another "
        "worker takes over an execution whose lease expired.")] = None,
    queue: Annotated[list[str] | None, typer.Option(
        "--queue", help="Serve this queue (repeatable; 'default' is executions "
        "started without one). Default: every queue.")] = None,
    grace: Annotated[float, typer.Option(
        "--grace", min=0, help="On SIGTERM/SIGINT, seconds running executions may go on "
        "before they are handed back; a second signal hands them back at once.")] = 30.0,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Claim unfinished executions from the store and run them, until stopped."""

    async def body() -> int:
        images = _parse_images(image)
        import_modules(module)
        wid = make_owner_id(worker_id)
        async with _client(store, runtime, images, owner_id=wid,
                           lease_seconds=lease) as client:
            w = Worker(client, queues=queue or None, concurrency=concurrency,
                       poll_interval=poll_interval, once=once, grace=grace,
                       name=worker_id or wid, report=_out.out, report_error=_out.error)
            loop = asyncio.get_running_loop()

            def on_signal(sig: int) -> None:
                if w.running:
                    _out.info(f"{signal.Signals(sig).name}: stopping; running executions "
                              "get the grace period, then resume on the next worker"
                              if not w.stopping else "handing everything back now")
                w.stop()

            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                await w.run()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)
        return 0

    _go(body)


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``flow`` script."""
    global _out
    _out = _Output()
    return app(args=list(argv) if argv is not None else None, prog_name="flow")


if __name__ == "__main__":
    main()
