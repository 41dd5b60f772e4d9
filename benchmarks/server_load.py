"""Load on ``flow server``: starts per second through the API, and live-stream latency.

    python benchmarks/server_load.py [--store sqlite|postgres] [--starts 500] [--clients 20]
        [--warmup 100] [--followers 50] [--ticks 20] [--pause 0.2]
        [--worker process|server] [--repeat 1] [--json]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]

Each part runs on a scratch store of its own (a SQLite file in a temporary folder, or a
Postgres database created here and dropped at the end), with a real ``flow server``
subprocess over it and a token made on the store.

  starts   ``--clients`` concurrent HTTP clients (httpx, one keep-alive connection each)
           start ``--starts`` executions between them: ``POST /v1/executions``, mode
           ``async``, on a queue no worker serves (so only the API and the store work).
           ``--warmup`` starts by the same clients come first and are not counted (the
           connections, and the first requests of a fresh server process, which import
           and compile what they use). starts/s = starts / wall time; also each request's
           latency (p50, p99) and the CPU per start of the server and of the clients.
  streams  ``--followers`` executions of a ticker (``ctx.log`` then ``ctx.sleep(pause)``,
           ``--ticks`` times: a log, a timer started and a timer fired per tick, each
           committed as it is emitted) are started through the API, run by a ``flow
           worker`` subprocess (``--worker process``, ``--concurrency`` = followers) or by
           the server itself (``--worker server``: ``flow server --workers N``), and one
           client follows each one's ``GET /v1/executions/{id}/events`` (SSE) until its
           ``end``. A round of 3 ticks comes first and is not counted (unless
           ``--warmup 0``). Latency of an event = the time the client parsed it - the event's
           ``timestamp`` (the ``ts`` the worker gave it just before its commit; one
           machine, one clock). Only events stamped after the client's stream opened
           count (the history sent on connect is not live). p50, p90, p99 and max, and the
           events per second the followers received.

The server and the worker run with their default settings: the server logs each request
(INFO, to a file here). This process (the clients) shares the 2 cores with the server, the
worker and Postgres, as a client on the same machine would; the CPU each used is printed.

``-m benchmarks/server_load.py``: the server and the worker import this file for its
workflows (below); nothing runs on import.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentainer_flow import Context, step, workflow

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
DEFAULT_ADMIN = os.environ.get("FLOW_BENCH_POSTGRES_URL",
                               "postgresql://postgres@127.0.0.1:5432/postgres")
#: a queue no worker serves: the starts stay pending
STARTS_QUEUE = "server-load-starts"
STREAMS_QUEUE = "server-load-streams"
_CLEARED = ("FLOW_HOME", "FLOW_RUNTIME", "FLOW_STORE", "FLOW_TEST_KILL_AT",
            "AGENTAINER_API_URL", "AGENTAINER_API_TOKEN")
_TICK = os.sysconf("SC_CLK_TCK")


# -- the workflows the server and the worker load ------------------------------------------

@workflow(name="server_load_noop")
class Noop:
    """What the starts start: one trivial step (never run: no worker serves its queue)."""

    @step()
    async def only(self, ctx: Context) -> int:
        return 0


@workflow(name="server_load_ticker")
class Ticker:
    """A steady trickle of events: ``ticks`` times a log line, then a ``pause`` (a timer)."""

    def __init__(self, ticks: int = 20, pause: float = 0.2) -> None:
        self.ticks = ticks
        self.pause = pause

    @step()
    async def tick(self, ctx: Context) -> int:
        for i in range(self.ticks):
            await ctx.log(f"tick {i}")
            await ctx.sleep(self.pause)
        return self.ticks


# -- numbers --------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``; NaN for none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _backends(database: str) -> list[int]:
    """Postgres backend processes of ``database`` (their title names it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f" {database} " in title:
                found.append(int(entry.name))
    return found


@dataclass
class Result:
    """One run's figures (times in milliseconds)."""

    store: str
    worker: str
    starts: int
    clients: int
    starts_per_s: float
    start_p50_ms: float
    start_p99_ms: float
    start_errors: int
    server_cpu_ms_per_start: float
    client_cpu_ms_per_start: float
    postgres_cpu_ms_per_start: float
    followers: int
    live_events: int
    events_per_s: float
    stream_p50_ms: float
    stream_p90_ms: float
    stream_p99_ms: float
    stream_max_ms: float
    stream_errors: int
    cpu_s: dict[str, float] = field(default_factory=dict)


# -- scratch stores -------------------------------------------------------------------------

@contextmanager
def scratch_store(kind: str, admin: str) -> Iterator[str]:
    """The URL of an empty store, removed afterwards."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="flow-server-load-") as folder:
            yield f"sqlite:///{Path(folder) / 'flow.db'}"
        return
    import psycopg
    from psycopg import sql

    name = f"flow_sload_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, query = admin.partition("?")
    scheme, _, rest = base.partition("://")
    url = f"{scheme}://{rest.split('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


async def make_token(store_url: str) -> str:
    """A write token, made on the store (as ``flow token create`` does)."""
    from agentainer_flow._server.auth import create_token
    from agentainer_flow.store import create_store

    async with create_store(store_url) as store:
        token, _ = await create_token(store, "server-load", "write")
    return token


# -- processes ------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """The server and the worker, each a ``flow`` subprocess logging to a file."""

    def __init__(self, store_url: str, folder: Path, token: str) -> None:
        self.store_url = store_url
        self.folder = folder
        self.token = token
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agentainer_flow._cli", *args, "--store", self.store_url,
                 "-m", str(HERE)], env=_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_server(self, workers: int = 0) -> None:
        import httpx

        proc = self.spawn("server", "server", "--port", str(self.port), "--workers",
                          str(workers))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"flow server exited ({proc.returncode}):\n"
                                   f"{self.log('server')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"flow server did not answer in 60 s:\n{self.log('server')[-3000:]}")

    def start_worker(self, concurrency: int) -> None:
        self.spawn("worker", "worker", "--queue", STREAMS_QUEUE, "--concurrency",
                   str(concurrency), "--poll-interval", "0.05", "--grace", "0")

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process, and of the Postgres backends serving the
        scratch database (its connection pools keep them for the whole run)."""
        cpu = {name: _cpu_seconds(p.pid) for name, p in self.procs.items()}
        if self.store_url.startswith("postgres"):
            database = self.store_url.split("?", 1)[0].rsplit("/", 1)[1]
            cpu["postgres"] = sum(_cpu_seconds(pid) for pid in _backends(database))
        return cpu

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


# -- the load -------------------------------------------------------------------------------

async def start_many(url: str, token: str, *, starts: int, clients: int,
                     body: dict[str, Any]) -> tuple[float, list[float], int, list[str]]:
    """``starts`` starts by ``clients`` clients at once: (seconds, latencies in s, errors,
    the ids started)."""
    import httpx

    remaining = starts
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    sessions = [httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits)
                for _ in range(clients)]

    async def one(http: httpx.AsyncClient) -> str | None:
        response = await http.post("/v1/executions", json=body)
        if response.status_code != 201:
            return None
        started: str = response.json()["id"]
        return started

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            started = await one(http)
            latencies.append(time.perf_counter() - t0)
            if started is None:
                errors += 1
            else:
                ids.append(started)

    try:
        await asyncio.gather(*(one(http) for http in sessions))  # warm-up, not counted
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for http in sessions))
        seconds = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(http.aclose() for http in sessions))
    return seconds, latencies, errors, ids


