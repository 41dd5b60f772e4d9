"""What every ``flow`` command shares: option declarations, the client, running a command's
coroutine with its exit code, and parsing of ``KEY=VALUE`` style arguments.

Exit codes: 0 ok, 1 the workflow failed (or replay diverged, or a history is damaged),
2 usage error or not found, 3 the execution is blocked on a missing secret, 130 interrupted.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeAlias

import typer

from agentainer_flow.engine.errors import (
    ConfigurationError,
    ExecutionBlockedError,
    SecretNotFoundError,
    WorkflowDefinitionError,
    WorkflowNotRegisteredError,
)
from agentainer_flow.engine.leases import holder_is_dead
from agentainer_flow.store import (
    ExecutionNotFoundError,
    ExecutionRecord,
    FlowError,
    StoreUnavailableError,
    create_store,
)

from .._client import DEFAULT_STORE, WorkflowClient
from .._loading import UsageError, instantiate
from .._remote import API_TOKEN_ENV, API_URL_ENV, RemoteError, RemoteWorkflowClient
from ._output import configure_logging, iso, out, ts

__all__ = [
    "DEFAULT_STORE",
    "EXIT_BLOCKED",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "AnyClient",
    "ApiTokenOpt",
    "ApiUrlOpt",
    "IdArg",
    "ImagesOpt",
    "JsonOpt",
    "ModulesOpt",
    "QuietOpt",
    "RuntimeOpt",
    "SecretsOpt",
    "StoreOpt",
    "VerboseOpt",
    "build_workflow",
    "connect",
    "exit_code",
    "fork_links",
    "go",
    "holder",
    "holder_text",
    "make_client",
    "pairs",
    "parse_images",
    "parse_input",
    "parse_secrets",
    "quiet_level",
    "quiet_stdout",
    "read_data",
    "record_dict",
    "refuse_local_options",
    "resolve_id",
    "server_of",
    "status_text",
    "store_only",
]

EXIT_OK = 0
EXIT_FAILED = 1  # the workflow failed or was cancelled; replay diverged; history damaged
EXIT_USAGE = 2  # a bad argument, an unknown id, an unreachable store, code not found
EXIT_BLOCKED = 3  # the execution waits for a secret
EXIT_INTERRUPTED = 130

# errors that mean "you asked for something that is not there / not possible": exit 2
_USAGE_ERRORS: tuple[type[FlowError], ...] = (
    ExecutionNotFoundError, StoreUnavailableError, ConfigurationError, SecretNotFoundError,
    WorkflowNotRegisteredError, WorkflowDefinitionError, UsageError,
)

# options every command declares the same way ----------------------------------------------
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
ApiUrlOpt = Annotated[str | None, typer.Option(
    "--api-url", envvar=API_URL_ENV, show_envvar=True, show_default=False,
    help="Work through this flow server (http://host:8081) instead of a store; "
    "not with --store.")]
ApiTokenOpt = Annotated[str | None, typer.Option(
    "--api-token", envvar=API_TOKEN_ENV, show_envvar=True, show_default=False,
    help="The server's API token (flow token create); never printed.")]
# the same, on the commands that refuse them (not listed in their help)
_RefusedUrlOpt = Annotated[str | None, typer.Option(
    "--api-url", envvar=API_URL_ENV, hidden=True, show_default=False)]
_RefusedTokenOpt = Annotated[str | None, typer.Option(
    "--api-token", envvar=API_TOKEN_ENV, hidden=True, show_default=False)]
IdArg = Annotated[str, typer.Argument(help="Execution id, or a unique prefix of it.",
                                      show_default=False)]


def quiet_level(command: str | None) -> int:
    """The log level shown without ``-v``: warnings for a worker (its log is its record of
    what happened), else errors only (progress lines say the rest)."""
    return logging.WARNING if command == "worker" else logging.ERROR


def _more_verbose(ctx: typer.Context, value: int) -> int:
    """``-v`` after the command's name (``flow list -v``) adds to any given before it."""
    if value:
        root = ctx.find_root()
        before = int(root.params.get("verbose") or 0)
        configure_logging(before + value, quiet_level(ctx.info_name))
    return value


VerboseOpt = Annotated[int, typer.Option(
    "--verbose", "-v", count=True, callback=_more_verbose,
    help="Engine logs on stderr (-vv: debug); also before the command.")]


# the client -----------------------------------------------------------------------------
#: the store the command opened, as errors name it (passwords masked)
_opened: list[str] = []


