"""``flow server`` and ``flow token create/list/revoke``: the HTTP API and its tokens.

``register(app)`` adds them to the ``flow`` program. Tokens are managed on the store
directly (whoever can open the store is its administrator); the server only reads them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from agentainer_flow.store import FlowError, create_store

from .._cli._common import (
    DEFAULT_STORE,
    ImagesOpt,
    JsonOpt,
    ModulesOpt,
    RuntimeOpt,
    StoreOpt,
    exit_code,
    go,
    parse_images,
)
from .._cli._output import configure_logging, out, ts

__all__ = ["register", "server", "token_create", "token_list", "token_revoke"]

DEFAULT_PORT = 8081


def server(
    module: ModulesOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: "
                                      "every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535,
                                      help="Port to listen on.")] = DEFAULT_PORT,
    workers: Annotated[int, typer.Option(
        "--workers", min=0, help="Run executions in this process, this many at once (0: "
        "they run on flow worker processes).")] = 0,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Serve the HTTP API (/v1, OpenAPI at /openapi.json) over the store.

    Executions started through it run on workers that have the workflow code: flow worker
    processes on the same store, or --workers N here. The server needs the code too (-m),
    to refuse what it cannot start. Every route but /health needs a token (flow token
    create). Set FLOW_SECRETS_KEY (on the server and the workers) so that the secrets of
    an execution reach the worker that runs it, encrypted at rest.
    """
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        out.error(f"flow server needs the server extra ({exc.name} is missing): "
                  "pip install 'agentainer-flow[server]'")
        raise typer.Exit(2) from None
    configure_logging(1, logging.INFO)  # the access log is the server's record
    try:
        app = create_app(store, workflows_module=[str(m) for m in module or ()],
                         workers=workers, runtime=runtime, images=parse_images(image))
    except FlowError as exc:
        out.error(str(exc))
        raise typer.Exit(exit_code(exc)) from None
    # uvicorn's access log prints query strings: ours (structlog) never does
    uvicorn.run(app, host=host, port=port, access_log=False, server_header=False,
                timeout_graceful_shutdown=5, log_level="info")


def token_create(
    name: Annotated[str, typer.Option("--name", help="What the token is for (unique among "
                                      "live tokens).", show_default=False)],
    scope: Annotated[str, typer.Option(
        "--scope", help="read (read only), write (also start, cancel, resume, retry) or "
        "admin (also manage tokens).")] = "read",
    as_json: JsonOpt = False,
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Make an API token and print it, once: only its SHA-256 is stored."""
    from .auth import create_token

    async def body() -> int:
        async with create_store(store) as opened:
            token, record = await create_token(opened, name, scope)
        if as_json:
            out.json({"id": record.id, "name": record.name, "scope": record.scope,
                      "prefix": record.prefix, "token": token})
        else:
            typer.echo(token)  # stdout: TOKEN=$(flow token create --name ci)
            out.info(f"token {record.id} ({record.name}, scope {record.scope}) created; it "
                     "is shown this once: keep it in a secret store")
        return 0

    go(body)


def token_list(as_json: JsonOpt = False, store: StoreOpt = DEFAULT_STORE) -> None:
    """List the API tokens (never the tokens themselves), newest first."""

    async def body() -> int:
        async with create_store(store) as opened:
            tokens = await opened.list_tokens()
        if as_json:
            out.json([{"id": t.id, "name": t.name, "scope": t.scope, "prefix": t.prefix,
                       "created_at": t.created_at, "last_used_at": t.last_used_at,
                       "revoked_at": t.revoked_at} for t in tokens])
            return 0
        out.table(["id", "name", "scope", "token", "created", "last used", "revoked"],
                  [[t.id, t.name, t.scope, t.prefix + "...", ts(t.created_at),
                    ts(t.last_used_at), ts(t.revoked_at)] for t in tokens])
        return 0

    go(body)


def token_revoke(
    id_or_name: Annotated[str, typer.Argument(help="The token's id (tok_...) or name.",
                                              show_default=False)],
    store: StoreOpt = DEFAULT_STORE,
) -> None:
    """Revoke an API token: the server refuses it from its next request."""
    from .auth import find_token

    async def body() -> int:
        async with create_store(store) as opened:
            record = await find_token(opened, id_or_name)
            await opened.revoke_token(record.id)
        out.info(f"token {record.id} ({record.name}) revoked")
        return 0

    go(body)


def register(app: typer.Typer) -> None:
    """Add ``flow server`` and ``flow token create/list/revoke`` to the ``flow`` app."""
    app.command("server")(server)
    tokens = typer.Typer(help="API tokens of flow server.", no_args_is_help=True)
    tokens.command("create")(token_create)
    tokens.command("list")(token_list)
    tokens.command("revoke")(token_revoke)
    app.add_typer(tokens, name="token")