async def follow(url: str, token: str, execution_id: str,
                 latencies: list[float]) -> int:
    """Read the execution's event stream to its end; append each live event's latency (s).
    Returns the number of events received."""
    import httpx

    received = 0
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=120),
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.stream("GET", f"/v1/executions/{execution_id}/events") as response:
            response.raise_for_status()
            opened = time.time()
            data: list[str] = []
            kind = None
            async for line in response.aiter_lines():
                if line.startswith("data:"):
                    data.append(line[5:].lstrip())
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif not line:
                    if data and kind is None:
                        now = time.time()
                        event = json.loads("\n".join(data))
                        ts = dt.datetime.fromisoformat(event["timestamp"]).timestamp()
                        received += 1
                        if ts >= opened:
                            latencies.append(now - ts)
                    if kind == "end":
                        break
                    data, kind = [], None
    return received


async def run_streams(url: str, token: str, *, followers: int, ticks: int,
                      pause: float) -> tuple[float, list[float], int, int]:
    """``followers`` tickers started through the API, each followed by a client: (seconds,
    live latencies in s, events received, failed followers)."""
    body = {"workflow": "server_load_ticker", "kwargs": {"ticks": ticks, "pause": pause},
            "queue": STREAMS_QUEUE}
    _, _, errors, ids = await start_many(url, token, starts=followers, clients=min(followers, 10),
                                         body=body)
    if errors:
        raise RuntimeError(f"{errors} of the tickers did not start")
    latencies: list[float] = []
    t0 = time.perf_counter()
    results = await asyncio.gather(*(follow(url, token, eid, latencies) for eid in ids),
                                   return_exceptions=True)
    seconds = time.perf_counter() - t0
    received = sum(r for r in results if isinstance(r, int))
    failed = sum(1 for r in results if isinstance(r, BaseException))
    for r in results:
        if isinstance(r, BaseException):
            print(f"a follower failed: {type(r).__name__}: {r}", file=sys.stderr)
    return seconds, latencies, received, failed


@contextmanager
def stack(args: argparse.Namespace, *, workers: int = 0) -> Iterator[Processes]:
    """A scratch store with a token and a server over it (and what the caller adds)."""
    with scratch_store(args.store, args.admin_url) as store_url, \
            tempfile.TemporaryDirectory(prefix="flow-server-load-logs-") as logs:
        procs = Processes(store_url, Path(logs), asyncio.run(make_token(store_url)))
        try:
            procs.start_server(workers)
            yield procs
        except BaseException:
            for name in procs.procs:
                print(f"--- {name} log (end) ---\n{procs.log(name)[-2000:]}", file=sys.stderr)
            raise
        finally:
            procs.stop()