def make_client(store: str, runtime: str = "mock",
                images: Mapping[str, Sequence[str]] | None = None, *,
                read_only: bool = False, **engine_options: Any) -> WorkflowClient:
    """A client; read-only commands use the mock runtime, which touches nothing.

    ``read_only`` opens the store without creating it: a mistyped ``sqlite:///`` path (or
    a database without a flow store) is an error naming it, not an empty store. Every
    command about executions that must exist already (read them, resume, cancel, retry,
    gc) opens it so; only ``run``, ``worker`` and ``queue set`` may create a store.
    """
    url = store or DEFAULT_STORE
    client = WorkflowClient(create_store(url, create=False) if read_only else url, runtime,
                            images=images or None, **engine_options)
    _opened[:] = [client.store.url]
    return client


#: what a command works through: the store (the engine embedded here) or a flow server
AnyClient: TypeAlias = WorkflowClient | RemoteWorkflowClient


def _on_command_line(ctx: typer.Context | None, name: str, value: object) -> bool:
    """Whether option ``name`` was given on the command line (not by its environment
    variable, nor its default)."""
    if ctx is None:  # called as a function: what it was given
        return value is not None
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def server_of(ctx: typer.Context | None, store: str | None, api_url: str | None,
              api_token: str | None) -> tuple[str, str | None] | None:
    """The server (URL, token) a command works through, or ``None``: the store.

    ``--api-url`` and ``--store`` on one command line are a usage error. Otherwise what is
    on the command line wins over the environment, and ``$AGENTAINER_API_URL`` over
    ``$FLOW_STORE`` (as ``WorkflowClient()`` picks the server when the URL is set).
    """
    url = (api_url or "").strip()
    if not url:
        if api_token and _on_command_line(ctx, "api_token", api_token):
            raise UsageError(f"--api-token needs --api-url (or ${API_URL_ENV}): the URL of "
                             "the flow server it is for")
        return None
    if _on_command_line(ctx, "store", store):
        if _on_command_line(ctx, "api_url", api_url):
            raise UsageError("--store and --api-url both say where the executions are: give "
                             "one (--store: open the store here; --api-url: work through a "
                             "flow server)")
        return None  # --store on the command line wins over $AGENTAINER_API_URL
    return url, (api_token or "").strip() or None


def connect(ctx: typer.Context | None, store: str, api_url: str | None,
            api_token: str | None, *, runtime: str = "mock",
            images: Mapping[str, Sequence[str]] | None = None,
            read_only: bool = True) -> AnyClient:
    """The client a command works through: a flow server's (``--api-url``, see
    ``server_of``), else the store's (``make_client``). ``ctx`` tells which options were
    given on the command line."""
    server = server_of(ctx, store, api_url, api_token)
    if server is None:
        return make_client(store, runtime, images, read_only=read_only)
    url, token = server
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--api-url must be an http:// or https:// URL (as "
                         f"http://host:8081), got {url!r}")
    if not token:
        raise UsageError(f"no API token for {url}: pass --api-token TOKEN or set "
                         f"${API_TOKEN_ENV} (flow token create --name NAME --scope "
                         "read|write, on the server's store, makes one)")
    out.add_secrets({"api_token": token})  # whatever is printed, the token is not
    client = RemoteWorkflowClient(url, token)
    _opened[:] = [client.api_url]
    return client


def store_only(command: Callable[..., None], name: str, why: str) -> Callable[..., None]:
    """``command`` with ``--api-url``/``--api-token`` options that refuse a server with a
    clear usage error (exit 2): it works on a store only, for the reason ``why``.

    The command itself is left as it is (its own options are its module's); the options
    are added to the signature typer reads.
    """
    signature = inspect.signature(command, eval_str=True)

    @functools.wraps(command)
    def refusing(*args: Any, flow_cli_context: typer.Context, api_url: str | None = None,
                 api_token: str | None = None, **kwargs: Any) -> None:
        ctx = flow_cli_context
        # refused when asked for, or when only $AGENTAINER_API_URL says where to work
        store_named = _on_command_line(ctx, "store", kwargs.get("store")) or bool(
            os.environ.get("FLOW_STORE"))
        if api_url and (_on_command_line(ctx, "api_url", api_url) or not store_named):
            out.error(f"flow {name} works on a store, not through a flow server ({why}): "
                      "run it where the store can be opened, with --store URL (the "
                      "server's store)")
            raise typer.Exit(EXIT_USAGE)
        command(*args, **kwargs)

    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = [inspect.Parameter("flow_cli_context", keyword, annotation=typer.Context),
             inspect.Parameter("api_url", keyword, default=None, annotation=_RefusedUrlOpt),
             inspect.Parameter("api_token", keyword, default=None,
                               annotation=_RefusedTokenOpt)]
    params = [p.replace(kind=keyword) if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
              else p for p in signature.parameters.values()]
    refusing.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[*params, *extra])
    refusing.__annotations__ = {**command.__annotations__, "flow_cli_context": typer.Context,
                                "api_url": _RefusedUrlOpt, "api_token": _RefusedTokenOpt}
    return refusing


