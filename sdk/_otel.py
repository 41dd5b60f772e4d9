"""OpenTelemetry spans per execution run, step attempt and agent (the ``otel`` extra).

``TracingObserver`` is an engine ``Observer`` (see ``agentainer_flow.engine.observe``), so
it hears of live work only: replaying a history (``flow replay``, an attempt catching up
after a resume) makes no span. Spans nest: an execution run (``execution <workflow>``,
one per process that runs it, from the moment it starts there to its end or until it
stops there), its step attempts (``step <step>``), their agents (``agent <name>``, timed
by the runtime). While a step attempt's body runs, its span is the current span, so spans
the body makes (an instrumented HTTP client, a child workflow's run) are its children; an
execution started inside a span of the caller's is that span's child.

Spans carry names, numbers and outcomes (``flow.*`` attributes): never an input, a result,
an error message, an agent's environment or command, or a secret; a failure names only its
exception's class (``flow.error.type``).

Tracing is opt-in: pass ``observer=TracingObserver()`` to ``WorkflowClient`` (or
``Engine``), or call ``set_default_observer(TracingObserver())`` for every engine made
after it. ``flow worker`` and ``flow server`` trace when ``FLOW_OTEL=1``, or when the
standard ``OTEL_TRACES_EXPORTER`` (not ``none``) or ``OTEL_EXPORTER_OTLP[_TRACES]_ENDPOINT``
is set and ``FLOW_OTEL`` is not ``0`` (``tracing_from_env``); unless the process already
has a tracer provider, they install the SDK's with the exporter ``OTEL_TRACES_EXPORTER``
names (``otlp``, the default, needs ``opentelemetry-exporter-otlp``; ``console`` prints).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.observe import AttemptRef, Observer
from agentainer_flow.store._logging import get_logger

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, TracerProvider

__all__ = [
    "TracingObserver",
    "configure_tracer_provider",
    "tracing_enabled",
    "tracing_from_env",
]

log = get_logger("agentainer_flow.tracing")

_INSTALL = "pip install 'agentainer-flow[otel]'"
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})
#: run endings that are errors of the execution or of this run
_ERRORS = frozenset({"failed", "diverged", "store_error", "error"})


def _trace() -> Any:
    try:
        from opentelemetry import trace
    except ImportError:
        raise ConfigurationError(
            f"tracing needs OpenTelemetry, which is not installed: {_INSTALL}") from None
    return trace


def _ns(t: float | None) -> int | None:
    return None if t is None else int(t * 1e9)


class TracingObserver(Observer):
    """Makes OpenTelemetry spans of an engine's live work (see the module's docstring).

    ``tracer_provider``: where spans go (default: the process's global provider, as
    ``opentelemetry.trace.set_tracer_provider`` set it). Raises ``ConfigurationError``
    when ``opentelemetry-api`` is not installed.
    """

    def __init__(self, tracer_provider: TracerProvider | None = None) -> None:
        from agentainer_flow import __version__

        self._api = _trace()
        from opentelemetry import context

        self._context = context
        self._tracer = self._api.get_tracer("agentainer_flow", __version__,
                                            tracer_provider=tracer_provider)
        self._runs: dict[str, Span] = {}
        self._attempts: dict[AttemptRef, tuple[Span, Token[Context]]] = {}
        self._taken_over: set[str] = set()

    def _status(self, span: Span, outcome: str, errors: frozenset[str]) -> None:
        span.set_attribute("flow.outcome", outcome)
        if outcome in errors:
            status = self._api.Status(self._api.StatusCode.ERROR, outcome)
            span.set_status(status)

    # executions ---------------------------------------------------------------------------
    def lease_taken_over(self, execution_id: str, workflow: str, *,
                         previous_holder: str) -> None:
        self._taken_over.add(execution_id)  # said by the span of the run that follows

    def run_started(self, execution_id: str, workflow: str, *, resumed: bool) -> None:
        stale = self._runs.pop(execution_id, None)
        if stale is not None:
            stale.end()
        attributes: dict[str, Any] = {"flow.execution.id": execution_id,
                                      "flow.workflow": workflow, "flow.resumed": resumed}
        if execution_id in self._taken_over:
            self._taken_over.discard(execution_id)
            attributes["flow.taken_over"] = True
        # the caller's current span (a request, a parent step) is the parent
        self._runs[execution_id] = self._tracer.start_span(f"execution {workflow}",
                                                           attributes=attributes)

    def run_finished(self, execution_id: str, workflow: str, *, outcome: str,
                     duration: float | None) -> None:
        span = self._runs.pop(execution_id, None)
        if span is not None:
            self._status(span, outcome, _ERRORS)
            span.end()

    # step attempts ------------------------------------------------------------------------
    def step_attempt_started(self, attempt: AttemptRef, *, resumed: bool) -> None:
        run = self._runs.get(attempt.execution_id)
        parent = self._api.set_span_in_context(run) if run is not None else None
        span = self._tracer.start_span(f"step {attempt.step}", context=parent, attributes={
            "flow.execution.id": attempt.execution_id, "flow.workflow": attempt.workflow,
            "flow.step": attempt.step, "flow.step.instance": attempt.instance,
            "flow.step.attempt": attempt.attempt, "flow.resumed": resumed})
        # called in the attempt's own task: what its body does is inside this span
        token = self._context.attach(self._api.set_span_in_context(span))
        self._attempts[attempt] = (span, token)

    def step_attempt_finished(self, attempt: AttemptRef, *, outcome: str, seconds: float,
                              error_type: str | None = None) -> None:
        found = self._attempts.pop(attempt, None)
        if found is None:
            return
        span, token = found
        if error_type is not None:
            span.set_attribute("flow.error.type", error_type)
        self._status(span, outcome, frozenset({"failed", "aborted"}))
        span.end()
        self._context.detach(token)  # the same task attached it

    # agents -------------------------------------------------------------------------------
    def agent_launched(self, attempt: AttemptRef, *, agent: str, image: str,
                       agent_id: str) -> None:
        found = self._attempts.get(attempt)
        if found is not None:
            found[0].add_event("agent launched", {"flow.agent.name": agent,
                                                  "flow.agent.image": image,
                                                  "flow.agent.id": agent_id})

    def agent_finished(self, attempt: AttemptRef, *, agent: str, image: str, agent_id: str,
                       outcome: str, exit_code: int | None, started_at: float | None,
                       finished_at: float | None) -> None:
        found = self._attempts.get(attempt)
        parent = self._api.set_span_in_context(found[0]) if found is not None else None
        now = time.time()
        attributes: dict[str, Any] = {
            "flow.execution.id": attempt.execution_id, "flow.workflow": attempt.workflow,
            "flow.step": attempt.step, "flow.agent.name": agent, "flow.agent.image": image,
            "flow.agent.id": agent_id}
        if exit_code is not None:
            attributes["flow.agent.exit_code"] = exit_code
        # timed by the runtime: an agent adopted after a crash shows its whole run
        span = self._tracer.start_span(f"agent {agent}", context=parent, attributes=attributes,
                                       start_time=_ns(started_at if started_at else now))
        self._status(span, outcome, frozenset({"failed", "timed_out", "lost",
                                               "launch_failed"}))
        span.end(end_time=_ns(finished_at if finished_at else now))


# opting in from the environment ------------------------------------------------------------
def tracing_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks for traces: ``FLOW_OTEL=1`` (``0`` says no, whatever
    else is set), else a standard ``OTEL_TRACES_EXPORTER`` other than ``none`` or an OTLP
    endpoint (``OTEL_SDK_DISABLED=true`` says no)."""
    env = os.environ if environ is None else environ
    flag = env.get("FLOW_OTEL", "").strip().lower()
    if flag in _ON:
        return True
    if flag in _OFF:
        return False
    if flag:
        raise ConfigurationError(f"FLOW_OTEL={flag!r} is not understood: set it to 1 (make "
                                 "spans) or 0 (do not)")
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def tracing_from_env(environ: Mapping[str, str] | None = None) -> TracingObserver | None:
    """A ``TracingObserver`` if the environment asks for traces (``tracing_enabled``),
    with the process's tracer provider set up from it (``configure_tracer_provider``);
    else ``None``.

    Raises ``ConfigurationError`` when ``FLOW_OTEL=1`` asks for traces and the ``otel``
    extra is missing; when only ``OTEL_*`` variables ask, that is logged and nothing is
    traced (they may be meant for another program of the same environment).
    """
    env = os.environ if environ is None else environ
    if not tracing_enabled(env):
        return None
    try:
        configure_tracer_provider(env)
        return TracingObserver()
    except ConfigurationError as exc:
        if env.get("FLOW_OTEL", "").strip().lower() in _ON:
            raise
        log.warning("tracing_not_enabled", reason=str(exc))
        return None


