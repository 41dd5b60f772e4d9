"""``flow worker``, ``workers``, ``queue set``/``queue list`` and ``gc``: the processes that
run executions, the queues that feed them, and what crashes left behind."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Annotated, Any

import typer

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.leases import make_owner_id
from agentainer_flow.store import QueueConfig, StoreNotFoundError

from .._loading import import_modules
from .._otel import tracing_from_env
from .._queues import Queue
from .._worker import HEARTBEAT_INTERVAL, Worker
from ._common import (
    DEFAULT_STORE,
    ImagesOpt,
    JsonOpt,
    ModulesOpt,
    RuntimeOpt,
    StoreOpt,
    VerboseOpt,
    go,
    make_client,
    parse_images,
)
from ._output import out

__all__ = ["gc", "queue_list", "queue_set", "worker", "workers"]


def worker(
    module: ModulesOpt = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, max=100_000,
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
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, help="Serve this worker's Prometheus metrics "
        "at http://HOST:PORT/metrics (no token: see --metrics-host; 0: a free port).",
        show_default=False)] = None,
    metrics_host: Annotated[str, typer.Option(
        "--metrics-host", help="Address of --metrics-port (0.0.0.0: every interface; "
        "only your Prometheus should reach it).")] = "127.0.0.1",
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    verbose: VerboseOpt = 0,
) -> None:
    """Claim unfinished executions from the store and run them, until stopped.

    With FLOW_OTEL=1 (or the standard OTEL_TRACES_EXPORTER / OTLP endpoint variables) it
    makes OpenTelemetry spans of its executions (pip install 'agentainer-flow[otel]').
    """

    async def body() -> int:
        images = parse_images(image)
        import_modules(module)
        wid = make_owner_id(worker_id)
        async with make_client(store, runtime, images, owner_id=wid, lease_seconds=lease,
                               observer=tracing_from_env()) as client:
            w = Worker(client, queues=queue or None, concurrency=concurrency,
                       poll_interval=poll_interval, once=once, grace=grace,
                       name=worker_id or wid, report=out.progress, report_error=out.error,
                       metrics_port=metrics_port, metrics_host=metrics_host)
            loop = asyncio.get_running_loop()

            def on_signal(sig: int) -> None:
                if w.running:
                    out.info(f"{signal.Signals(sig).name}: stopping; running executions "
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

    go(body)


def workers(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False,
            verbose: VerboseOpt = 0) -> None:
    """Workers that reported themselves: id, host, queues, executions held, last heartbeat
    (one silent for 15 s is shown as lost). A store that is not there yet (no worker started
    on it) lists none, with a note naming it; it is not created."""

    async def body() -> int:
        try:
            async with make_client(store, read_only=True) as client:
                found = await client.store.list_workers()
        except StoreNotFoundError as exc:
            # workers create the store when they start: here none has started yet (or the
            # path is wrong, which the note says); an empty list is the truth either way
            out.info(f"note: {exc}")
            found = []
        now = time.time()
        rows: list[dict[str, Any]] = [{"name": w.name, "id": w.id, "host": w.host, "pid": w.pid,
                                       "queues": list(w.queues) or ["*"], "held": w.held,
                                       "concurrency": w.concurrency,
                                       "started_at": w.started_at,
                                       "heartbeat_at": w.heartbeat_at,
                                       "alive": now - w.heartbeat_at < 3 * HEARTBEAT_INTERVAL}
                                      for w in found]
        if as_json:
            out.json(rows)
            return 0
        out.table(["worker", "host", "queues", "held", "heartbeat", "state"],
                  [(r["name"], f"{r['host']}:{r['pid']}", ",".join(r["queues"]),
                    f"{r['held']}/{r['concurrency']}", f"{now - r['heartbeat_at']:.1f}s ago",
                    "alive" if r["alive"] else "lost") for r in rows])
        return 0

    go(body)


def queue_set(
    name: Annotated[str, typer.Argument(help="Queue name.", show_default=False)],
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", min=1, max=2**31 - 1,
        help="Executions running at once, across every worker.")
    ] = None,
    rate_limit: Annotated[str | None, typer.Option(
        "--rate-limit", help="Starts per period, e.g. 10/m, 5/s, 3/30s.")] = None,
    key_tag: Annotated[str | None, typer.Option(
        "--concurrency-key", help="A tag name: limit executions per value of this tag.")
    ] = None,
    key_concurrency: Annotated[int | None, typer.Option(
        "--key-concurrency", min=1, max=2**31 - 1,
        help="With --concurrency-key: at most this many per value (default 1).")] = None,
    store: StoreOpt = DEFAULT_STORE,
    verbose: VerboseOpt = 0,
) -> None:
    """Create a queue or replace its limits (an option left out is no limit)."""

    async def body() -> int:
        q = Queue(name, concurrency=concurrency, rate_limit=rate_limit,
                  concurrency_key=key_tag, key_concurrency=key_concurrency)
        async with make_client(store) as client:
            await client.store.set_queue(q.config())
        out.out(f"queue {name}: {_limits(q.config())}")
        return 0

    go(body)


def queue_list(store: StoreOpt = DEFAULT_STORE, as_json: JsonOpt = False,
               verbose: VerboseOpt = 0) -> None:
    """Every queue with limits or unfinished executions: its depth, running and limits."""

    async def body() -> int:
        async with make_client(store, read_only=True) as client:
            stats = await client.store.list_queues()
        if as_json:
            out.json([{"name": q.config.name, "pending": q.pending, "running": q.running,
                       "sleeping": q.sleeping, "blocked": q.blocked,
                       "concurrency": q.config.concurrency,
                       "rate_count": q.config.rate_count,
                       "rate_seconds": q.config.rate_seconds,
                       "concurrency_key": q.config.key_tag,
                       "key_concurrency": q.config.key_concurrency} for q in stats])
            return 0
        out.table(["queue", "pending", "running", "sleeping", "blocked", "limits"],
                  [(q.config.name, str(q.pending), str(q.running), str(q.sleeping),
                    str(q.blocked), _limits(q.config)) for q in stats])
        return 0

    go(body)


def _limits(config: QueueConfig) -> str:
    parts = []
    if config.concurrency is not None:
        parts.append(f"concurrency {config.concurrency}")
    if config.rate_count is not None:
        parts.append(f"rate {config.rate_count}/{config.rate_seconds:g}s")
    if config.key_tag is not None:
        parts.append(f"{config.key_concurrency or 1} per {config.key_tag}")
    return ", ".join(parts) or "no limits"


def gc(
    runtime: Annotated[str, typer.Option(
        "--runtime", envvar="FLOW_RUNTIME",
        help="Where to look: process, docker, or all (docker only if an engine answers).")
    ] = "all",
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what would be removed; remove nothing.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Remove agents that crashes left behind: containers and agent directories of ended
    executions, or whose outcome is recorded. Never touches running commands' agents or
    another store's."""

    async def body() -> int:
        names = ["process", "docker"] if runtime == "all" else [runtime]
        rows: list[dict[str, Any]] = []
        for name in names:
            try:
                async with make_client(store, name, read_only=True) as client:
                    reaped = await client.gc(dry_run=dry_run)
            except ConfigurationError as exc:
                if runtime == "all" and name == "docker":
                    out.info(f"docker: skipped ({exc})")
                    continue
                raise
            rows += [{"runtime": name, "agent_id": r.agent_id,
                      "execution_id": r.execution_id, "reason": r.reason,
                      "was_running": r.was_running} for r in reaped]
        if as_json:
            out.json({"dry_run": dry_run, "removed": rows})
            return 0
        verb = "would remove" if dry_run else "removed"
        if rows:
            out.table(["runtime", "agent", "execution", "why"],
                      [(r["runtime"], r["agent_id"], r["execution_id"],
                        r["reason"] + (" (was running)" if r["was_running"] else ""))
                       for r in rows])
        out.out(f"{verb} {len(rows)} agent{'s' if len(rows) != 1 else ''}")
        return 0

    go(body)

