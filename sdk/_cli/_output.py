"""The one output layer of ``flow``: tables and lines for people, ``--json`` for scripts.

Everything printed goes through :data:`out`, so secret values (given with ``--secret`` or
found in ``FLOW_SECRET_*``) are redacted from all of it, engine logs included.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import typer

from agentainer_flow.engine import values
from agentainer_flow.engine.secrets import Redactor
from agentainer_flow.store import FlowError

__all__ = ["Output", "configure_logging", "dur", "iso", "jsonable", "out", "ts"]


class Output:
    """Everything printed goes through here, so secret values are always redacted."""

    def __init__(self) -> None:
        self._secrets: dict[str, str] = {}
        self.redactor = Redactor({})
        self.running: str | None = None  # the execution this process runs, for ^C
        self.watching = False  # a ``--watch`` view: Ctrl-C is how it ends
        self.reset()

    def reset(self) -> None:
        """Forget what an earlier invocation learnt: only ``FLOW_SECRET_*`` is known."""
        self._secrets = {
            k[len("FLOW_SECRET_"):].lower(): v for k, v in os.environ.items()
            if k.startswith("FLOW_SECRET_") and v
        }
        self.redactor = Redactor(self._secrets)
        self.running = None
        self.watching = False

    def add_secrets(self, secrets: Mapping[str, str]) -> None:
        self._secrets.update(secrets)
        self.redactor = Redactor(self._secrets)

    def clean(self, text: str) -> str:
        return self.redactor.text(text)

    def out(self, text: str = "") -> None:
        typer.echo(self.clean(text))

    def progress(self, text: str) -> None:
        """A line of a long-running command's progress (a worker's), flushed at once; a
        plain write, without ``echo``'s terminal checks at every line."""
        stream = sys.stdout
        stream.write(self.clean(text) + "\n")
        stream.flush()

    def info(self, text: str, *, fg: str | None = None) -> None:
        typer.secho(self.clean(text), err=True, fg=fg)

    def error(self, text: str) -> None:
        typer.secho("error: " + self.clean(text), err=True, fg="red")

    def json(self, data: Any) -> None:
        # redacted before encoding, so a value JSON would escape is still found
        typer.echo(json.dumps(self.redactor.tree(jsonable(data)), indent=2, ensure_ascii=False))

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

    def fields(self, rows: Sequence[tuple[str, str]], *,
               colors: Mapping[str, str] | None = None) -> None:
        """``key  value`` lines, aligned; ``colors`` paints the value of some keys."""
        for key, value in rows:
            color = (colors or {}).get(key)
            shown = typer.style(self.clean(value), fg=color) if color else self.clean(value)
            typer.echo(f"{key:<10} {shown}")


#: the output of this process (``main`` resets it at each invocation)
out = Output()


def jsonable(value: Any) -> Any:
    """A JSON tree of ``value`` (or its ``str`` when it has none)."""
    try:
        return values.to_jsonable(value)
    except FlowError:
        return str(value)


def configure_logging(verbose: int, quiet_level: int) -> None:
    """Engine logs go to stderr (stdout is for results), JSON unless stderr is a terminal.

    Without ``-v`` only ``quiet_level`` and above are shown; ``$FLOW_LOG_LEVEL`` overrides.
    """
    name = os.environ.get("FLOW_LOG_LEVEL", "").upper()
    level = {0: quiet_level, 1: logging.INFO}.get(verbose, logging.DEBUG)
    if name in logging.getLevelNamesMapping():
        level = logging.getLevelNamesMapping()[name]

    def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
        redacted: dict[str, Any] = out.redactor.tree(dict(event))
        return redacted

    def redact_rendered(_: Any, __: str, line: Any) -> Any:
        # values the tree pass cannot see (objects rendered with str()) are redacted here
        return out.clean(line) if isinstance(line, str) else line

    structlog = _structlog()
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


def _structlog() -> Any:
    """structlog, imported without ``rich`` where this process has imported neither yet.

    structlog's console renderer formats tracebacks with ``rich`` when it can import it,
    and importing it (with ``pygments``) took a tenth of a second of every start of
    ``flow``, for the rare logged exception; without it they are printed as Python prints
    them. A process that imported either first (an application running the CLI in-process,
    the tests) keeps what it has.
    """
    if "structlog" not in sys.modules and "rich" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]  # ImportError for structlog
        try:
            import structlog
        finally:
            del sys.modules["rich"]
    import structlog

    return structlog


def ts(t: float | None, *, ms: bool = False) -> str:
    """A unix time as ``2024-05-01 12:00:00Z`` (UTC), or ``-``."""
    if t is None:
        return "-"
    when = dt.datetime.fromtimestamp(t, dt.UTC)
    return when.isoformat(sep=" ", timespec="milliseconds" if ms else "seconds").replace(
        "+00:00", "Z")


def dur(seconds: float | None) -> str:
    """A duration as people read it: ``350ms``, ``4.2s``, ``3m05s``, ``2h10m``."""
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


def iso(t: float | None) -> str | None:
    """A unix time as ISO 8601 (UTC) for JSON, or ``None``."""
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat()
