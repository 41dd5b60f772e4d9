"""``flow replay``: a debugger for a history against the current code, and the pre-deploy
gate (``--check``) over every unfinished execution of a store. Nothing is launched,
written or slept: the store is only read."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from agentainer_flow.engine.engine import rebuild_workflow
from agentainer_flow.engine.errors import NonDeterminismError
from agentainer_flow.engine.replayer import ReplayReport, replay_history
from agentainer_flow.store import ExecutionRecord, ExecutionStatus, StoredEvent
from agentainer_flow.store.events import CommandEvent, ExecutionStarted, StepStarted

from .._context import Context
from .._events import ExecutionEvent
from .._loading import UsageError, ensure_registered, import_modules
from .._replay_check import ReplayCheckReport, check_replay
from .._summary import state_at, step_summaries
from ._common import (
    DEFAULT_STORE,
    EXIT_FAILED,
    EXIT_OK,
    JsonOpt,
    ModulesOpt,
    QuietOpt,
    StoreOpt,
    VerboseOpt,
    go,
    make_client,
    resolve_id,
)
from ._output import jsonable, out, ts
from ._views import short, steps_json, steps_table, timeline, where

__all__ = ["divergence_dict", "diverging_seq", "replay"]

#: what to do about a divergence, when the error does not say (older engines)
_HINT = ("restore the previous code to finish this execution, or version the change with "
         "`if ctx.patched(\"change-id\"):` (new code) / else (old code)")


def replay(
    execution_id: Annotated[str | None, typer.Argument(
        help="Execution id (or a unique prefix). Not with --check.", show_default=False)
    ] = None,
    module: ModulesOpt = None,
    until: Annotated[int | None, typer.Option(
        "--until", metavar="SEQ", min=1, help="Show the workflow state and step results as "
        "of event SEQ (the timeline stops there).")] = None,
    step: Annotated[str | None, typer.Option(
        "--step", metavar="NAME", help="Show one step's commands and results in detail.")
    ] = None,
    check: Annotated[bool, typer.Option(
        "--check", help="The pre-deploy gate: replay every unfinished execution against "
        "the code given with -m and list those it would break (exit 1 if any).")] = False,
    workflow: Annotated[str | None, typer.Option(
        "--workflow", "-w", help="With --check: only this workflow's executions.")] = None,
    status_: Annotated[list[ExecutionStatus] | None, typer.Option(
        "--status", "-s", help="With --check: only executions in these statuses "
        "(repeatable; default: pending, running, blocked).")] = None,
    sample: Annotated[int, typer.Option(
        "--sample", metavar="N", min=0, help="With --check: also replay N finished "
        "executions picked at random.")] = 0,
    store: StoreOpt = DEFAULT_STORE,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Check a stored history against the current code, with no side effects: the verdict
    first, then the timeline with the diverging event marked. With --check, every
    unfinished execution against the code in -m FILE."""
    if check:
        if execution_id is not None or until is not None or step is not None:
            raise typer.BadParameter(
                "--check replays every unfinished execution: drop the execution id, "
                "--until and --step (or drop --check to debug one execution)")
        if not module:
            raise typer.BadParameter("--check needs the new code: -m FILE (or -m module.name)")
        go(lambda: _check(module, store, workflow=workflow, statuses=status_, sample=sample,
                          as_json=as_json, quiet=quiet))
    if execution_id is None:
        raise typer.BadParameter("give the execution id to replay (or --check -m FILE to "
                                 "check every unfinished execution)")
    if workflow is not None or status_ or sample:
        raise typer.BadParameter("--workflow, --status and --sample go with --check")
    go(lambda: _debug(execution_id, module, store, until=until, step=step, as_json=as_json,
                      quiet=quiet))


