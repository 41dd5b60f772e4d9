"""``/metrics``: the Prometheus text format, read back by a strict parser of it.

Against real processes: a ``flow server`` (its token rules, the executions it started, the
store's queue depth and executions by status read at each scrape) and a ``flow worker
--metrics-port`` that ran executions (its step attempts, agents, retries, blocked runs and
store calls, each counted once) and, with ``FLOW_OTEL=1``, printed its spans.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentainer_flow import ConfigurationError
from agentainer_flow._metrics import (
    CONTENT_TYPE,
    FlowMetrics,
    MetricsRegistry,
    MetricsServer,
    store_gauges,
)
from agentainer_flow.engine.observe import AttemptRef
from agentainer_flow.store import MemoryEventStore, StoreUnavailableError

from .conftest import LAUNCH, ROOT, Stack, free_port, process_env

# a strict reader of the text format (0.0.4) ------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{.*\}})?[ \t]+(\S+)([ \t]+-?\d+)?$")
_LABEL = re.compile(r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)="')
_TYPES = ("counter", "gauge", "histogram", "summary", "untyped")


def _float(text: str) -> float:
    return {"+Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}.get(text) or float(text)


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        found = _LABEL.match(text, i)
        assert found, f"bad label at {text[i:]!r}"
        name, i = found.group(1), found.end()
        value: list[str] = []
        while text[i] != '"':
            if text[i] == "\\":
                value.append({"\\": "\\", "n": "\n", '"': '"'}[text[i + 1]])
                i += 2
            else:
                assert text[i] != "\n"
                value.append(text[i])
                i += 1
        i += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = "".join(value)
        if i < len(text):
            assert text[i] == ",", f"expected ',' at {text[i:]!r}"
            i += 1
    return labels


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


@dataclass
class Scrape:
    families: dict[str, Family]

    def value(self, metric: str, /, **labels: str) -> float:
        """The value of the one sample ``metric`` with exactly these labels (0 if none)."""
        found = [v for fam in self.families.values() for n, ls, v in fam.samples
                 if n == metric and ls == labels]
        assert len(found) <= 1, (metric, labels)
        return found[0] if found else 0.0

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(ls, v) for fam in self.families.values() for n, ls, v in fam.samples
                if n == name]


def parse(text: str) -> Scrape:
    """Parse and check an exposition: declared families, no sample before its TYPE, valid
    names and labels, counters never negative, histograms cumulative with a +Inf bucket
    equal to their count."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    seen_samples: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, kind, name, *rest = line.split(" ", 3)
            assert re.fullmatch(_NAME, name), name
            fam = families.setdefault(name, Family(name))
            if kind == "TYPE":
                assert name not in seen_samples, f"TYPE of {name} after its samples"
                assert rest and rest[0] in _TYPES, line
                fam.type = rest[0]
            else:
                fam.help = rest[0] if rest else ""
            continue
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.group(1), match.group(2), match.group(3)
        owner = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and families.get(name[:-len(suffix)], Family("")).type \
                    == "histogram":
                owner = name[:-len(suffix)]
        assert owner in families, f"sample {name} of no declared family"
        seen_samples.add(owner)
        families[owner].samples.append((name, _labels(labels[1:-1]) if labels else {},
                                        _float(value)))
    for fam in families.values():
        if fam.type == "counter":
            assert fam.name.endswith("_total")
            assert all(v >= 0 for _, _, v in fam.samples), fam.name
        if fam.type == "histogram":
            series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
            counts: dict[tuple[tuple[str, str], ...], float] = {}
            for n, ls, v in fam.samples:
                key = tuple(sorted((k, x) for k, x in ls.items() if k != "le"))
                if n.endswith("_bucket"):
                    series.setdefault(key, []).append((_float(ls["le"]), v))
                elif n.endswith("_count"):
                    counts[key] = v
            assert set(series) == set(counts), fam.name
            for key, buckets in series.items():
                bounds = [b for b, _ in buckets]
                assert bounds == sorted(bounds) and bounds[-1] == math.inf, fam.name
                values = [v for _, v in buckets]
                assert values == sorted(values), f"{fam.name} buckets not cumulative"
                assert values[-1] == counts[key]
    return Scrape(families)


