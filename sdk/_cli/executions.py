"""``flow run``, ``resume``, ``retry``, ``status``, ``list``, ``logs``, ``history``, ``cancel``
and ``metrics``: starting executions, reading them, and operating on them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from agentainer_flow.engine import Outcome
from agentainer_flow.engine.spec import SPEC_ATTR, registered_workflows
from agentainer_flow.engine.values import displaying as shown_without_code
from agentainer_flow.store import (
    DEFAULT_QUEUE,
    ExecutionRecord,
    ExecutionStatus,
    HistoryCorruptedError,
    StoredEvent,
)
from agentainer_flow.store.events import EVENT_TYPES, ExecutionFailed

from .._client import ExecutionMode
from .._events import ExecutionEvent, event_type
from .._loading import (
    SOURCE_TAG,
    UsageError,
    ensure_registered,
    import_file,
    import_modules,
    module_file,
    pick_workflow,
    split_target,
)
from .._remote import RemoteWorkflowClient
from .._summary import StepSummary, step_summaries
from ._common import (
    DEFAULT_STORE,
    AnyClient,
    ApiTokenOpt,
    ApiUrlOpt,
    IdArg,
    ImagesOpt,
    JsonOpt,
    ModulesOpt,
    QuietOpt,
    RuntimeOpt,
    SecretsOpt,
    StoreOpt,
    VerboseOpt,
    build_workflow,
    connect,
    fork_links,
    go,
    holder,
    holder_text,
    pairs,
    parse_images,
    parse_input,
    parse_secrets,
    read_data,
    record_dict,
    refuse_local_options,
    resolve_id,
    status_text,
)
from ._output import dur, jsonable, out, ts
from ._views import fork_lines, steps_json, steps_table, timeline, where

__all__ = ["cancel", "follow", "history", "list_", "logs", "metrics", "resume", "retry", "run",
           "status"]

_PROGRESS_TYPES = frozenset({
    "step_started", "step_completed", "step_failed", "step_retry_scheduled", "step_skipped",
    "log_recorded", "child_workflow_started", "child_workflow_completed", "cancel_requested",
})


# following an execution run here ----------------------------------------------------------
async def _progress(client: AnyClient, execution_id: str, after_seq: int) -> None:
    async for ev in client.stream_events(execution_id, after_seq=after_seq):
        if ev.type in _PROGRESS_TYPES:
            fg = "red" if ev.type == "step_failed" else None
            when = ev.timestamp.strftime("%H:%M:%S")
            at = f"[{ev.step}] " if ev.type == "log_recorded" and ev.step else ""
            out.info(f"  {when} {at}{ev.message}", fg=fg)


async def follow(client: AnyClient, execution_id: str, *, after_seq: int,
                 as_json: bool, quiet: bool, extra: Mapping[str, Any] | None = None) -> int:
    """Wait for the execution (running in this process, or on a server's workers) to end,
    showing progress; ``extra`` goes into the ``--json`` outcome."""
    remote = isinstance(client, RemoteWorkflowClient)
    out.running = None if remote else execution_id  # ^C stops only this process's run
    watcher = None if quiet else asyncio.ensure_future(
        _progress(client, execution_id, after_seq))
    try:
        outcome = await (client.wait_outcome(execution_id)
                         if isinstance(client, RemoteWorkflowClient)
                         else client.engine.wait_outcome(execution_id))
    except BaseException:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        raise
    if watcher is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(watcher, 2.0)  # it ends at the terminal event
    out.running = None
    record = await client.describe(execution_id)
    return _report_outcome(outcome, record, as_json=as_json, extra=extra or {})


def _report_outcome(outcome: Outcome, record: ExecutionRecord, *, as_json: bool,
                    extra: Mapping[str, Any]) -> int:
    result = outcome.result if outcome.status == "completed" else None
    if as_json:
        out.json({"execution_id": outcome.execution_id, "workflow": record.workflow_name,
                  "status": outcome.status, "result": result, "error": outcome.error,
                  "error_type": outcome.error_type, "step": outcome.step,
                  "duration": record.duration, **extra})
    elif outcome.status == "completed":
        out.info(f"execution {outcome.execution_id} completed in {dur(record.duration)}",
                 fg="green")
        out.out(json.dumps(jsonable(result), indent=2, ensure_ascii=False))
    else:
        at = f" in step {outcome.step!r}" if outcome.step else ""
        out.error(f"execution {outcome.execution_id} {outcome.status}{at}: {outcome.error}")
    return 0 if outcome.status == "completed" else 1


# starting -------------------------------------------------------------------------------
def run(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="FILE[:WORKFLOW]", show_default=False,
                                          help="Python file, and the @workflow class to run "
                                          "if it has several.")],
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="JSON (or YAML) file for the constructor: an object's keys "
        "name its parameters; else the single argument if __init__ takes one.")] = None,
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
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Start an execution of a workflow defined in FILE (through a flow server with
    --api-url: it starts the same workflow, name and version, on its workers)."""

    async def body() -> int:
        secrets = parse_secrets(secret)
        tags = pairs(tag, "--tag")
        images = parse_images(image)
        value = parse_input(input_)
        file, cls_name = split_target(target)
        module = import_file(file)
        cls = pick_workflow(module, cls_name)
        data = read_data(config, "config file") if config is not None else None
        workflow = build_workflow(cls, data, has_config=config is not None)
        async with connect(ctx, store, api_url, api_token, runtime=runtime, images=images,
                           read_only=False) as client:
            if isinstance(client, RemoteWorkflowClient):
                refuse_local_options(ctx, runtime=runtime, image=image)
                return await _run_on_server(
                    client, workflow, value, secrets, tags, wait=wait, queue=queue,
                    priority=priority, idempotency_key=idempotency_key, as_json=as_json,
                    quiet=quiet)
            tags.setdefault(SOURCE_TAG, str(module_file(module)))
            if queue is not None:
                queued = await client.run_workflow(
                    workflow, ExecutionMode.ASYNC, input=value, secrets=secrets, tags=tags,
                    idempotency_key=idempotency_key, queue=queue, priority=priority)
                if not wait:
                    if as_json:
                        out.json({"execution_id": queued.id, "queue": queue,
                                  "status": (await queued.status()).value})
                    else:
                        out.out(queued.id)
                    return 0
                if not quiet:
                    out.info(f"execution {queued.id} queued on {queue!r}; following it")
                return await follow(client, queued.id, after_seq=0, as_json=as_json,
                                    quiet=quiet)
            if not wait:
                record, _ = await client.engine.start(
                    workflow, input=value, tags=tags, secrets=secrets,
                    idempotency_key=idempotency_key, run_here=False)
                if as_json:
                    out.json({"execution_id": record.id, "workflow": record.workflow_name,
                              "status": record.status.value})
                else:
                    out.out(record.id)
                    _no_wait_hint(record, secrets)
                return 0
            execution = await client.run_workflow(
                workflow, ExecutionMode.ASYNC, input=value, secrets=secrets, tags=tags,
                idempotency_key=idempotency_key)
            if not quiet:
                out.info(f"execution {execution.id} ({getattr(cls, SPEC_ATTR).name}) started")
            return await follow(client, execution.id, after_seq=0, as_json=as_json,
                                quiet=quiet)

    go(body)


async def _run_on_server(client: RemoteWorkflowClient, workflow: object, value: Any,
                         secrets: Mapping[str, str], tags: Mapping[str, str], *, wait: bool,
                         queue: str | None, priority: int, idempotency_key: str | None,
                         as_json: bool, quiet: bool) -> int:
    """``flow run --api-url``: the server records it (for the workers of ``queue``), and
    this process follows it to its end unless ``--no-wait``."""
    name = getattr(type(workflow), SPEC_ATTR).name
    execution = await client.run_workflow(
        workflow, ExecutionMode.ASYNC, input=value, secrets=secrets, tags=tags,
        idempotency_key=idempotency_key, queue=queue, priority=priority)
    if not wait:
        if as_json:
            where = {"queue": queue} if queue is not None else {"workflow": name}
            out.json({"execution_id": execution.id, **where,
                      "status": (await execution.status()).value})
        else:
            out.out(execution.id)
            on = f"the workers of queue {queue!r}" if queue else "its workers"
            out.info(f"execution {execution.id} recorded by {client.api_url}; {on} run it")
        return 0
    if not quiet:
        on = f" on queue {queue!r}" if queue else ""
        out.info(f"execution {execution.id} ({name}) started by {client.api_url}{on}; "
                 "following it")
    return await follow(client, execution.id, after_seq=0, as_json=as_json, quiet=quiet)


def _no_wait_hint(record: ExecutionRecord, secrets: Mapping[str, str]) -> None:
    out.info(f"execution {record.id} recorded ({record.status.value}); nothing runs it yet: "
             f"start `flow worker` on this store, or `flow resume {record.id}`")
    if secrets and not os.environ.get("FLOW_SECRETS_KEY"):
        names = ", ".join(f"FLOW_SECRET_{n.upper()}" for n in sorted(secrets))
        out.info(f"secrets are not stored (FLOW_SECRETS_KEY is not set): the process that "
                 f"runs it needs {names} in its environment")


def resume(
    ctx: typer.Context,
    execution_id: IdArg,
    module: ModulesOpt = None,
    secret: SecretsOpt = None,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Take it over now even if a live process holds its lease (that "
        "process is fenced out: it stops before its next step).")] = False,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Run an unfinished execution to its end in this process, from its history (through
    a flow server with --api-url: in the server's process, followed from here)."""

    async def body() -> int:
        secrets = parse_secrets(secret)
        images = parse_images(image)
        async with connect(ctx, store, api_url, api_token, runtime=runtime, images=images,
                           read_only=True) as client:
            remote = isinstance(client, RemoteWorkflowClient)
            if remote:
                refuse_local_options(ctx, module=module, runtime=runtime, image=image)
            else:
                import_modules(module)
            record = await client.describe(await resolve_id(client, execution_id))
            if not remote:
                ensure_registered(record)
            held = holder(record)
            if not quiet and held is not None and not held[1] and not force:
                out.info(f"execution {record.id} is running in {held[0]}: following it "
                         "to its end (it is taken over here if that process dies; --force "
                         "takes it over now)")
            elif not quiet and not record.status.is_terminal:
                out.info(f"resuming execution {record.id} ({record.workflow_name}) from "
                         f"{record.last_seq} events")
            await client.resume(record.id, secrets=secrets, wait=False, takeover=force)
            return await follow(client, record.id, after_seq=record.last_seq,
                                as_json=as_json, quiet=quiet)

    go(body)


def retry(
    ctx: typer.Context,
    execution_id: IdArg,
    from_step: Annotated[str | None, typer.Option(
        "--from-step", metavar="STEP", help="Run this step and what depends on it again; "
        "reuse the recorded results of the others. Default: the step that failed.")] = None,
    module: ModulesOpt = None,
    secret: SecretsOpt = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Run it here to the end, or only record it for "
        "`flow worker` / `flow resume`.")] = True,
    queue: Annotated[str | None, typer.Option(
        "--queue", help="Record it for the workers of this queue instead of running it "
        "here; with --wait, follow it to the end.")] = None,
    runtime: RuntimeOpt = "process",
    image: ImagesOpt = None,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Run an execution again from a step, as a new execution (a fork) with the current
    code: the steps that do not depend on STEP keep their recorded results (their bodies and
    agents do not run again). The original is not changed. Through a flow server
    (--api-url), the server's workers run it with the server's code."""

    async def body() -> int:
        secrets = parse_secrets(secret)
        images = parse_images(image)
        async with connect(ctx, store, api_url, api_token, runtime=runtime, images=images,
                           read_only=True) as client:
            if isinstance(client, RemoteWorkflowClient):
                refuse_local_options(ctx, module=module, runtime=runtime, image=image)
                return await _retry_on_server(client, execution_id, from_step, secrets,
                                              wait=wait, queue=queue, as_json=as_json,
                                              quiet=quiet)
            import_modules(module)
            eid = await resolve_id(client, execution_id)
            record = await client.describe(eid)
            ensure_registered(record)
            steps = registered_workflows()[record.workflow_name].order
            stored = await client.store.load(eid)
            step = from_step or _step_to_retry(record, _failed_step(stored),
                                               step_summaries(stored), steps)
            _check_step(record, step, steps)
            fork = getattr(client, "fork", None)
            if fork is None:
                raise UsageError("this version of agentainer-flow cannot fork executions "
                                 "(WorkflowClient.fork is missing)")
            options: dict[str, Any] = {"from_step": step, "secrets": secrets or None,
                                       "mode": ExecutionMode.ASYNC}
            if queue is not None or not wait:
                options["queue"] = queue or DEFAULT_QUEUE  # recorded, not run here
            new = await fork(eid, **options)
            link = {"forked_from": {"execution_id": eid, "step": step}}
            forked = f"execution {new.id} forked from {eid} at step {step!r}"
            if not wait:
                if as_json:
                    out.json({"execution_id": new.id, **link,
                              "status": (await new.status()).value})
                else:
                    out.out(new.id)
                    workers = f"flow worker --queue {queue}" if queue else "flow worker"
                    out.info(f"{forked} and recorded; nothing runs it yet: start `{workers}` "
                             f"on this store, or `flow resume {new.id}`")
                return 0
            if not quiet:
                out.info(f"{forked} queued on {queue!r}; following it" if queue
                         else f"{forked} started")
            return await follow(client, new.id, after_seq=0, as_json=as_json, quiet=quiet,
                                extra=link)

    go(body)


async def _retry_on_server(client: RemoteWorkflowClient, execution_id: str,
                           from_step: str | None, secrets: Mapping[str, str], *, wait: bool,
                           queue: str | None, as_json: bool, quiet: bool) -> int:
    """``flow retry --api-url``: the server records the fork for its workers (of
    ``queue``); this process follows it to its end unless ``--no-wait``."""
    eid = await resolve_id(client, execution_id)
    record = await client.describe(eid)
    steps = (await client.get_workflow(record.workflow_name))["order"]
    step = from_step
    if step is None:
        failed = None
        if record.status is ExecutionStatus.FAILED:  # ended: the outcome is there at once
            failed = (await client.wait_outcome(eid)).step
        step = _step_to_retry(record, failed, await client.get_step_summaries(eid), steps)
    _check_step(record, step, steps)
    new = await client.retry(eid, from_step=step, secrets=secrets or None, queue=queue)
    link = {"forked_from": {"execution_id": eid, "step": step}}
    forked = f"execution {new.id} forked from {eid} at step {step!r}"
    if not wait:
        if as_json:
            out.json({"execution_id": new.id, **link, "status": (await new.status()).value})
        else:
            out.out(new.id)
            on = f"the workers of queue {queue!r}" if queue else "its workers"
            out.info(f"{forked} and recorded by {client.api_url}; {on} run it")
        return 0
    if not quiet:
        out.info(f"{forked} by {client.api_url}; following it")
    return await follow(client, new.id, after_seq=0, as_json=as_json, quiet=quiet, extra=link)


def _failed_step(stored: Sequence[StoredEvent]) -> str | None:
    """The step a failed execution failed in, from its history."""
    for s in reversed(stored):
        if isinstance(s.event, ExecutionFailed) and s.event.step:
            return s.event.step
    return None


def _check_step(record: ExecutionRecord, step: str, steps: Sequence[str]) -> None:
    if step not in steps:
        raise UsageError(f"workflow {record.workflow_name!r} has no step {step!r} "
                         f"(steps: {', '.join(steps)})")


def _step_to_retry(record: ExecutionRecord, failed_step: str | None,
                   summaries: Sequence[StepSummary], steps: Sequence[str]) -> str:
    """The step ``flow retry`` redoes by default: the one the execution failed in, else
    the first one that did not finish."""
    if failed_step:
        return failed_step
    for summary in summaries:
        if summary.status not in ("completed", "skipped"):
            return summary.step
    raise UsageError(f"execution {record.id} ({record.status.value}) has no failed or "
                     "unfinished step to retry from; name one with --from-step STEP "
                     f"(steps: {', '.join(steps)})")


# reading --------------------------------------------------------------------------------
def status(
    ctx: typer.Context,
    execution_id: IdArg,
    watch: Annotated[bool, typer.Option(
        "--watch", "-W", help="Redraw every second until the execution ends (Ctrl-C "
        "stops watching); exit 0 if it completed, 1 if not.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Show an execution: status, workflow, times, error, result, and how its steps stand
    (for one that is not finished)."""

    async def body() -> int:
        async with connect(ctx, store, api_url, api_token) as client, \
                shown_without_code():
            eid = await resolve_id(client, execution_id)
            if not watch:
                await _show_status(client, eid, as_json=as_json, steps=None)
                return 0
            out.watching = True
            return await _watch_status(client, eid, as_json=as_json)

    go(body)


async def _show_status(client: AnyClient, eid: str, *, as_json: bool,
                       steps: bool | None) -> ExecutionRecord:
    """Print the execution's status; ``steps``: show the step summary (default: while it
    is not finished)."""
    r = await client.describe(eid)
    result: Any = None
    if r.status is ExecutionStatus.COMPLETED:
        result = await client.get_execution(r.id).get_result()
    summaries = await _summaries(client, r.id)
    origin, forks = await fork_links(client, r.id)
    if as_json:
        out.json({**record_dict(r), "result": result, "steps": steps_json(summaries),
                  "forked_from": origin, "forks": await _forks_json(client, forks)})
        return r
    color = {"completed": "green", "failed": "red", "cancelled": "yellow"}
    rows = [
        ("execution", r.id),
        ("workflow", f"{r.workflow_name} (version {r.workflow_version})"),
        ("status", status_text(r) + (
            f" (cancel requested{': ' + r.cancel_reason if r.cancel_reason else ''})"
            if r.cancel_requested and not r.status.is_terminal else "")),
        ("created", ts(r.created_at)),
        ("updated", ts(r.updated_at)),
        ("finished", ts(r.finished_at)),
        ("duration", dur(r.duration)),
        ("events", str(r.last_seq)),
    ]
    if r.parent_id:
        rows.append(("parent", r.parent_id))
    rows += fork_lines(origin, forks, await _fork_steps(client, forks))
    if r.tags:
        rows.append(("tags", ", ".join(f"{k}={v}" for k, v in sorted(r.tags.items()))))
    if holder(r) is not None:
        rows.append(("held by", holder_text(r)))
        if r.lease_renewed_at is not None or not isinstance(client, RemoteWorkflowClient):
            rows.append(("renewed", ts(r.lease_renewed_at)))  # a server does not say
    if r.error:
        rows.append(("error", r.error))
    if r.status is ExecutionStatus.COMPLETED:
        rows.append(("result", json.dumps(jsonable(result), ensure_ascii=False)))
    colors = {"status": c} if (c := color.get(r.status.value)) else {}
    out.fields(rows, colors=colors)
    if steps if steps is not None else not r.status.is_terminal:
        out.out()
        steps_table(summaries)
    return r


async def _watch_status(client: AnyClient, eid: str, *, as_json: bool) -> int:
    """Redraw the status every second until the execution ends."""
    tty = sys.stdout.isatty() and not as_json
    shown: tuple[str, int] | None = None
    while True:
        r = await client.describe(eid)
        # on a terminal the frame is redrawn in place (its times move); in a pipe or a file
        # a frame is added only when something happened
        if tty or (r.status.value, r.last_seq) != shown:
            if tty:
                typer.echo("\x1b[H\x1b[2J", nl=False)  # home, clear: one frame on screen
            elif shown is not None:
                out.out()
            r = await _show_status(client, eid, as_json=as_json, steps=True)
            shown = (r.status.value, r.last_seq)
        if r.status.is_terminal:
            return 0 if r.status is ExecutionStatus.COMPLETED else 1
        if isinstance(client, RemoteWorkflowClient):
            await asyncio.sleep(1.0)  # a server is asked again every second
        else:
            await client.store.wait_for_change(eid, 1.0)
        await asyncio.sleep(0.2)  # at most ~4 frames a second while it is busy


async def _summaries(client: AnyClient, eid: str) -> list[StepSummary]:
    """The per-step summary of the history, or of what can be read of a damaged one."""
    if isinstance(client, RemoteWorkflowClient):
        return await client.get_step_summaries(eid)  # the server reads it the same way
    try:
        stored = await client.store.load(eid)
    except HistoryCorruptedError:
        audit = await client.store.audit(eid)
        stored = [StoredEvent(eid, e.seq, e.event) for e in audit if e.event is not None]
    return step_summaries(stored)


async def _fork_steps(client: AnyClient, forks: Sequence[ExecutionRecord]
                      ) -> dict[str, str]:
    steps: dict[str, str] = {}
    for f in forks:
        origin, _ = await fork_links(client, f.id)
        if origin is not None:
            steps[f.id] = origin["step"]
    return steps


async def _forks_json(client: AnyClient, forks: Sequence[ExecutionRecord]
                      ) -> list[dict[str, Any]]:
    steps = await _fork_steps(client, forks)
    return [{"execution_id": f.id, "step": steps.get(f.id), "status": f.status.value}
            for f in forks]


def list_(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", "-w",
                                                 help="Only this workflow.")] = None,
    status_: Annotated[list[ExecutionStatus] | None, typer.Option(
        "--status", "-s", help="Only these statuses (repeatable).")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t",
                                                  help="Only with tag k=v (repeatable).")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """List executions, newest first."""

    async def body() -> int:
        async with connect(ctx, store, api_url, api_token) as client, \
                shown_without_code():
            rows = await client.list_executions(
                workflow_name=workflow, statuses=status_ or None,
                tags=pairs(tag, "--tag") or None, limit=limit)
        if as_json:
            out.json([record_dict(r) for r in rows])
            return 0
        if not rows:
            out.info("no executions")
            return 0
        out.table(["id", "workflow", "status", "created", "duration", "holder"],
                  [(r.id, r.workflow_name, status_text(r), ts(r.created_at),
                    dur(r.duration), holder_text(r)) for r in rows])
        return 0

    go(body)