# one execution --------------------------------------------------------------------------
async def _debug(given: str, module: Sequence[Path] | None, store: str, *, until: int | None,
                 step: str | None, as_json: bool, quiet: bool) -> int:
    import_modules(module)
    async with make_client(store, read_only=True) as client:
        record = await client.describe(await resolve_id(client, given))
        stored = await client.store.load(record.id)
    spec = ensure_registered(record)
    started = stored[0].event
    assert isinstance(started, ExecutionStarted)
    if until is not None and until > stored[-1].seq:
        raise UsageError(f"--until {until}: execution {record.id} has {stored[-1].seq} events")
    steps_seen = list(dict.fromkeys(s for e in stored if (s := getattr(e.event, "step", None))))
    if step is not None and step not in steps_seen:
        raise UsageError(f"--step {step}: execution {record.id} has no event of step {step!r} "
                         f"(steps in its history: {', '.join(steps_seen) or 'none'})")
    workflow = rebuild_workflow(spec, started)
    report = await replay_history(spec, workflow, record, stored, context_factory=Context)
    error = report.error
    seq = diverging_seq(error, stored) if error is not None else None
    shown = [s for s in stored if (until is None or s.seq <= until)
             and (step is None or getattr(s.event, "step", None) == step)]
    upto = [s for s in stored if until is None or s.seq <= until]
    if as_json:
        out.json({"execution_id": record.id, "workflow": record.workflow_name,
                  "version": record.workflow_version, "code_version": spec.version,
                  "ok": report.ok, "attempts_checked": report.attempts_checked,
                  "in_flight": report.in_flight,
                  "divergence": None if error is None else divergence_dict(error, seq),
                  "error": None if error is None else str(error),
                  "until": until, "step": step,
                  "events": [{**ExecutionEvent.from_stored(s).to_dict(),
                              "diverged": s.seq == seq} for s in shown],
                  "state": state_at(upto), "steps": steps_json(step_summaries(upto))})
        return EXIT_OK if report.ok else EXIT_FAILED
    _verdict(record, report, seq, code_version=spec.version)
    marks = {seq: "DIVERGED here"} if seq is not None else {}
    if step is not None:
        _step_detail(step, shown, marks)
    elif not quiet:  # -q: the verdict (and what --until asks for) only
        out.out()
        timeline([ExecutionEvent.from_stored(s) for s in shown], marks=marks)
    if until is not None:
        _as_of(until, upto)
    if error is not None:
        out.info(f"DIVERGED: {error}", fg="red")  # the one line a failing command ends with
    return EXIT_OK if report.ok else EXIT_FAILED


def diverging_seq(error: NonDeterminismError, stored: Sequence[StoredEvent]) -> int | None:
    """The seq of the event where the code diverged: the error's own, else the recorded
    command it names, else the start of the attempt it names."""
    seq = getattr(error, "seq", None)
    if isinstance(seq, int):
        return seq
    where_ = (error.step, error.instance, error.attempt)
    for s in stored:
        ev = s.event
        if (isinstance(ev, CommandEvent) and (ev.step, ev.instance, ev.attempt) == where_
                and ev.index == error.index):
            return s.seq
    for s in stored:
        ev = s.event
        if isinstance(ev, StepStarted) and (ev.step, ev.instance, ev.attempt) == where_:
            return s.seq
    return None


def divergence_dict(error: NonDeterminismError, seq: int | None) -> dict[str, Any]:
    """A divergence as ``--json`` prints it."""
    return {"step": error.step, "instance": error.instance, "attempt": error.attempt,
            "index": error.index, "seq": seq, "recorded": error.recorded,
            "actual": error.actual, "hint": getattr(error, "hint", None) or _HINT,
            "message": str(error)}