# the format -------------------------------------------------------------------------------
def test_the_exposition_escapes_labels_and_keeps_histograms_cumulative() -> None:
    r = MetricsRegistry()
    c = r.counter("demo_total", "A counter.\nSecond line \\ with a backslash.", ["name"])
    g = r.gauge("demo_level", "A gauge.")
    h = r.histogram("demo_seconds", "A histogram.", ["op"], buckets=[1.0, 0.1, 10.0])
    c.inc('odd "quoted"\\name\nline')
    c.inc("plain", amount=2.5)
    g.set(-3)
    for v in (0.05, 0.5, 0.5, 20.0):
        h.observe(v, "x")
    scrape = parse(r.render())
    assert scrape.value("demo_total", name='odd "quoted"\\name\nline') == 1
    assert scrape.value("demo_total", name="plain") == 2.5
    assert scrape.value("demo_level") == -3
    assert [v for ls, v in scrape.samples("demo_seconds_bucket")] == [1, 3, 3, 4]
    assert scrape.value("demo_seconds_sum", op="x") == pytest.approx(21.05)
    assert scrape.families["demo_total"].help == \
        "A counter.\\nSecond line \\\\ with a backslash."  # escaped as the format says
    with pytest.raises(ValueError, match="cannot go down"):
        c.inc("plain", amount=-1)
    with pytest.raises(ValueError, match="labels"):
        c.inc("a", "b")
    with pytest.raises(ValueError, match="_total"):
        r.counter("demo", "no suffix")
    with pytest.raises(ValueError, match="twice"):
        r.gauge("demo_level", "again")


async def test_an_unreadable_store_is_a_gauge_not_a_failed_scrape() -> None:
    class Down(MemoryEventStore):
        async def list_queues(self) -> Any:
            raise StoreUnavailableError("the database is down")

    scrape = parse((await store_gauges(Down())).render())
    assert scrape.value("flow_store_up") == 0
    scrape = parse((await store_gauges(MemoryEventStore())).render())
    assert scrape.value("flow_store_up") == 1


def test_the_flow_metrics_count_by_outcome() -> None:
    m = FlowMetrics()
    ref = AttemptRef("e1", "wf", "s", 0, 1)
    m.run_started("e1", "wf", resumed=False)
    m.step_attempt_started(ref, resumed=False)
    m.step_attempt_started(ref, resumed=True)  # a resume: not a new attempt
    m.step_attempt_finished(ref, outcome="completed", seconds=0.2)
    m.step_attempt_finished(ref, outcome="interrupted", seconds=0.1)
    m.run_finished("e1", "wf", outcome="completed", duration=3.0)
    m.run_finished("e2", "wf", outcome="diverged", duration=None)
    scrape = parse(m.registry.render())
    assert scrape.value("flow_step_attempts_started_total", workflow="wf", step="s") == 1
    assert scrape.value("flow_step_attempts_finished_total", workflow="wf", step="s",
                        outcome="completed") == 1
    assert scrape.value("flow_step_attempts_interrupted_total", workflow="wf", step="s",
                        reason="interrupted") == 1
    assert scrape.value("flow_executions_finished_total", workflow="wf",
                        outcome="completed") == 1
    assert scrape.value("flow_execution_runs_stopped_total", workflow="wf",
                        reason="diverged") == 1
    assert scrape.value("flow_execution_duration_seconds_count", workflow="wf",
                        outcome="completed") == 1


async def test_the_metrics_server_answers_only_get_metrics() -> None:
    async def render() -> str:
        return "# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n"

    async with MetricsServer(render) as server:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
            ok = await http.get("/metrics")
            assert ok.status_code == 200 and ok.headers["content-type"] == CONTENT_TYPE
            assert parse(ok.text).value("x_total") == 1
            assert (await http.get("/metrics?x=1")).status_code == 200
            assert (await http.head("/metrics")).content == b""
            assert (await http.get("/")).status_code == 404
            refused = await http.post("/metrics")
            assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
        # a client that sends garbage, or nothing, gets an answer or a closed connection
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"NONSENSE\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        with pytest.raises(ConfigurationError, match="--metrics-port"):
            async with MetricsServer(render, port=server.port):
                pass