def run_once(args: argparse.Namespace) -> Result:
    body = {"workflow": "server_load_noop", "queue": STARTS_QUEUE}
    with stack(args) as procs:
        if args.warmup:
            asyncio.run(start_many(procs.url, procs.token, starts=args.warmup,
                                   clients=args.clients, body=body))
        cpu0, own0 = procs.cpu(), _cpu_seconds(os.getpid())
        seconds, latencies, errors, _ = asyncio.run(start_many(
            procs.url, procs.token, starts=args.starts, clients=args.clients, body=body))
        cpu1 = procs.cpu()
        server_cpu = cpu1["server"] - cpu0["server"]
        postgres_cpu = cpu1.get("postgres", 0.0) - cpu0.get("postgres", 0.0)
        client_cpu = _cpu_seconds(os.getpid()) - own0
    in_server = args.worker == "server"
    with stack(args, workers=args.followers if in_server else 0) as procs:
        if not in_server:
            procs.start_worker(args.followers)
        if args.warmup:  # a short round first, as for the starts: not counted
            asyncio.run(run_streams(procs.url, procs.token, followers=args.followers,
                                    ticks=3, pause=args.pause))
        cpu1, own1 = procs.cpu(), _cpu_seconds(os.getpid())
        s_seconds, live, received, failed = asyncio.run(run_streams(
            procs.url, procs.token, followers=args.followers, ticks=args.ticks,
            pause=args.pause))
        cpu2 = procs.cpu()
        cpu = {name: round(cpu2[name] - cpu1.get(name, 0.0), 2) for name in cpu2}
        cpu["clients"] = round(_cpu_seconds(os.getpid()) - own1, 2)
    ms = 1000.0
    return Result(
        store=args.store, worker=args.worker, starts=args.starts, clients=args.clients,
        starts_per_s=round(args.starts / seconds, 1),
        start_p50_ms=round(pct(latencies, 0.5) * ms, 1),
        start_p99_ms=round(pct(latencies, 0.99) * ms, 1), start_errors=errors,
        server_cpu_ms_per_start=round(server_cpu / args.starts * ms, 2),
        client_cpu_ms_per_start=round(client_cpu / args.starts * ms, 2),
        postgres_cpu_ms_per_start=round(postgres_cpu / args.starts * ms, 2),
        followers=args.followers, live_events=len(live),
        events_per_s=round(received / s_seconds, 1),
        stream_p50_ms=round(pct(live, 0.5) * ms, 1), stream_p90_ms=round(pct(live, 0.9) * ms, 1),
        stream_p99_ms=round(pct(live, 0.99) * ms, 1),
        stream_max_ms=round(max(live, default=float("nan")) * ms, 1), stream_errors=failed,
        cpu_s=cpu)


def show(results: list[Result]) -> None:
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {platform.platform()}")
    head = ["store", "worker", "starts/s", "start p50", "start p99",
            "CPU/start server+clients+postgres",
            "live events", "stream p50", "p90", "p99", "max", "errors", "CPU s (streams)"]
    rows = [[r.store, r.worker, f"{r.starts_per_s:.0f}", f"{r.start_p50_ms:.1f} ms",
             f"{r.start_p99_ms:.1f} ms",
             f"{r.server_cpu_ms_per_start:.2f}+{r.client_cpu_ms_per_start:.2f}"
             f"+{r.postgres_cpu_ms_per_start:.2f} ms",
             str(r.live_events), f"{r.stream_p50_ms:.1f} ms", f"{r.stream_p90_ms:.1f} ms",
             f"{r.stream_p99_ms:.1f} ms", f"{r.stream_max_ms:.0f} ms",
             str(r.start_errors + r.stream_errors),
             " ".join(f"{k} {v}" for k, v in r.cpu_s.items())] for r in results]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=False)]
    for row in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    if len(results) > 1:
        rates = [r.starts_per_s for r in results]
        p50s = [r.stream_p50_ms for r in results]
        print(f"starts/s: best {max(rates):.0f}, median {statistics.median(rates):.0f}, "
              f"worst {min(rates):.0f}; stream p50: best {min(p50s):.1f} ms, median "
              f"{statistics.median(p50s):.1f} ms, worst {max(p50s):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--starts", type=int, default=500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=100,
                        help="starts before the timed ones, not counted")
    parser.add_argument("--followers", type=int, default=50)
    parser.add_argument("--ticks", type=int, default=20, help="log lines per ticker")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between ticks")
    parser.add_argument("--worker", choices=["process", "server"], default="process",
                        help="who runs the followed executions: a flow worker process, or "
                        "the server (flow server --workers N)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each on fresh stores")
    parser.add_argument("--admin-url", default=DEFAULT_ADMIN,
                        help="Postgres server (and database) that scratch databases are "
                        "created on")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    results = []
    for _ in range(args.repeat):
        results.append(run_once(args))
        if not args.json:
            show(results[-1:])
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    elif len(results) > 1:
        show(results)


if __name__ == "__main__":
    main()