def _verdict(record: ExecutionRecord, report: ReplayReport, seq: int | None, *,
             code_version: str) -> None:
    """The first thing ``flow replay`` prints: OK, or where and how the code diverged."""
    if code_version != record.workflow_version:
        out.info(f"note: the execution ran version {record.workflow_version!r} of "
                 f"{record.workflow_name!r}; the code has version {code_version!r}",
                 fg="yellow")
    error = report.error
    if error is None:
        flight = (f" ({len(report.in_flight)} in flight: {', '.join(report.in_flight)})"
                  if report.in_flight else "")
        out.out(f"OK: {report.attempts_checked} step attempts match the history" + flight)
        return
    at = f" at seq {seq}" if seq is not None else ""
    command = f", command {error.index}" if error.index is not None else ""
    out.out(typer.style(f"DIVERGED{at}: step {error.step!r} (instance {error.instance}, "
                        f"attempt {error.attempt}{command})", fg="red"))
    out.fields([("history", error.recorded), ("code", error.actual),
                ("hint", getattr(error, "hint", None) or _HINT)])


def _step_detail(name: str, stored: Sequence[StoredEvent], marks: dict[int, str]) -> None:
    """Every event of one step: its commands with their full arguments, and its results."""
    summaries = [s for s in step_summaries(stored) if s.step == name]
    out.out()
    steps_table(summaries)
    out.out()
    rows = []
    for s in stored:
        ev = ExecutionEvent.from_stored(s)
        details = {k: v for k, v in ev.details.items()
                   if k not in ("step", "instance", "attempt", "index")}
        index = getattr(s.event, "index", None)
        rows.append((">>" if s.seq in marks else "", str(s.seq), where(ev),
                     "" if index is None else str(index), ev.type,
                     json.dumps(jsonable(details), ensure_ascii=False, default=str),
                     marks.get(s.seq, "")))
    out.table([" ", "seq", "step", "cmd", "type", "details", "note"], rows,
              wrap=("details", "note"))


def _as_of(until: int, upto: Sequence[StoredEvent]) -> None:
    """The workflow state and the step results as of event ``until``."""
    when = ts(upto[-1].event.ts, ms=True) if upto else "-"
    out.out()
    out.out(f"as of seq {until} ({when}):")
    out.out("state:")
    state = state_at(upto)
    if not state:
        out.out("  (empty)")
    for key, value in state.items():
        out.out(f"  {key} = {short(json.dumps(jsonable(value), ensure_ascii=False), 200)}")
    out.out("steps:")
    steps_table(step_summaries(upto))


# every unfinished execution -------------------------------------------------------------
async def _check(module: Sequence[Path], store: str, *, workflow: str | None,
                 statuses: Sequence[ExecutionStatus] | None, sample: int, as_json: bool,
                 quiet: bool) -> int:
    report = await check_replay(store, [str(m) for m in module], workflow=workflow,
                                statuses=statuses or None, sample=sample)
    if as_json:
        out.json(report.to_dict())
        return EXIT_OK if report.ok else EXIT_FAILED
    _check_report(report, [str(m) for m in module], quiet=quiet)
    return EXIT_OK if report.ok else EXIT_FAILED


def _check_report(report: ReplayCheckReport, module: Sequence[str], *, quiet: bool) -> None:
    code = ", ".join(module)
    if report.ok:
        out.out(f"OK: the {report.checked} executions checked match the code in {code}")
    else:
        out.out(typer.style(f"BROKEN: {len(report.broken)} of the {report.checked} executions "
                            f"checked do not match the code in {code}", fg="red"))
        out.table(["id", "workflow", "status", "step", "history has", "code does"],
                  [(b.execution_id, f"{b.workflow} (v{b.version})", b.status, b.step or "-",
                    short(b.recorded or type(b.error).__name__, 80),
                    short(b.actual or str(b.error), 80))
                   for b in report.broken], wrap=("history has", "code does"))
    if report.skipped and not quiet:
        by: dict[str, int] = {}
        for s in report.skipped:
            by[s.workflow] = by.get(s.workflow, 0) + 1
        listed = ", ".join(f"{name} ({n})" for name, n in sorted(by.items()))
        out.info(f"note: skipped {len(report.skipped)} executions the code does not "
                 f"define (or whose version it no longer has): {listed}")
    if not report.ok:
        out.info(f"{len(report.broken)} executions would break: revert the change, or "
                 "version it (ctx.patched, or a new workflow version beside the old one)",
                 fg="red")