def logs(
    ctx: typer.Context,
    execution_id: IdArg,
    follow_: Annotated[bool, typer.Option("--follow", "-f",
                                          help="Keep printing until it ends.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Print an execution's log: ctx.log messages and step milestones."""

    async def body() -> int:
        async with connect(ctx, store, api_url, api_token) as client, \
                shown_without_code():
            eid = await resolve_id(client, execution_id)
            if follow_:
                async for line in client.stream_logs(eid):
                    out.out(line)
            else:
                for line in await client.get_logs(eid):
                    out.out(line)
        return 0

    go(body)


def history(
    ctx: typer.Context,
    execution_id: IdArg,
    events: Annotated[bool, typer.Option(
        "--events", "-e", help="The raw event table (seq, time, type, step, message) instead "
        "of the per-step summary.")] = False,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Print an execution's history: one row per step (status, attempts, duration, result
    or error, agents), or every event with --events."""

    async def body() -> int:
        async with connect(ctx, store, api_url, api_token) as client, \
                shown_without_code():
            eid = await resolve_id(client, execution_id)
            try:
                shown, summaries = await _history(client, eid)
            except HistoryCorruptedError as exc:
                # show what can be read, the damage marked, and fail with the error
                _damaged_timeline(eid, await _audit(client, eid), as_json=as_json)
                out.error(str(exc))
                return 1
            if events:
                if as_json:
                    out.json([e.to_dict() for e in shown])
                else:
                    timeline(shown)
                return 0
            r = await client.describe(eid)
            origin, forks = await fork_links(client, eid)
            if as_json:
                out.json({"execution_id": r.id, "workflow": r.workflow_name,
                          "version": r.workflow_version, "status": r.status.value,
                          "forked_from": origin, "forks": await _forks_json(client, forks),
                          "steps": steps_json(summaries)})
                return 0
            out.fields([("execution", r.id),
                        ("workflow", f"{r.workflow_name} (version {r.workflow_version})"),
                        ("status", status_text(r)),
                        *fork_lines(origin, forks, await _fork_steps(client, forks))])
            out.out()
            steps_table(summaries)
        return 0

    go(body)


async def _history(client: AnyClient, eid: str
                   ) -> tuple[list[ExecutionEvent], list[StepSummary]]:
    """The events and the per-step summary; ``HistoryCorruptedError`` for a damaged one."""
    if isinstance(client, RemoteWorkflowClient):
        shown = await client.get_history(eid)  # refused by the server if damaged
        return shown, await client.get_step_summaries(eid)
    stored = await client.store.load(eid)
    return [ExecutionEvent.from_stored(e) for e in stored], step_summaries(stored)


#: one entry of a damaged history: seq, stored type, problem, the event if readable
_Audited = tuple[int, str, str | None, ExecutionEvent | None]


async def _audit(client: AnyClient, eid: str) -> list[_Audited]:
    if isinstance(client, RemoteWorkflowClient):
        return await client.get_audit(eid)
    return [(e.seq, e.type, e.problem, None if e.event is None
             else ExecutionEvent.from_stored(StoredEvent(eid, e.seq, e.event)))
            for e in await client.store.audit(eid)]


def _damaged_timeline(execution_id: str, audit: Sequence[_Audited], *, as_json: bool
                      ) -> None:
    """A damaged history as ``flow history`` shows it: every readable event, and the
    damage marked where it is (a changed or unreadable event, a gap, a missing tail)."""
    rows: list[dict[str, Any]] = []
    cells: list[tuple[str, ...]] = []
    for seq, stored_type, problem, ev in audit:
        mark = f"DAMAGED: {problem}" if problem else ""
        if ev is not None:
            rows.append({**ev.to_dict(), "problem": problem})
            cells.append((str(ev.seq), ts(ev.timestamp.timestamp(), ms=True), ev.type,
                          where(ev), ev.message, mark))
            continue
        what = "(unreadable)" if stored_type else "(missing)"
        known = EVENT_TYPES.get(stored_type)
        kind = event_type(known) if known is not None else stored_type
        rows.append({"execution_id": execution_id, "seq": seq, "type": kind or None,
                     "timestamp": None, "step": None, "instance": None, "attempt": None,
                     "message": what, "details": {}, "problem": problem})
        cells.append((str(seq), "", kind, "", what, mark))
    if as_json:
        out.json(rows)
    else:
        out.table(["seq", "time", "type", "step", "message", "damage"], cells,
                  wrap=("message", "damage"))


# operating ------------------------------------------------------------------------------
def cancel(
    ctx: typer.Context,
    execution_id: IdArg,
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
    reason: Annotated[str, typer.Option(
        "--reason", help="Why: recorded in its history, wherever it runs.")] = "",
) -> None:
    """Ask an execution to stop (its agents are stopped, always_run steps still run)."""

    async def body() -> int:
        async with connect(ctx, store, api_url, api_token) as client:
            eid = await resolve_id(client, execution_id)
            ok = await client.cancel(eid, reason)
            record = await client.describe(eid)
        if as_json:
            out.json({"execution_id": record.id, "cancel_requested": ok,
                      "status": record.status.value})
        elif ok:
            out.out(f"cancel requested for {record.id} ({record.status.value}); it stops at "
                    "its next step event where it runs (a pending execution is cancelled "
                    "when a worker or `flow resume` picks it up)")
        else:
            out.out(f"execution {record.id} already {record.status.value}; nothing to cancel")
        return 0

    go(body)


def metrics(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Option("--workflow", "-w",
                                                 help="One workflow (default: all).")] = None,
    range_: Annotated[str, typer.Option("--range", "-r",
                                        help="Time range: 1h, 24h, 7d...")] = "24h",
    store: StoreOpt = DEFAULT_STORE,
    api_url: ApiUrlOpt = None,
    api_token: ApiTokenOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Totals, success rate and average duration per workflow over a time range."""

    async def body() -> int:
        from agentainer_flow.engine.durations import parse_duration

        try:
            seconds = parse_duration(range_, what="--range") or 0.0
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        async with connect(ctx, store, api_url, api_token) as client:
            if workflow is not None:
                names = [workflow]
            else:
                rows = await client.list_executions(created_after=time.time() - seconds,
                                                    limit=None)
                names = sorted({r.workflow_name for r in rows})
            found = [await client.get_workflow_metrics(n, range_) for n in names]
        if as_json:
            out.json(found)
            return 0
        if not found:
            out.info(f"no executions in the last {range_}")
            return 0
        out.table(
            ["workflow", "total", "completed", "failed", "cancelled", "running", "success",
             "avg duration"],
            [(m.workflow_name, str(m.total_executions), str(m.completed), str(m.failed),
              str(m.cancelled), str(m.running), f"{m.success_rate:g}%", dur(m.avg_duration))
             for m in found])
        return 0

    go(body)
