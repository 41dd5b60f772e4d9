"""The engine's overhead per container step, against bare runs of the same container.

    python benchmarks/docker_overhead.py [--steps 20] [--parallel 20] [--rounds 3] [--json]
                                         [--breakdown]

Needs a Docker engine (``docker.from_env()``: ``$DOCKER_HOST``, else the local socket) and a
busybox binary on the host: the image (``flow-bench-busybox:latest``) is built ``FROM
scratch`` with ``/bin/busybox`` and its applet links, or reused if it is there already. No
registry or network is needed.

Every container runs ``sh -c "echo '{"n": 1}'"`` with no network and prints one JSON line.

- Bare (the baseline): ``client.containers.run(image, cmd, network_mode="none",
  remove=True)`` of the docker SDK, i.e. ``docker run --rm --network none``: create (and
  inspect), start, follow the logs, wait, remove; then the JSON line is parsed. That is the
  least a runner must do to get a container's output and leave nothing behind.
- Engine: a ``@workflow`` with one ``@step`` that calls ``ctx.deploy_agent(...)`` and
  ``wait_for_completion()``, run with ``WorkflowClient(store="sqlite:///<tmp>/flow.db",
  runtime="docker")``: ``run_workflow`` + ``get_result``, timed as one step.

Sequential: ``--steps`` single-container runs of each kind per round, interleaved (bare,
engine, engine, bare, ...) so that drift of the Docker engine and the disk hits both alike.
Parallel: per round, ``--parallel`` bare containers at once (one thread each) against one
workflow whose ``parallel=True, count=N`` step deploys one container per instance; the
figure is the wall time of the whole batch. Overhead = (engine - bare) / bare, of medians.

``--breakdown`` adds one more sequential round that times every Docker API call, every
runtime call and every store append of both kinds of run, per step.

Every container the benchmark creates carries the label ``flow-bench=docker_overhead`` (bare)
or the engine's ``agentainer.flow.workflow`` label of the benchmark's workflows; all of them
are removed at the end, and so is the temporary store. The image is kept for the next run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import structlog

import agentainer_flow
from agentainer_flow import WorkflowClient, step, workflow

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only

IMAGE = "flow-bench-busybox:latest"
COMMAND = ["sh", "-c", "echo '{\"n\": 1}'"]
EXPECTED = {"n": 1}
BARE_LABEL = ("flow-bench", "docker_overhead")
WORKFLOW_LABEL = "agentainer.flow.workflow"
ONE_NAME = "bench_docker_one"
FAN_NAME = "bench_docker_fan"
WORKFLOW_TIMEOUT = 120.0  # seconds: a workflow that takes longer fails the benchmark, not hangs


# -- the image --------------------------------------------------------------------------

def ensure_image(client: Any, tag: str) -> str:
    """Build ``tag`` FROM scratch with the host's busybox, unless it exists; what was done."""
    import docker.errors

    try:
        client.images.get(tag)
        return "reused"
    except docker.errors.ImageNotFound:
        pass
    busybox = shutil.which("busybox") or "/bin/busybox"
    if not os.path.isfile(busybox):
        raise SystemExit("no busybox binary to build the image (apt install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="flow-bench-image-") as tmp:
        context = Path(tmp)
        shutil.copy(busybox, context / "busybox")
        (context / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        )
        client.images.build(path=str(context), tag=tag, rm=True, forcerm=True)
    return "built"


# -- the workflows ----------------------------------------------------------------------

def make_workflows(image: str, parallel: int) -> tuple[type, type]:
    """A one-step workflow deploying one container, and one whose single ``parallel`` step
    deploys one container per instance (``parallel`` instances)."""

    @workflow(name=ONE_NAME)
    class OneContainer:
        @step()
        async def run(self, ctx: Any) -> dict[str, Any]:
            agent = await ctx.deploy_agent(name="bench-one", image=image, command=COMMAND)
            return (await agent.wait_for_completion()).output

    @workflow(name=FAN_NAME)
    class FanOut:
        @step(parallel=True, count=parallel)
        async def fan(self, ctx: Any, i: int) -> dict[str, Any]:
            agent = await ctx.deploy_agent(name=f"bench-fan-{i}", image=image, command=COMMAND)
            return (await agent.wait_for_completion()).output

    return OneContainer, FanOut


# -- bare runs --------------------------------------------------------------------------

def bare_run(client: Any, image: str) -> float:
    """``docker run --rm --network none``: seconds until the output is parsed and the
    container removed."""
    start = time.perf_counter()
    out = client.containers.run(
        image, COMMAND, network_mode="none", remove=True,
        name=f"flow-bench-{uuid.uuid4().hex[:12]}", labels=dict([BARE_LABEL]))
    lines = [line for line in out.decode().splitlines() if line.strip()]
    elapsed = time.perf_counter() - start
    if json.loads(lines[-1]) != EXPECTED:
        raise AssertionError(f"unexpected output {out!r}")
    return elapsed


def bare_batch(client: Any, image: str, n: int) -> float:
    """Seconds for ``n`` bare runs at once, one thread each."""
    gate = threading.Barrier(n + 1)

    def one() -> float:
        gate.wait()
        return bare_run(client, image)

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one) for _ in range(n)]
        gate.wait()  # every thread is ready: start them together
        start = time.perf_counter()
        for f in futures:
            f.result()
        return time.perf_counter() - start