#: what a flag is for in this process: refused through a server, whose workers run things
_LOCAL_ONLY = {"module": ("-m/--module", "load workflow code"),
               "runtime": ("--runtime", "run agents"), "image": ("--image", "run agents")}


def refuse_local_options(ctx: typer.Context | None, **given: object) -> None:
    """Refuse, through a server, the options given on the command line that only a run in
    this process uses (``-m``, ``--runtime``, ``--image``): the server's workers have the
    code and run the agents."""
    for name, value in given.items():
        if value and _on_command_line(ctx, name, value):
            flag, what = _LOCAL_ONLY[name]
            raise UsageError(f"{flag} is for a run in this process; through a flow server "
                             f"(--api-url) its workers {what}: drop {flag.split('/')[-1]}")


async def resolve_id(client: AnyClient, given: str) -> str:
    """The full id of the execution ``given`` names: its id or a unique prefix of it."""
    if isinstance(client, RemoteWorkflowClient):
        return await client.resolve_execution_id(given)
    await client.open()
    return await client.store.resolve_execution_id(given)


async def fork_links(client: AnyClient, execution_id: str
                     ) -> tuple[dict[str, str] | None, list[ExecutionRecord]]:
    """Where the execution was forked from (``{"execution_id", "step"}``) and the
    executions forked from it (``flow retry --from-step``), newest first."""
    origin_of = getattr(client, "forked_from", None)
    forks_of = getattr(client, "forks_of", None)
    origin = await origin_of(execution_id) if origin_of is not None else None
    forks: list[ExecutionRecord] = (list(await forks_of(execution_id))
                                    if forks_of is not None else [])
    shown = None if origin is None else {"execution_id": str(origin.execution_id),
                                         "step": str(origin.step)}
    return shown, forks


# running a command ----------------------------------------------------------------------
def exit_code(exc: FlowError) -> int:
    """The exit code a command that raised ``exc`` ends with."""
    if isinstance(exc, ExecutionBlockedError):
        return EXIT_BLOCKED
    if isinstance(exc, RemoteError):  # refused (a token, a scope, a request) or unreachable
        return EXIT_FAILED if exc.status is not None and exc.status >= 500 else EXIT_USAGE
    return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_FAILED


def go(make: Callable[[], Awaitable[int]]) -> NoReturn:
    """Run a command's coroutine; FlowErrors become one line on stderr and an exit code."""

    async def runner() -> int:
        return await make()

    _opened.clear()
    try:
        code = asyncio.run(runner())
    except BrokenPipeError:
        quiet_stdout()  # the reader (``| head``) has what it wanted
        code = EXIT_OK
    except FlowError as exc:
        out.error(_naming_the_store(exc))
        code = exit_code(exc)
    except KeyboardInterrupt:
        if out.watching:  # ``--watch`` ends with Ctrl-C: nothing went wrong
            code = EXIT_OK
        else:
            hint = (f"; execution {out.running} stays resumable: flow resume {out.running}"
                    if out.running else "")
            out.info("interrupted" + hint)
            code = EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("FLOW_DEBUG"):
            raise
        out.error(f"internal error: {type(exc).__name__}: {exc} "
                  "(set FLOW_DEBUG=1 for the traceback)")
        code = EXIT_FAILED
    raise typer.Exit(code)


def _naming_the_store(exc: FlowError) -> str:
    """The error's text, naming the store an id was looked for in."""
    text = str(exc)
    if isinstance(exc, ExecutionNotFoundError) and _opened and _opened[0] not in text:
        text += f" ({_opened[0]})"
    return text


def quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of a closed pipe
    does not print a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


