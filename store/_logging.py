"""The library's loggers: silent until the application configures logging.

A library must not print. structlog's built-in defaults write every entry to stdout, so an
application that merely imported agentainer-flow would see ``[info] execution_started``
lines mixed into its own output. The loggers made here decide at each call where an entry
goes:

- the application configured structlog (``structlog.configure``, as the ``flow`` CLI and
  ``structlog.testing.capture_logs`` do): through that configuration, as any structlog
  logger, with the logger's name as the factory argument;
- otherwise: to the standard library logger of the same name (``agentainer_flow``,
  ``agentainer_flow.store``...), rendered as ``event key=value ...``. That logger has a
  ``NullHandler``, so nothing is printed unless the application configures ``logging``
  (``logging.basicConfig(level="INFO")`` shows the engine's entries).

All three layers log through ``get_logger``; it lives in the store, the lowest layer, so that
each may import it.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

__all__ = ["ROOT_LOGGER", "FlowLogger", "get_logger"]

#: The standard library logger every library logger is a child of.
ROOT_LOGGER = "agentainer_flow"

# no "No handlers could be found" and no last-resort printing of warnings to stderr
logging.getLogger(ROOT_LOGGER).addHandler(logging.NullHandler())


def _render(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
    """``event key=value ...`` as the record's message; exceptions go to the record itself
    so that the application's formatter prints them."""
    kwargs: dict[str, Any] = {}
    for key in ("exc_info", "stack_info"):
        if event.get(key):
            kwargs[key] = event.pop(key)
        else:
            event.pop(key, None)
    text = str(event.pop("event", ""))
    fields = " ".join(f"{key}={value!r}" for key, value in sorted(event.items()))
    return (f"{text} {fields}" if fields else text,), kwargs


_STDLIB_PROCESSORS: list[Any] = []


def _structlog() -> Any:
    """structlog, imported at the first entry: importing this library (``flow --help``)
    does not pay for it (a tenth of a second, most of it the ``rich`` it pulls in)."""
    import structlog

    if not _STDLIB_PROCESSORS:
        _STDLIB_PROCESSORS[:] = [structlog.stdlib.filter_by_level, _render]
    return structlog


class FlowLogger:
    """A structlog-style logger (``info``, ``warning``, ``bind``...) that follows the
    application's logging configuration, or stays silent without one (see the module)."""

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    @property
    def name(self) -> str:
        return self._name

    def bind(self, **fields: Any) -> FlowLogger:
        """A logger that adds ``fields`` to every entry."""
        return FlowLogger(self._name, {**self._context, **fields})

    def _target(self) -> Any:
        structlog = _structlog()
        if structlog.is_configured():
            return structlog.get_logger(self._name, **self._context)
        return structlog.stdlib.BoundLogger(
            logging.getLogger(self._name), _STDLIB_PROCESSORS, dict(self._context))

    def debug(self, event: str, **fields: Any) -> None:
        self._target().debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._target().info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._target().warning(event, **fields)

    warn = warning

    def error(self, event: str, **fields: Any) -> None:
        self._target().error(event, **fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._target().critical(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._target().exception(event, **fields)

    def __repr__(self) -> str:
        return f"FlowLogger({self._name!r}, {self._context!r})"


def get_logger(name: str = ROOT_LOGGER) -> FlowLogger:
    """The library's logger called ``name`` (a child of ``agentainer_flow``)."""
    if name != ROOT_LOGGER and not name.startswith(ROOT_LOGGER + "."):
        raise ValueError(f"library logger names start with {ROOT_LOGGER!r}, got {name!r}")
    return FlowLogger(name)