# -- engine runs ------------------------------------------------------------------------

async def engine_run(client: WorkflowClient, wf: type, expected: Any = EXPECTED) -> float:
    """Seconds for one execution of ``wf``: ``run_workflow`` until ``get_result`` returns."""
    start = time.perf_counter()
    ex = await client.run_workflow(wf())
    result = await ex.get_result(timeout=WORKFLOW_TIMEOUT)
    elapsed = time.perf_counter() - start
    if result != expected:
        raise AssertionError(f"unexpected result {result!r}")
    return elapsed


async def engine_batch(client: WorkflowClient, wf: type, n: int) -> float:
    """Seconds for one execution of the fan-out workflow (``n`` containers at once)."""
    return await engine_run(client, wf, [EXPECTED] * n)


# -- statistics -------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), interpolated between the nearest ranks."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median_ms": statistics.median(values) * 1e3,
            "p90_ms": percentile(values, 0.9) * 1e3, "min_ms": min(values) * 1e3,
            "max_ms": max(values) * 1e3}


def overhead(engine: dict[str, float], bare: dict[str, float], key: str) -> float:
    return (engine[key] - bare[key]) / bare[key] * 100


# -- breakdown --------------------------------------------------------------------------

_API_METHODS = ("create_container", "inspect_container", "start", "wait", "logs",
                "put_archive", "get_archive", "remove_container", "stop", "kill")
_RUNTIME_METHODS = ("_launch", "_wait_slice", "_remove", "_status")


class Recorder:
    """Times calls by name, in whatever thread they run, for the current ``phase``."""

    def __init__(self) -> None:
        self.phase = "off"
        self.calls: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            if self.phase != "off":
                self.calls[(self.phase, name)].append(seconds)

    def wrap(self, owner: Any, attr: str, name: str) -> Callable[[], None]:
        original = getattr(owner, attr, None)
        if original is None:  # not in this version of the runtime
            return lambda: None
        if asyncio.iscoroutinefunction(original):
            @functools.wraps(original)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    self.add(name, time.perf_counter() - t0)

            setattr(owner, attr, timed_async)
        else:
            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self.add(name, time.perf_counter() - t0)

            setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, original)

    @contextlib.contextmanager
    def installed(self, store: Any) -> Iterator[None]:
        from docker.api.client import APIClient

        from agentainer_flow.engine.runtimes.docker import DockerRuntime

        undo = [self.wrap(APIClient, m, f"api.{m}") for m in _API_METHODS]
        undo += [self.wrap(DockerRuntime, m, f"runtime.{m}") for m in _RUNTIME_METHODS]
        undo.append(self.wrap(store, "append", "store.append"))
        undo.append(self.wrap(store, "create_execution", "store.create_execution"))
        try:
            yield
        finally:
            for u in reversed(undo):
                u()

    def table(self, steps: int) -> list[dict[str, Any]]:
        rows = []
        for (phase, name), xs in sorted(self.calls.items()):
            rows.append({"run": phase, "call": name, "calls_per_step": len(xs) / steps,
                         "ms_per_call": statistics.fmean(xs) * 1e3,
                         "ms_per_step": sum(xs) / steps * 1e3})
        return rows