def configure_tracer_provider(environ: Mapping[str, str] | None = None) -> None:
    """Install the OpenTelemetry SDK's tracer provider, exporting to what
    ``OTEL_TRACES_EXPORTER`` names (``otlp``, the default; ``console``; ``none``; several
    separated by commas), unless this process has a provider already (set by the
    application, or by ``opentelemetry-instrument``). ``OTEL_SERVICE_NAME`` (default
    ``agentainer-flow``) and ``OTEL_RESOURCE_ATTRIBUTES`` describe the process.
    """
    env = os.environ if environ is None else environ
    trace = _trace()
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise ConfigurationError("exporting spans needs the OpenTelemetry SDK "
                                 f"(opentelemetry-sdk is not installed): {_INSTALL}") from None
    exporters = _exporters(env, ConsoleSpanExporter)
    attributes: dict[str, Any] = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes["service.name"] = "agentainer-flow"
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # flushed and shut down at exit by the SDK


def _exporters(env: Mapping[str, str], console: Callable[[], Any]) -> list[Any]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (``console`` makes the console
    one), or ``ConfigurationError`` naming what is supported."""
    exporters: list[Any] = []
    for name in (env.get("OTEL_TRACES_EXPORTER") or "otlp").split(","):
        name = name.strip().lower()
        if name in ("", "none"):
            continue
        if name == "console":
            exporters.append(console())
        elif name == "otlp":
            exporters.append(_otlp_exporter(env))
        else:
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported by flow: use otlp, console "
                "or none, or set up a tracer provider in your program before the engine")
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    grpc = protocol == "grpc"
    package = f"opentelemetry-exporter-otlp-proto-{'grpc' if grpc else 'http'}"
    try:
        module = importlib.import_module(
            f"opentelemetry.exporter.otlp.proto.{'grpc' if grpc else 'http'}.trace_exporter")
    except ImportError:
        raise ConfigurationError(
            f"OTLP export ({protocol}) needs {package}: pip install {package} (or set "
            "OTEL_TRACES_EXPORTER=console to print spans)") from None
    return module.OTLPSpanExporter()