# a real server and a real worker -----------------------------------------------------------
_WORKFLOWS = '''
from agentainer_flow import Context, RetryPolicy, step, workflow


@workflow(name="metrics_flow")
class MetricsFlow:
    @step()
    async def launch(self, ctx: Context) -> int:
        agent = await ctx.deploy_agent("tiny", "tiny:1")
        return int((await agent.wait_for_completion())["n"])

    @step(depends_on=["launch"], retry_policy=RetryPolicy(max_attempts=2,
          initial_delay="10ms", backoff="fixed"))
    async def flaky(self, ctx: Context, launch_result: int) -> int:
        if ctx.attempt == 1:
            raise ConnectionError("the first attempt fails")
        return launch_result + 1


@workflow(name="metrics_blocked")
class Blocked:
    @step()
    async def wants(self, ctx: Context) -> int:
        return len(ctx.secrets["never_given"])
'''
_AGENT = f"tiny:1={sys.executable} -c 'print(\"{{\\\"n\\\": 2}}\")'"


def _spawn_server(stack: Stack, workflows: Path) -> None:
    stack.server = stack._spawn("server", [
        sys.executable, str(LAUNCH), "server", "--store", stack.store, "--port",
        str(stack.port), "-m", str(workflows)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert stack.server.poll() is None, stack.log("server")
        try:
            if httpx.get(f"{stack.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"flow server did not answer within 60 s:\n{stack.log('server')}")


def _spawn_worker(stack: Stack, workflows: Path, metrics_port: int) -> None:
    log = (stack.folder / "worker.log").open("ab")
    try:
        stack.worker = subprocess.Popen(
            [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(workflows),
             "--store", stack.store, "--runtime", "process", "--image", _AGENT,
             "--poll-interval", "0.1", "--grace", "0", "--metrics-port", str(metrics_port)],
            env=process_env(FLOW_OTEL="1", OTEL_TRACES_EXPORTER="console",
                            OTEL_BSP_SCHEDULE_DELAY="50", OTEL_SERVICE_NAME="metrics-test"),
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _wait_for(what: str, check: Any, stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n--- worker ---\n{stack.log('worker')}")


@pytest.fixture
def stack(store_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A server on a fresh store, with tokens; the test starts the worker."""
    made = Stack(store=store_url, folder=tmp_path)
    made.make_tokens()
    workflows = tmp_path / "metrics_workflows.py"
    workflows.write_text(_WORKFLOWS)
    try:
        _spawn_server(made, workflows)
        yield made
    finally:
        made.stop()


def _scrape(url: str, token: str | None = None) -> tuple[Scrape, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.get(url, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == CONTENT_TYPE
    return parse(answer.text), answer.text


def test_server_and_worker_metrics_count_each_piece_of_work_once(stack: Stack,
                                                                 tmp_path: Path) -> None:
    metrics_url = f"{stack.url}/metrics"
    # every route but /health needs a token, /metrics too; never in a query string
    assert httpx.get(metrics_url).status_code == 401
    assert httpx.get(metrics_url, headers={"Authorization": "Bearer afl_nope"}
                     ).status_code == 401
    assert httpx.get(f"{metrics_url}?token={stack.token('read')}").status_code == 400
    _scrape(metrics_url, stack.token("read"))  # read is enough

    with stack.http("write") as http:
        ids = [http.post("/v1/executions", json={"workflow": "metrics_flow"}).json()["id"]
               for _ in range(3)]
        blocked = http.post("/v1/executions", json={"workflow": "metrics_blocked"}).json()["id"]
    server, _ = _scrape(metrics_url, stack.token("read"))
    assert server.value("flow_executions_started_total", workflow="metrics_flow",
                        queue="default") == 3
    assert server.value("flow_queue_depth", queue="default") == 4
    assert server.value("flow_executions", workflow="metrics_flow", status="pending") == 3
    assert server.value("flow_store_up") == 1
    assert server.value("flow_store_call_duration_seconds_count", op="create_execution") == 4

    port = free_port()
    _spawn_worker(stack, tmp_path / "metrics_workflows.py", port)

    def status(eid: str) -> str:
        with stack.http("read") as http:
            return str(http.get(f"/v1/executions/{eid}").json()["status"])

    _wait_for("the executions to end", lambda: [status(e) for e in ids] == ["completed"] * 3
              and status(blocked) == "blocked", stack)
    worker, text = _scrape(f"http://127.0.0.1:{port}/metrics")
    for eid in (*ids, blocked):
        assert eid not in text  # labels are names, never ids
    wf = {"workflow": "metrics_flow"}
    assert worker.value("flow_executions_finished_total", **wf, outcome="completed") == 3
    assert worker.value("flow_execution_duration_seconds_count", **wf,
                        outcome="completed") == 3
    assert worker.value("flow_step_attempts_started_total", **wf, step="launch") == 3
    assert worker.value("flow_step_attempts_started_total", **wf, step="flaky") == 6
    assert worker.value("flow_step_attempts_finished_total", **wf, step="flaky",
                        outcome="failed") == 3
    assert worker.value("flow_step_attempts_finished_total", **wf, step="flaky",
                        outcome="completed") == 3
    assert worker.value("flow_step_attempt_duration_seconds_count", **wf, step="launch",
                        outcome="completed") == 3
    assert worker.value("flow_agent_launches_total", **wf, step="launch") == 3
    assert worker.value("flow_agents_finished_total", **wf, step="launch",
                        outcome="completed") == 3
    assert worker.value("flow_agent_duration_seconds_count", **wf, step="launch",
                        outcome="completed") == 3
    assert worker.value("flow_execution_runs_active", **wf) == 0
    assert worker.value("flow_execution_runs_stopped_total", workflow="metrics_blocked",
                        reason="blocked") == 1
    assert worker.value("flow_step_attempts_interrupted_total", workflow="metrics_blocked",
                        step="wants", reason="blocked") == 1
    assert worker.value("flow_executions_started_total", **wf, queue="default") == 0
    assert worker.value("flow_store_call_duration_seconds_count", op="claim") >= 1
    assert worker.value("flow_store_call_duration_seconds_count", op="append") >= 3 * 4
    assert worker.value("flow_queue_depth", queue="default") == 0
    assert worker.value("flow_executions", workflow="metrics_blocked", status="blocked") == 1

    server, _ = _scrape(metrics_url, stack.token("read"))
    assert server.value("flow_queue_depth", queue="default") == 0
    assert server.value("flow_executions", workflow="metrics_flow", status="pending") == 0
    assert server.value("flow_executions", workflow="metrics_blocked", status="blocked") == 1
    assert server.value("flow_executions_started_total", **wf, queue="default") == 3

    # the worker's own endpoint: /metrics only
    assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 404
    assert httpx.post(f"http://127.0.0.1:{port}/metrics").status_code == 405

    # FLOW_OTEL=1 with the console exporter: one span per run, attempt and agent
    assert stack.worker is not None
    stack.worker.terminate()
    stack.worker.wait(30)
    spans = _console_spans(stack.log("worker"))
    names = sorted(s["name"] for s in spans if s["attributes"].get("flow.workflow")
                   == "metrics_flow")
    assert names == sorted(["execution metrics_flow"] * 3 + ["step launch"] * 3
                           + ["step flaky"] * 6 + ["agent tiny"] * 3), stack.log("worker")
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"metrics-test"}


def _console_spans(log: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed (JSON objects, one after another)."""
    decoder = json.JSONDecoder()
    spans: list[dict[str, Any]] = []
    i = log.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(log, i)
        except json.JSONDecodeError:
            i = log.find("{", i + 1)
            continue
        if isinstance(obj, dict) and "context" in obj and "name" in obj:
            spans.append(obj)
        i = log.find("{", end)
    return spans