# -- the benchmark ----------------------------------------------------------------------

def cleanup(docker_client: Any) -> dict[str, int]:
    """Remove every container this benchmark created and that is still there: how many
    bare ones and how many of the engine's (the engine removes its own once their outcome
    is durable; any found here it left behind)."""
    import docker.errors

    found = {"bare": docker_client.containers.list(
        all=True, filters={"label": f"{BARE_LABEL[0]}={BARE_LABEL[1]}"}), "engine": []}
    for name in (ONE_NAME, FAN_NAME):
        found["engine"] += docker_client.containers.list(
            all=True, filters={"label": f"{WORKFLOW_LABEL}={name}"})
    for containers in found.values():
        for container in containers:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                container.remove(force=True)
    return {kind: len(containers) for kind, containers in found.items()}


async def bench(args: argparse.Namespace, docker_client: Any, store_dir: Path) -> dict[str, Any]:
    one, fan = make_workflows(args.image, args.parallel)
    seq_bare: list[float] = []
    seq_engine: list[float] = []
    par_bare: list[float] = []
    par_engine: list[float] = []
    rounds: list[dict[str, Any]] = []
    breakdown: list[dict[str, Any]] | None = None
    say = print if not args.json else (lambda *a, **k: None)
    async with WorkflowClient(store=f"sqlite:///{store_dir / 'flow.db'}",
                              runtime="docker") as client:
        # warm up: imports, connections, the engine's thread pool, the image's first use
        for _ in range(2):
            await asyncio.to_thread(bare_run, docker_client, args.image)
            await engine_run(client, one)
        for r in range(args.rounds):
            rb: list[float] = []
            re_: list[float] = []
            for i in range(args.steps):
                if (i + r) % 2 == 0:
                    rb.append(await asyncio.to_thread(bare_run, docker_client, args.image))
                    re_.append(await engine_run(client, one))
                else:
                    re_.append(await engine_run(client, one))
                    rb.append(await asyncio.to_thread(bare_run, docker_client, args.image))
            if r % 2 == 0:
                pb = await asyncio.to_thread(bare_batch, docker_client, args.image,
                                             args.parallel)
                pe = await engine_batch(client, fan, args.parallel)
            else:
                pe = await engine_batch(client, fan, args.parallel)
                pb = await asyncio.to_thread(bare_batch, docker_client, args.image,
                                             args.parallel)
            seq_bare += rb
            seq_engine += re_
            par_bare.append(pb)
            par_engine.append(pe)
            b, e = statistics.median(rb), statistics.median(re_)
            rounds.append({"round": r + 1, "sequential_bare_median_ms": b * 1e3,
                           "sequential_engine_median_ms": e * 1e3,
                           "sequential_overhead_pct": (e - b) / b * 100,
                           "parallel_bare_ms": pb * 1e3, "parallel_engine_ms": pe * 1e3,
                           "parallel_overhead_pct": (pe - pb) / pb * 100})
            say(f"round {r + 1}: sequential median bare {b * 1e3:.1f} ms, engine "
                f"{e * 1e3:.1f} ms ({(e - b) / b * 100:+.1f}%); parallel-{args.parallel} "
                f"bare {pb * 1e3:.0f} ms, engine {pe * 1e3:.0f} ms "
                f"({(pe - pb) / pb * 100:+.1f}%)", flush=True)
        if args.breakdown:
            rec = Recorder()
            with rec.installed(client.store):
                for _ in range(args.steps):
                    rec.phase = "bare"
                    await asyncio.to_thread(bare_run, docker_client, args.image)
                    rec.phase = "engine"
                    await engine_run(client, one)
                rec.phase = "off"
            breakdown = rec.table(args.steps)

    sb, se = summary(seq_bare), summary(seq_engine)
    pb_, pe_ = summary(par_bare), summary(par_engine)
    return {
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "docker": docker_client.version().get("Version"),
                    "storage_driver": docker_client.info().get("Driver")},
        "engine_source": str(Path(agentainer_flow.__file__).parent),
        "image": args.image,
        "steps": args.steps, "parallel": args.parallel, "rounds": args.rounds,
        "sequential": {"bare": sb, "engine": se,
                       "overhead_median_pct": overhead(se, sb, "median_ms"),
                       "overhead_p90_pct": overhead(se, sb, "p90_ms"),
                       "added_median_ms": se["median_ms"] - sb["median_ms"]},
        "parallel_batch": {"bare": pb_, "engine": pe_,
                           "overhead_median_pct": overhead(pe_, pb_, "median_ms"),
                           "overhead_p90_pct": overhead(pe_, pb_, "p90_ms"),
                           "bare_per_container_ms": pb_["median_ms"] / args.parallel,
                           "engine_per_container_ms": pe_["median_ms"] / args.parallel},
        "rounds_detail": rounds,
        "breakdown": breakdown,
    }


