"""Prometheus metrics of a process that runs or serves executions, in the text format.

``FlowMetrics`` is an engine ``Observer`` (see ``agentainer_flow.engine.observe``): the
engine tells it of live work only, never of what a replayed history holds, so each
execution start, step attempt, agent launch and lease takeover is counted once, by the
process that did it. At scrape time it adds what only the store knows, read then: queue
depth (``store.list_queues()``) and unfinished executions by status. ``flow server`` serves
it at ``GET /metrics`` (a token of scope ``read``); ``flow worker --metrics-port PORT``
serves its own (``MetricsServer``), since workers are where steps, agents and takeovers
happen. Labels are low-cardinality names (workflow, step, outcome, queue, op, status): never
an execution id, an input, a result or a secret.

The text exposition format (version 0.0.4) is written here rather than with
``prometheus_client``: it is a few dozen lines and stable; workers expose metrics without
the ``server`` extra and with no new dependency; each ``FlowMetrics`` has its own registry
(no process-global one for tests and embedded engines to share); and the store gauges are
read with ``await`` at scrape time, which ``prometheus_client``'s synchronous collectors
cannot do on the engine's loop.

Metrics (``_total``: counters; ``_seconds``: histograms; others: gauges)::

    flow_executions_started_total{workflow,queue}        new executions recorded here
    flow_executions_finished_total{workflow,outcome}     ends recorded here
    flow_execution_duration_seconds{workflow,outcome}    start to end, of those
    flow_execution_runs_active{workflow}                 executions running in this process
    flow_execution_runs_stopped_total{workflow,reason}   runs that stopped without an end
    flow_step_attempts_started_total{workflow,step}      new step attempts
    flow_step_attempts_finished_total{workflow,step,outcome}
    flow_step_attempt_duration_seconds{workflow,step,outcome}
    flow_step_attempts_interrupted_total{workflow,step,reason}
    flow_agent_launches_total{workflow,step}
    flow_agents_finished_total{workflow,step,outcome}
    flow_agent_duration_seconds{workflow,step,outcome}
    flow_lease_takeovers_total{workflow}
    flow_store_call_duration_seconds{op}
    flow_store_call_errors_total{op}
    flow_queue_depth{queue}  flow_queue_running{queue}  flow_queue_sleeping{queue}
    flow_executions{workflow,status}                     unfinished executions (store)
    flow_store_up                                        1 if the scrape read the store
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.engine.observe import RUN_ENDINGS, AttemptRef, Observer
from agentainer_flow.store import EventStore, ExecutionStatus, FlowError
from agentainer_flow.store._logging import get_logger

__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "FlowMetrics",
    "Gauge",
    "Histogram",
    "MetricsRegistry",
    "MetricsServer",
    "store_gauges",
]

log = get_logger("agentainer_flow.metrics")

#: the Content-Type of the text exposition format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: step attempts and agents: from a quick body to an hour-long agent
LONG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0, 600.0, 1800.0, 3600.0)
#: store calls: a SQLite commit to a slow Postgres round trip
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                 5.0)
#: whole executions: seconds to days
EXECUTION_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0,
                     3 * 3600.0, 6 * 3600.0, 12 * 3600.0, 86400.0, 7 * 86400.0)
_FINISHED = ("completed", "failed", "cancelled")  # attempt outcomes that are recorded
_UNFINISHED = (ExecutionStatus.PENDING, ExecutionStatus.RUNNING, ExecutionStatus.BLOCKED)


# the text format -------------------------------------------------------------------------
def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


@dataclass
class _Family(ABC):
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]

    def _key(self, values: Sequence[str]) -> tuple[str, ...]:
        if len(values) != len(self.labels):
            raise ValueError(f"metric {self.name} has labels {self.labels}, got {values!r}")
        return tuple(str(v) for v in values)

    def header(self) -> list[str]:
        text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        return [f"# HELP {self.name} {text}", f"# TYPE {self.name} {self.kind}"]

    @abstractmethod
    def lines(self) -> list[str]:
        """The family's samples in the text exposition format."""


@dataclass
class Counter(_Family):
    """A count that only grows (its name ends in ``_total``)."""

    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot go down (inc by {amount})")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labels, k)} {_number(v)}"
                for k, v in sorted(self.values.items())]