# records as shown -----------------------------------------------------------------------
def holder(r: ExecutionRecord) -> tuple[str, bool] | None:
    """Who holds a running execution, and whether that holder is gone (orphaned: its lease
    expired or its process died); ``None`` when nobody holds it."""
    if r.status.is_terminal or r.lease_owner is None:
        return None
    gone = not r.lease_live(time.time()) or holder_is_dead(r.lease_owner)
    return r.lease_owner, gone


def record_dict(r: ExecutionRecord) -> dict[str, Any]:
    """An execution's row as ``--json`` shows it."""
    held = holder(r)
    return {
        "lease_token": r.lease_token, "lease_renewed_at": iso(r.lease_renewed_at),
        "lease_expires_at": iso(r.lease_expires_at),
        "orphaned": held is not None and held[1],
        "id": r.id, "workflow": r.workflow_name, "version": r.workflow_version,
        "status": r.status.value, "created_at": iso(r.created_at),
        "updated_at": iso(r.updated_at), "finished_at": iso(r.finished_at),
        "duration": r.duration, "tags": r.tags, "error": r.error, "parent_id": r.parent_id,
        "idempotency_key": r.idempotency_key, "cancel_requested": r.cancel_requested,
        "cancel_reason": r.cancel_reason, "lease_owner": r.lease_owner, "events": r.last_seq,
    }


def status_text(r: ExecutionRecord) -> str:
    held = holder(r)
    if held is not None and held[1]:
        return f"{r.status.value} (orphaned)"
    return r.status.value


def holder_text(r: ExecutionRecord) -> str:
    held = holder(r)
    if held is None:
        return "-"
    owner, gone = held
    if gone:
        return f"{owner} (gone; lease expired {ts(r.lease_expires_at)}: resume takes it over)"
    return f"{owner} (lease until {ts(r.lease_expires_at)})"



# parsing arguments ----------------------------------------------------------------------
def pairs(items: Sequence[str] | None, what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a dict."""
    found: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must look like KEY=VALUE, got {item!r}")
        found[key] = value
    return found


def parse_secrets(items: Sequence[str] | None) -> dict[str, str]:
    """``NAME=VALUE``, or ``NAME`` alone for the value of ``$FLOW_SECRET_NAME``."""
    found: dict[str, str] = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not name:
            raise UsageError("--secret needs a NAME (as NAME=VALUE or NAME)")  # no value echoed
        if not sep:
            env = f"FLOW_SECRET_{name.upper()}"
            given = os.environ.get(env)
            if given is None:
                raise SecretNotFoundError(name, f"--secret {name} reads ${env}, which is not set")
            value = given
        found[name] = value
    out.add_secrets(found)
    return found


def parse_images(items: Sequence[str] | None) -> dict[str, list[str]]:
    """``IMAGE=COMMAND`` arguments, each command split as a shell would."""
    images: dict[str, list[str]] = {}
    for image, command in pairs(items, "--image").items():
        argv = shlex.split(command)
        if not argv:
            raise UsageError(f"--image {image}= needs a command")
        images[image] = argv
    return images


def read_data(path: Path, what: str) -> Any:
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


def build_workflow(cls: type, config: Any, *, has_config: bool) -> object:
    """The workflow instance ``--config`` describes.

    A JSON object whose keys all name parameters of ``__init__`` is passed by name, however
    many parameters there are (``{"greeting": "hi"}`` calls ``Greeter(greeting="hi")``);
    anything else follows ``instantiate``'s rule (the whole config is the one argument of
    a one-parameter ``__init__``, else an object's keys are keyword arguments).
    """
    params = {p.name for p in inspect.signature(cls).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not (isinstance(config, dict) and config and set(config) <= params):
        return instantiate(cls, config, has_config=has_config)
    try:
        inspect.signature(cls).bind(**config)
    except TypeError as exc:
        raise UsageError(f"cannot call {cls.__name__}() with the keys of --config: "
                         f"{exc}") from None
    try:
        return cls(**config)
    except FlowError:
        raise
    except Exception as exc:
        raise UsageError(f"{cls.__name__}(...) raised {type(exc).__name__}: {exc}") from None


def parse_input(text: str | None) -> Any:
    """``--input``: JSON text, or ``@path`` to a JSON (or YAML) file."""
    if text is None:
        return None
    if text.startswith("@"):
        return read_data(Path(text[1:]), "input file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--input is not valid JSON ({exc}); quote strings as '\"text\"' "
                         "or pass a file as @path.json") from None