def report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\n{m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, Docker {m['docker']} "
          f"({m['storage_driver']}); image {res['image']}; engine {res['engine_source']}")
    print(f"{'':34} {'median':>10} {'p90':>10}")
    seq, par = res["sequential"], res["parallel_batch"]
    n, p = res["steps"] * res["rounds"], res["parallel"]
    for label, s in ((f"sequential bare (n={n})", seq["bare"]),
                     (f"sequential engine (n={n})", seq["engine"])):
        print(f"{label:34} {s['median_ms']:8.1f}ms {s['p90_ms']:8.1f}ms")
    print(f"{'sequential overhead':34} {seq['overhead_median_pct']:+9.1f}% "
          f"{seq['overhead_p90_pct']:+9.1f}%   ({seq['added_median_ms']:+.1f} ms per step)")
    for label, s in ((f"parallel-{p} bare, batch (n={res['rounds']})", par["bare"]),
                     (f"parallel-{p} engine, batch (n={res['rounds']})", par["engine"])):
        print(f"{label:34} {s['median_ms']:8.0f}ms {s['p90_ms']:8.0f}ms")
    print(f"{f'parallel-{p} overhead':34} {par['overhead_median_pct']:+9.1f}% "
          f"{par['overhead_p90_pct']:+9.1f}%")
    if res["breakdown"]:
        print("\nper sequential step (one more round, every call timed):")
        print(f"{'run':7} {'call':28} {'calls':>6} {'ms/call':>9} {'ms/step':>9}")
        for row in res["breakdown"]:
            print(f"{row['run']:7} {row['call']:28} {row['calls_per_step']:6.2f} "
                  f"{row['ms_per_call']:9.2f} {row['ms_per_step']:9.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="sequential runs per round")
    parser.add_argument("--parallel", type=int, default=20, help="containers at once")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--breakdown", action="store_true",
                        help="time every Docker API, runtime and store call of one more round")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.steps < 1 or args.parallel < 1 or args.rounds < 1:
        parser.error("--steps, --parallel and --rounds must be at least 1")
    try:
        import docker
    except ImportError:
        raise SystemExit("needs the docker SDK: pip install 'agentainer-flow[docker]'") from None
    # one connection per thread: the SDK's default pool of 10 would queue a batch of 20
    docker_client = docker.from_env(max_pool_size=args.parallel + 4)
    try:
        docker_client.ping()
        built = ensure_image(docker_client, args.image)
        if not args.json:
            print(f"image {args.image}: {built}", flush=True)
        with tempfile.TemporaryDirectory(prefix="flow-bench-docker-") as tmp:
            res = asyncio.run(bench(args, docker_client, Path(tmp)))
    finally:
        left = cleanup(docker_client)
        docker_client.close()
    res["left_behind_and_removed"] = left
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        report(res)
        print(f"\ncontainers left behind, removed at the end: {left['engine']} of the engine's, "
              f"{left['bare']} bare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