@dataclass
class Gauge(_Family):
    """A value that goes up and down."""

    values: dict[tuple[str, ...], float] = field(default_factory=dict)

    def set(self, value: float, *labels: str) -> None:
        self.values[self._key(labels)] = float(value)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def dec(self, *labels: str, amount: float = 1.0) -> None:
        self.inc(*labels, amount=-amount)

    def value(self, *labels: str) -> float:
        return self.values.get(self._key(labels), 0.0)

    def lines(self) -> list[str]:
        return [f"{self.name}{_labels(self.labels, k)} {_number(v)}"
                for k, v in sorted(self.values.items())]


@dataclass
class Histogram(_Family):
    """Observations counted in cumulative buckets, with their sum and count."""

    buckets: tuple[float, ...] = LONG_BUCKETS
    #: per label values: the count in each bucket (not cumulative), the sum, the count
    values: dict[tuple[str, ...], tuple[list[int], float, int]] = field(default_factory=dict)

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        counts, total, n = self.values.get(key) or ([0] * len(self.buckets), 0.0, 0)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                counts[i] += 1
                break
        self.values[key] = (counts, total + value, n + 1)

    def count(self, *labels: str) -> int:
        found = self.values.get(self._key(labels))
        return found[2] if found else 0

    def lines(self) -> list[str]:
        out: list[str] = []
        names = (*self.labels, "le")
        for key, (counts, total, n) in sorted(self.values.items()):
            running = 0
            for bound, c in zip(self.buckets, counts, strict=True):
                running += c
                out.append(f"{self.name}_bucket{_labels(names, (*key, _number(bound)))} "
                           f"{running}")
            out.append(f"{self.name}_bucket{_labels(names, (*key, '+Inf'))} {n}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {n}")
        return out


