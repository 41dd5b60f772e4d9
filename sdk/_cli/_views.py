"""Views several commands print: the event timeline (with marks, for ``replay``), the
per-step summary (``history``, ``status``, ``replay --until``) and the links of forks."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from agentainer_flow.store import ExecutionRecord

from .._events import ExecutionEvent
from .._summary import StepSummary
from ._output import dur, jsonable, out, ts

__all__ = ["fork_lines", "short", "step_label", "steps_json", "steps_table", "timeline",
           "where"]

#: characters of a result or error shown in a table cell
CELL = 100


def where(ev: ExecutionEvent) -> str:
    """``step[instance]`` (``#attempt`` after the first) of a step's event, else ``""``."""
    if ev.step is None:
        return ""
    text = f"{ev.step}[{ev.instance or 0}]"
    return text + (f"#{ev.attempt}" if ev.attempt and ev.attempt > 1 else "")


def timeline(events: Sequence[ExecutionEvent], *, marks: Mapping[int, str] | None = None
             ) -> None:
    """The events as a table: seq, time, type, step, message; ``marks`` (by seq) adds a
    ``>>`` column and a note on the rows it names."""
    if not marks:
        out.table(["seq", "time", "type", "step", "message"],
                  [(str(e.seq), ts(e.timestamp.timestamp(), ms=True), e.type, where(e),
                    e.message) for e in events], wrap=("message",))
        return
    out.table([" ", "seq", "time", "type", "step", "message", "note"],
              [(">>" if e.seq in marks else "", str(e.seq),
                ts(e.timestamp.timestamp(), ms=True), e.type, where(e), e.message,
                marks.get(e.seq, "")) for e in events], wrap=("message", "note"))


def short(text: str, width: int = CELL) -> str:
    """One line of at most ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def step_label(s: StepSummary, many: bool) -> str:
    """``step`` alone, or ``step[i]`` for the instances of a step that has several."""
    return f"{s.step}[{s.instance}]" if many else s.step


def _outcome(s: StepSummary) -> str:
    if s.status == "completed":
        return "(no items)" if s.note == "no items" else short(
            json.dumps(jsonable(s.result), ensure_ascii=False, default=str))
    if s.status == "skipped":
        return short(s.note)
    if s.error is not None:
        text = s.error  # its type is in --json; the message is what people read
        if s.status == "retrying" and s.retry_at is not None:
            text = f"retry at {ts(s.retry_at)}; {text}"
        return short(text)
    return ""


def steps_table(summaries: Sequence[StepSummary]) -> None:
    """The per-step summary: step, status, attempts, duration, result or error, agents."""
    if not summaries:
        out.info("no step has started")
        return
    counts: dict[str, int] = {}
    for s in summaries:
        counts[s.step] = counts.get(s.step, 0) + 1
    out.table(
        ["step", "status", "attempts", "duration", "result / error", "agents"],
        [(step_label(s, counts[s.step] > 1), s.status, str(s.attempts) if s.attempts else "-",
          dur(s.duration), _outcome(s),
          ", ".join(f"{a.name} ({a.status})" for a in s.agents) + (
              (", " if s.agents else "") + ", ".join(f"child {c}" for c in s.children)
              if s.children else ""))
         for s in summaries],
        wrap=("result / error", "agents"))


def steps_json(summaries: Sequence[StepSummary]) -> list[dict[str, Any]]:
    """The per-step summary as ``--json`` prints it."""
    return [s.to_dict() for s in summaries]


def fork_lines(origin: Mapping[str, str] | None, forks: Sequence[ExecutionRecord],
               fork_steps: Mapping[str, str]) -> list[tuple[str, str]]:
    """``key  value`` lines linking a fork and its original, both ways."""
    lines: list[tuple[str, str]] = []
    if origin is not None:
        lines.append(("forked", f"from {origin['execution_id']} at step {origin['step']!r}"))
    for n, f in enumerate(forks):
        step = fork_steps.get(f.id, "")
        at = f" at step {step!r}" if step else ""
        lines.append(("forks" if n == 0 else "", f"{f.id}{at} ({f.status.value})"))
    return lines
