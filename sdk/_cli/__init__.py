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

One module per command group: ``executions`` (run, resume, retry, status, list, logs,
history, cancel, metrics), ``replay`` (the debugger and the pre-deploy ``--check``),
``worker`` (worker, workers, queue, gc). ``_common`` holds the shared options and the
client, ``_output`` the one output layer, ``_views`` the tables several commands print.
This module builds the app.

The read and operate commands (list, status, logs, history, cancel, resume, retry,
metrics, run) work through a ``flow server`` as well (``--api-url``/``--api-token``, or
``$AGENTAINER_API_URL``/``$AGENTAINER_API_TOKEN``), with the same output; replay, worker,
workers, gc and queue work on a store only, and say so when given a server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer

from .._loading import SOURCE_TAG
from .._server.cli import register as _register_server
from ._common import make_client, quiet_level, quiet_stdout, store_only
from ._output import Output, configure_logging, out
from .executions import cancel, history, list_, logs, metrics, resume, retry, run, status
from .replay import replay
from .worker import gc, queue_list, queue_set, worker, workers

__all__ = ["SOURCE_TAG", "app", "main"]

# the names the tests and older callers know
_client = make_client
_Output = Output
_out = out

app = typer.Typer(
    name="flow",
    help="Run, watch, replay and operate durable agentainer-flow workflows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # rich tracebacks show locals, which may hold secrets
)


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
    out.reset()  # each invocation starts knowing only FLOW_SECRET_* (tests invoke many)
    configure_logging(verbose, quiet_level(ctx.invoked_subcommand))


# why the commands that work on a store only cannot work through a flow server
_STORE_ONLY = {
    "replay": "it replays a stored history against the workflow code of this process",
    "worker": "a worker claims executions from the store and runs them here",
    "workers": "workers are listed from the store they claim from",
    "gc": "it removes the agents of this host's runtime, by the store's histories",
    "queue set": "queue limits are written to the store the workers claim from",
    "queue list": "queues are read from the store the workers claim from",
}


def _store_only(name: str, command: Any) -> Any:
    return store_only(command, name, _STORE_ONLY[name])


# in the order ``flow --help`` lists them
for _name, _fn in (("run", run), ("resume", resume), ("retry", retry), ("status", status),
                   ("list", list_), ("logs", logs), ("history", history),
                   ("replay", _store_only("replay", replay)), ("cancel", cancel),
                   ("metrics", metrics), ("worker", _store_only("worker", worker)),
                   ("workers", _store_only("workers", workers)),
                   ("gc", _store_only("gc", gc))):
    app.command(_name)(_fn)

queue_app = typer.Typer(help="Queues: their limits and load.", no_args_is_help=True)
queue_app.command("set")(_store_only("queue set", queue_set))
queue_app.command("list")(_store_only("queue list", queue_list))
app.add_typer(queue_app, name="queue")

_register_server(app)  # flow server, flow token


def main(argv: Sequence[str] | None = None) -> Any:
    """Entry point of the ``flow`` script."""
    out.reset()
    try:
        return app(args=list(argv) if argv is not None else None, prog_name="flow")
    except BrokenPipeError:  # e.g. ``flow --help | head -1``: the reader has enough
        quiet_stdout()
        raise SystemExit(0) from None