class MetricsRegistry:
    """Metric families by name, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self.families: dict[str, _Family] = {}

    def _add(self, family: _Family) -> None:
        if family.name in self.families:
            raise ValueError(f"metric {family.name} is declared twice")
        self.families[family.name] = family

    def counter(self, name: str, help: str, labels: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must be named *_total")
        family = Counter(name, help, "counter", tuple(labels))
        self._add(family)
        return family

    def gauge(self, name: str, help: str, labels: Sequence[str] = ()) -> Gauge:
        family = Gauge(name, help, "gauge", tuple(labels))
        self._add(family)
        return family

    def histogram(self, name: str, help: str, labels: Sequence[str] = (),
                  buckets: Sequence[float] = LONG_BUCKETS) -> Histogram:
        if "le" in labels:
            raise ValueError(f"histogram {name}: 'le' is the bucket label")
        family = Histogram(name, help, "histogram", tuple(labels),
                           buckets=tuple(sorted(buckets)))
        self._add(family)
        return family

    def render(self, more: Iterable[MetricsRegistry] = ()) -> str:
        """The text exposition of these families (and those of ``more``)."""
        out: list[str] = []
        for registry in (self, *more):
            for family in registry.families.values():
                out += family.header()
                out += family.lines()
        return "\n".join(out) + "\n"


# the flow metrics ------------------------------------------------------------------------
class FlowMetrics(Observer):
    """The Prometheus metrics of the engine that has it as observer, and of the store at
    scrape time (``exposition``). Attach it with ``Engine(observer=...)``, ``combine`` or
    ``Worker(metrics_port=...)``."""

    def __init__(self) -> None:
        r = self.registry = MetricsRegistry()
        self.executions_started = r.counter(
            "flow_executions_started_total", "Executions recorded by this process.",
            ["workflow", "queue"])
        self.executions_finished = r.counter(
            "flow_executions_finished_total", "Executions whose end this process recorded, "
            "by outcome (completed, failed, cancelled).", ["workflow", "outcome"])
        self.execution_duration = r.histogram(
            "flow_execution_duration_seconds", "Time from an execution's start to its end, "
            "for the ends this process recorded.", ["workflow", "outcome"],
            EXECUTION_BUCKETS)
        self.runs_active = r.gauge(
            "flow_execution_runs_active", "Executions this process is running now.",
            ["workflow"])
        self.runs_stopped = r.counter(
            "flow_execution_runs_stopped_total", "Runs that stopped here without ending "
            "the execution (suspended, handed_back, blocked, lease_lost, diverged, "
            "store_error, stopped, error).", ["workflow", "reason"])
        self.attempts_started = r.counter(
            "flow_step_attempts_started_total", "Step attempts started by this process "
            "(an attempt resumed after a crash is not started again).", ["workflow", "step"])
        self.attempts_finished = r.counter(
            "flow_step_attempts_finished_total", "Step attempt bodies that ended here with a "
            "recorded outcome (completed, failed, cancelled).", ["workflow", "step", "outcome"])
        self.attempt_duration = r.histogram(
            "flow_step_attempt_duration_seconds", "Time a step attempt's body ran in this "
            "process, by recorded outcome.", ["workflow", "step", "outcome"])
        self.attempts_interrupted = r.counter(
            "flow_step_attempts_interrupted_total", "Step attempt bodies that stopped here "
            "without an outcome and run again later (blocked, interrupted, aborted).",
            ["workflow", "step", "reason"])
        self.agent_launches = r.counter(
            "flow_agent_launches_total", "Agents launched (never twice for one deploy_agent "
            "command, adopted agents are not counted).", ["workflow", "step"])
        self.agents_finished = r.counter(
            "flow_agents_finished_total", "Agent outcomes recorded here (completed, failed, "
            "timed_out, lost, launch_failed).", ["workflow", "step", "outcome"])
        self.agent_duration = r.histogram(
            "flow_agent_duration_seconds", "Agent run time as the runtime measured it.",
            ["workflow", "step", "outcome"])
        self.lease_takeovers = r.counter(
            "flow_lease_takeovers_total", "Executions this process took over from another "
            "process (dead, or its lease expired).", ["workflow"])
        self.store_seconds = r.histogram(
            "flow_store_call_duration_seconds", "Store calls of the engine (append, load, "
            "claim, renew_lease).", ["op"], STORE_BUCKETS)
        self.store_errors = r.counter(
            "flow_store_call_errors_total", "Store calls that raised (a conflict or lost "
            "lease included).", ["op"])

    # the observer ---------------------------------------------------------------------
    def execution_started(self, execution_id: str, workflow: str, *, queue: str) -> None:
        self.executions_started.inc(workflow, queue)

    def run_started(self, execution_id: str, workflow: str, *, resumed: bool) -> None:
        self.runs_active.inc(workflow)

    def run_finished(self, execution_id: str, workflow: str, *, outcome: str,
                     duration: float | None) -> None:
        self.runs_active.dec(workflow)
        if outcome not in RUN_ENDINGS:
            self.runs_stopped.inc(workflow, outcome)
            return
        self.executions_finished.inc(workflow, outcome)
        if duration is not None:
            self.execution_duration.observe(duration, workflow, outcome)

    def step_attempt_started(self, attempt: AttemptRef, *, resumed: bool) -> None:
        if not resumed:
            self.attempts_started.inc(attempt.workflow, attempt.step)

    def step_attempt_finished(self, attempt: AttemptRef, *, outcome: str, seconds: float,
                              error_type: str | None = None) -> None:
        if outcome not in _FINISHED:
            self.attempts_interrupted.inc(attempt.workflow, attempt.step, outcome)
            return
        self.attempts_finished.inc(attempt.workflow, attempt.step, outcome)
        self.attempt_duration.observe(seconds, attempt.workflow, attempt.step, outcome)

    def agent_launched(self, attempt: AttemptRef, *, agent: str, image: str,
                       agent_id: str) -> None:
        self.agent_launches.inc(attempt.workflow, attempt.step)

    def agent_finished(self, attempt: AttemptRef, *, agent: str, image: str, agent_id: str,
                       outcome: str, exit_code: int | None, started_at: float | None,
                       finished_at: float | None) -> None:
        self.agents_finished.inc(attempt.workflow, attempt.step, outcome)
        if started_at is not None and finished_at is not None:
            self.agent_duration.observe(max(0.0, finished_at - started_at), attempt.workflow,
                                        attempt.step, outcome)

    def lease_taken_over(self, execution_id: str, workflow: str, *,
                         previous_holder: str) -> None:
        self.lease_takeovers.inc(workflow)

    def store_call(self, op: str, seconds: float, *, ok: bool) -> None:
        self.store_seconds.observe(seconds, op)
        if not ok:
            self.store_errors.inc(op)

    # scraping -------------------------------------------------------------------------
    async def exposition(self, store: EventStore | None = None) -> str:
        """The text exposition: this process's metrics, and with ``store`` the store-wide
        gauges read now. Every process that exposes them reports the same store-wide
        values: aggregate those with ``max``, not ``sum``."""
        more = [await store_gauges(store)] if store is not None else []
        return self.registry.render(more)


async def store_gauges(store: EventStore) -> MetricsRegistry:
    """Queue depth and unfinished executions by status, read from the store now; a store
    that cannot be read gives ``flow_store_up 0`` (the scrape still answers)."""
    r = MetricsRegistry()
    up = r.gauge("flow_store_up", "1 if this scrape could read the store, else 0.")
    depth = r.gauge("flow_queue_depth", "Executions waiting for a worker, by queue (not "
                    "the blocked ones: see flow_executions).", ["queue"])
    running = r.gauge("flow_queue_running", "Executions held by a live lease, by queue.",
                      ["queue"])
    sleeping = r.gauge("flow_queue_sleeping", "Executions waiting for a timer, holding "
                       "nothing, by queue.", ["queue"])
    by_status = r.gauge("flow_executions", "Unfinished executions in the store, by "
                        "workflow and status (pending, running, blocked).",
                        ["workflow", "status"])
    try:
        queues = await store.list_queues()
        unfinished = await store.list_executions(statuses=list(_UNFINISHED), limit=None)
    except (FlowError, OSError) as exc:
        log.warning("metrics_store_unreadable", error_type=type(exc).__name__, error=str(exc))
        up.set(0)
        return r
    up.set(1)
    for record in unfinished:
        by_status.inc(record.workflow_name, record.status.value)
    for q in queues:
        name = q.config.name
        depth.set(q.pending, name)  # blocked ones are not in it: no worker can claim them
        running.set(q.running, name)
        sleeping.set(q.sleeping, name)
    return r


# a /metrics endpoint for workers -----------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}
_MAX_REQUEST = 16 * 1024  # bytes of request line and headers
_READ_TIMEOUT = 10.0


class MetricsServer:
    """A minimal HTTP/1.1 server on the running loop: ``GET /metrics`` answers what
    ``render`` returns, in the text format; anything else is 404 (405 for another method).

    It takes no token: bind it (``host``, default ``127.0.0.1``) to an address only your
    Prometheus reaches. What it shows holds names and counts, no ids, inputs, results or
    secrets. ``port`` 0 picks a free port (``port`` says which once started).
    """

    def __init__(self, render: Callable[[], Awaitable[str]], *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self._render = render
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def start(self) -> None:
        """Listen; raises ``ConfigurationError`` if the address cannot be had."""
        try:
            self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                      limit=_MAX_REQUEST)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror or exc}; "
                "pick another port (--metrics-port; 0: any free one)") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ConnectionError):
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                await self._answer(writer, 400, "a request line is METHOD PATH VERSION\n")
                return
            method, target, _version = parts
            if target.split("?", 1)[0] != "/metrics":
                await self._answer(writer, 404, "metrics are at /metrics\n")
            elif method not in ("GET", "HEAD"):
                await self._answer(writer, 405, "use GET\n", allow="GET, HEAD")
            else:
                try:
                    body = await self._render()
                except Exception as exc:
                    log.error("metrics_render_failed", error_type=type(exc).__name__,
                              error=str(exc))
                    await self._answer(writer, 500, "rendering the metrics failed; the "
                                       "worker's log says why\n")
                    return
                await self._answer(writer, 200, body, content_type=CONTENT_TYPE,
                                   head=method == "HEAD")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, body: str, *,
                      content_type: str = "text/plain; charset=utf-8", allow: str | None = None,
                      head: bool = False) -> None:
        data = body.encode("utf-8")
        lines = [f"HTTP/1.1 {status} {_REASONS[status]}", f"Content-Type: {content_type}",
                 f"Content-Length: {len(data)}", "Connection: close"]
        if allow:
            lines.append(f"Allow: {allow}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not head:
            writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
