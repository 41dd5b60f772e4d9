"""The ``docker`` runtime: agents run as containers on a Docker engine (the docker SDK).

The container's name is the command's deterministic ``agent_id``, so the engine (or a fresh
one after a crash) finds it by name: ``launch`` of a name that exists adopts the container
(a create conflict), starting it only if a crashed launch created it and never started it.
Containers carry ``agentainer.flow.*`` labels (execution, workflow, step, instance, attempt,
command), run without a network unless the agent asks for one, are never privileged, and
are kept after they exit until ``remove`` (the engine removes them once their outcome is
durable).

Output protocol: ``$FLOW_OUTPUT`` is ``/flow/output.json`` (``/flow`` is created in the
container, writable by any user); it is read through the Docker API after exit, else the
last JSON-object line of stdout counts. A timeout or stop first leaves a marker file in
``/flow`` so that any engine reading the exited container later knows why it ended.

The SDK is synchronous: every call runs in this runtime's own thread pool (waits are done
in short slices so that a cancelled wait frees its thread quickly).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import os
import re
import tarfile
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from ..errors import ConfigurationError, RuntimeUnavailableError
from .base import (
    STDOUT_WINDOW_SLACK,
    AgentEntry,
    AgentOutcome,
    AgentOutputProblem,
    AgentRuntime,
    AgentSpec,
    AgentState,
    AgentStatus,
    max_output_bytes,
    read_output,
)

__all__ = ["DockerRuntime", "parse_memory"]

T = TypeVar("T")

FLOW_DIR = "/flow"
OUTPUT_PATH = f"{FLOW_DIR}/output.json"
#: the smallest limits the Docker engine accepts (a memory limit under 6 MB is refused, and
#: a CPU quota under 1 ms per 100 ms period by the kernel)
_MIN_MEMORY = 6 * 2**20
_MIN_CPU = 0.01
_MARKER = ".flow-ended"  # in FLOW_DIR: "timeout" or "stop", written before a kill
LABEL_PREFIX = "agentainer.flow."
#: engine label keys (``flow.*``) whose docker label name differs from ``agentainer.<key>``
_LABEL_NAMES = {"flow.execution": f"{LABEL_PREFIX}execution_id"}
_LOG_TAIL_LINES = 50
_LOG_TAIL_CHARS = 4096
_WAIT_SLICE = 2.0  # seconds one blocking wait call may take
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_MEMORY_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_RUNNING_STATES = {"running", "restarting", "paused"}
_NO_ENGINE_HINT = (
    "Start a Docker engine (e.g. `dockerd &`, or `sudo systemctl start docker`) or set "
    "DOCKER_HOST to one that runs (e.g. unix:///var/run/docker.sock or tcp://host:2375); "
    "or use the process runtime (--runtime process / FLOW_RUNTIME=process)"
)


def parse_memory(value: object) -> int:
    """Bytes from a memory size: an int (bytes) or a string like ``512m``, ``2g``, ``1Gi``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}")
    if isinstance(value, int | float):
        size = int(value)
    elif isinstance(value, str) and (m := _MEMORY_RE.fullmatch(value)):
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"invalid memory size {value!r}: use bytes or e.g. '512m', '2g'")
    if size <= 0:
        raise ValueError(f"invalid memory size {value!r}: it must be positive")
    return size


def _labels(spec: AgentSpec) -> dict[str, str]:
    """The engine's ``flow.*`` labels as ``agentainer.flow.*`` docker labels."""
    out = {f"{LABEL_PREFIX}agent": spec.name}
    for key, value in spec.labels.items():
        out[_LABEL_NAMES.get(key, f"agentainer.{key}")] = value
    return out


def _timestamp(text: object) -> float | None:
    """Seconds since the epoch from Docker's RFC 3339 times (nanoseconds; year 1 = unset)."""
    if not isinstance(text, str) or not text or text.startswith("0001-"):
        return None
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None:
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    when = dt.datetime.fromisoformat(m.group(1) + zone)
    return when.timestamp() + float("0." + (m.group(2) or "0"))


def _dir_tar(markers: dict[str, str] | None = None) -> bytes:
    """A tar of ``flow/`` (mode 0777, so any user can write the output) and marker files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("flow")
        info.type = tarfile.DIRTYPE
        info.mode = 0o777
        info.mtime = int(time.time())
        tar.addfile(info)
        for name, text in (markers or {}).items():
            data = text.encode()
            info = tarfile.TarInfo(f"flow/{name}")
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the Docker engine could not be reached (connection refused or
    cut, socket missing), as opposed to an answer it gave."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError | ConnectionError):
        return True
    return isinstance(exc, FileNotFoundError) and "sock" in str(exc)


def _tail(text: str, chars: int) -> str:
    return text[len(text) - chars :] if len(text) > chars else text


class DockerRuntime(AgentRuntime):
    """Runs agents as containers on the Docker engine that ``docker.from_env()`` finds
    (``DOCKER_HOST``, else the local socket).

    ``kill_grace``: seconds between SIGTERM and SIGKILL when stopping a container.
    ``client``: a ``docker.DockerClient`` to use instead of one from the environment.
    """

    name = "docker"
    follows_logs = True

    def __init__(self, *, client: Any = None, kill_grace: float = 5.0,
                 poll_interval: float = 0.1, max_threads: int = 64,
                 retry_for: float | None = None) -> None:
        self.kill_grace = kill_grace
        #: seconds a Docker engine that does not answer is tried again before the run
        #: stops (``RuntimeUnavailableError``); ``FLOW_DOCKER_RETRY_FOR``, else 30
        self.retry_for = retry_for if retry_for is not None else float(
            os.environ.get("FLOW_DOCKER_RETRY_FOR") or 30)
        self.poll_interval = poll_interval
        self._client: Any = client
        self._host: dict[str, Any] | None = None  # engine info: CPUs and memory
        self._max_threads = max_threads
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._users: dict[str, str] = {}  # image -> its configured user

    # -- plumbing --

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking SDK call in the runtime's thread pool; through a Docker engine
        that stops answering (restarting, a socket gone), again with backoff for up to
        ``retry_for`` seconds (every call here is idempotent), then
        ``RuntimeUnavailableError``: the run stops, resumable, nothing recorded."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_threads, thread_name_prefix="flow-docker")
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.retry_for
        delay = 0.25
        while True:
            try:
                return await loop.run_in_executor(self._pool, fn, *args)
            except Exception as exc:
                if not _unreachable(exc):
                    raise
                if loop.time() + delay > give_up:
                    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
                    reason = " ".join(str(exc).split()) or type(exc).__name__
                    raise RuntimeUnavailableError(
                        f"the Docker engine at {host} did not answer for "
                        f"{self.retry_for:g} s ({reason}); the run stops here, nothing "
                        "recorded: resume the execution (flow resume, recover() or a worker) "
                        "once Docker is back, and its containers are adopted") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)

    def _docker(self) -> Any:
        """The SDK client (connected on first use)."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        host = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
        try:
            import docker
        except ImportError:
            raise ConfigurationError(
                "the docker runtime needs the docker SDK: pip install 'agentainer-flow[docker]'"
            ) from None
        url = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if url.startswith("unix://") and not os.path.exists(url[len("unix://"):]):
            # checked here: the SDK leaks the socket of a failed connect
            raise ConfigurationError(
                f"cannot reach a Docker engine at {host}: no socket there. {_NO_ENGINE_HINT}")
        try:
            client = docker.from_env(max_pool_size=self._max_threads)
            client.ping()
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigurationError(
                f"cannot reach a Docker engine at {host}: {reason}. {_NO_ENGINE_HINT}"
            ) from None
        return client

    def _engine_info(self) -> dict[str, Any]:
        if self._host is None:
            self._host = dict(self._docker().info())
        return self._host

    async def open(self) -> None:
        """Connect to the engine; an engine that does not answer is a ``ConfigurationError``."""
        await self._run(self._engine_info)

    async def close(self) -> None:
        """Close the connection and the thread pool (containers keep running). Waits for
        calls under way: at most one wait slice."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _get(self, agent_id: str) -> Any | None:
        """The container named ``agent_id``, or None."""
        import docker.errors

        _check_name(agent_id)
        try:
            return self._docker().containers.get(agent_id)
        except docker.errors.NotFound:
            return None

    # -- launch --

    def create_options(self, spec: AgentSpec) -> dict[str, Any]:
        """The ``containers.create`` arguments for ``spec`` (resources checked against the
        engine: a request it cannot meet is an error)."""
        env = dict(spec.env)
        env["FLOW_OUTPUT"] = OUTPUT_PATH
        options: dict[str, Any] = {
            "name": spec.agent_id,
            "command": list(spec.command) if spec.command else None,
            "environment": env,
            "labels": _labels(spec),
            "network_mode": spec.network or "none",
            "privileged": False,
        }
        options.update(self._limits(spec))
        if self._runs_as_root(spec):
            # an anonymous volume is ``/flow``: no copy into the container before it starts
            # (each copy costs a tar process in the daemon, ~40 ms); an image with a user of
            # its own gets a world-writable ``/flow`` copied in instead (see ``_launch``)
            options["volumes"] = [FLOW_DIR]
            options["labels"][f"{LABEL_PREFIX}flow_dir"] = "volume"
        return options

    def _runs_as_root(self, spec: AgentSpec) -> bool:
        """Whether the image runs as root (no ``USER``, or root); remembered per image. An
        image that is not on the engine is a ``ConfigurationError`` naming it."""
        import docker.errors

        user = self._users.get(spec.image)
        if user is None:
            try:
                attrs = self._docker().images.get(spec.image).attrs
            except docker.errors.ImageNotFound:
                raise ConfigurationError(
                    f"image {spec.image!r} of agent {spec.name!r} is not on the Docker "
                    f"engine: build or pull it first (docker build -t {spec.image} ... / "
                    "docker pull)") from None
            user = str((attrs.get("Config") or {}).get("User") or "")
            self._users[spec.image] = user
        return user.split(":", 1)[0] in ("", "root", "0")

    def _limits(self, spec: AgentSpec) -> dict[str, Any]:
        where = f"agent {spec.name!r} (image {spec.image!r})"
        res = dict(spec.resources)
        unknown = sorted(set(res) - {"cpu", "memory", "gpu"})
        if unknown:
            raise ConfigurationError(f"{where}: unknown resources {unknown}: use cpu, memory")
        out: dict[str, Any] = {}
        if res.get("gpu"):
            raise ConfigurationError(f"{where}: asks for {res['gpu']} GPU(s); the docker "
                                     "runtime does not schedule GPUs")
        cpu = res.get("cpu")
        if cpu is not None:
            if isinstance(cpu, bool) or not isinstance(cpu, int | float) or cpu <= 0:
                raise ConfigurationError(f"{where}: invalid cpu {cpu!r}: use cores, e.g. 0.5")
            if cpu < _MIN_CPU:  # below it the kernel's CFS quota is refused
                raise ConfigurationError(
                    f"{where}: asks for {cpu} CPUs; the least Docker can give is {_MIN_CPU}")
            ncpu = int(self._engine_info().get("NCPU") or 0)
            if ncpu and cpu > ncpu:
                raise ConfigurationError(
                    f"{where}: asks for {cpu} CPUs; the Docker engine has {ncpu}")
            out["nano_cpus"] = int(cpu * 1e9)
        memory = res.get("memory")
        if memory is not None:
            try:
                size = parse_memory(memory)
            except ValueError as exc:
                raise ConfigurationError(f"{where}: {exc}") from None
            if size < _MIN_MEMORY:
                raise ConfigurationError(
                    f"{where}: asks for memory {memory!r} ({size} bytes); the least Docker "
                    f"allows is {_MIN_MEMORY // 2**20} MiB")
            total = int(self._engine_info().get("MemTotal") or 0)
            if total and size > total:
                raise ConfigurationError(
                    f"{where}: asks for memory {memory!r} ({size} bytes); the Docker engine "
                    f"has {total} bytes")
            out["mem_limit"] = size
        return out

    async def launch(self, spec: AgentSpec) -> None:
        """Create and start the container, or adopt the one with that name."""
        await self._run(self._launch, spec)

    def _launch(self, spec: AgentSpec) -> None:
        import docker.errors

        _check_name(spec.agent_id)
        options = self.create_options(spec)
        containers = self._docker().containers
        try:
            container = containers.create(spec.image, **options)
        except docker.errors.ImageNotFound:
            raise ConfigurationError(
                f"image {spec.image!r} of agent {spec.name!r} is not on the Docker engine: "
                f"build or pull it first (docker build -t {spec.image} ... / docker pull)"
            ) from None
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: the name exists: adopt it
                raise
            container = self._get(spec.agent_id)
            if container is None:  # removed between the conflict and now: create again
                return self._launch(spec)
            if container.status != "created":
                return  # running or already exited: adopted
            # created by a launch that died before starting it: finish that launch, unless
            # a stop came first
            if self._marker(container) is not None:
                return  # stopped before it started: it must not run
        if (container.labels or {}).get(f"{LABEL_PREFIX}flow_dir") != "volume":
            container.put_archive("/", _dir_tar())
        try:
            container.start()
        except docker.errors.APIError as exc:
            reason = exc.explanation or str(exc)
            container.remove(force=True, v=True)
            raise RuntimeError(
                f"container for agent {spec.name!r} did not start: {reason}") from None

    # -- state --

    async def lookup(self, agent_id: str) -> AgentStatus:
        return await self._run(self._status, agent_id)

    def _status(self, agent_id: str) -> AgentStatus:
        container = self._get(agent_id)
        return AgentStatus(AgentState.MISSING) if container is None else self._state(container)

    def _state(self, container: Any) -> AgentStatus:
        status = container.status
        if status in _RUNNING_STATES:
            return AgentStatus(AgentState.RUNNING)
        if status == "created":  # a launch under way (or one that died: launching finishes it)
            marker = self._marker(container)
            if marker is None:
                return AgentStatus(AgentState.RUNNING)
            return AgentStatus(AgentState.EXITED, AgentOutcome(
                exit_code=-15, log_tail="flow: stopped before it started\n",
                timed_out=marker == "timeout"))
        if status == "removing":
            return AgentStatus(AgentState.MISSING)
        return AgentStatus(AgentState.EXITED, self._outcome(container))

    def _files(self, container: Any, limit: int | None = None,
               wanted: tuple[str, ...] = ("output.json", _MARKER),
               ) -> tuple[dict[str, bytes], dict[str, int]]:
        """The ``wanted`` files of the container's ``/flow`` (none if it has none), and the
        sizes of those not read because they are over ``limit`` bytes. Other files the
        agent left there are streamed past, never held."""
        import docker.errors

        try:
            stream, _ = container.get_archive(FLOW_DIR)
        except docker.errors.NotFound:
            return {}, {}
        files: dict[str, bytes] = {}
        skipped: dict[str, int] = {}
        with tarfile.open(fileobj=_Chunks(stream), mode="r|") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                if name not in wanted:
                    continue
                if limit is not None and member.size > limit:
                    skipped[name] = member.size
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    files[name] = f.read()
        return files, skipped

    def _exists(self, container: Any, path: str) -> bool:
        """Whether ``path`` exists in the container: a stat (``HEAD``) costs ~2 ms where a
        copy out (``GET``) runs a tar process in the daemon (~40 ms)."""
        api = self._docker().api
        response = api.head(api._url("/containers/{0}/archive", container.id),
                            params={"path": path})
        return bool(response.status_code == 200)

    def _marker(self, container: Any) -> str | None:
        if not self._exists(container, f"{FLOW_DIR}/{_MARKER}"):
            return None
        data = self._files(container, 4096)[0].get(_MARKER)
        return data.decode(errors="replace").strip() if data is not None else None

    def _outcome(self, container: Any) -> AgentOutcome:
        state = container.attrs.get("State") or {}
        limit = max_output_bytes()
        files: dict[str, bytes] = {}
        too_big: dict[str, int] = {}
        # a stop or timeout marker matters only for a container that did not exit 0
        if self._exists(container, OUTPUT_PATH) or (
                state.get("ExitCode") != 0 and self._exists(container, f"{FLOW_DIR}/{_MARKER}")):
            files, too_big = self._files(container, limit)
        marker = files.get(_MARKER)
        output_file = files.get("output.json")
        output: dict[str, Any] = {}
        problem = ""
        try:
            if "output.json" in too_big or (output_file is not None and output_file.strip()):
                output = read_output(output_file, b"", output_file_size=too_big.get(
                    "output.json"), limit=limit)
            else:  # no file: the last JSON line of stdout
                tail, cut = _stdout_end(container, limit + STDOUT_WINDOW_SLACK)
                output = read_output(None, tail, first_line_cut=cut, limit=limit)
        except AgentOutputProblem as exc:
            problem = str(exc)
        exit_code = int(state.get("ExitCode", -1))
        tail = container.logs(stdout=True, stderr=True, tail=_LOG_TAIL_LINES)
        log_tail = tail.decode(errors="replace")
        if state.get("OOMKilled"):
            log_tail += "flow: the container was killed: out of memory\n"
        started_at = _timestamp(state.get("StartedAt"))
        finished_at = _timestamp(state.get("FinishedAt"))
        if started_at is not None and finished_at is not None and finished_at < started_at:
            finished_at = started_at  # Docker stamps a very short run's end before its start
        return AgentOutcome(
            exit_code=exit_code,
            output=output,
            log_tail=_tail(log_tail, _LOG_TAIL_CHARS),
            started_at=started_at,
            finished_at=finished_at,
            timed_out=marker is not None and marker.strip() == b"timeout",
            output_error=problem,
        )

    # -- wait / stop --

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        if timeout is not None and timeout <= 0:
            # past its deadline already (e.g. resumed late): a container that ended in
            # time ended as it did; only one still running has overrun
            status = await self.lookup(agent_id)
            if status.state is AgentState.MISSING:
                raise LookupError(f"no container {agent_id!r} on the Docker engine")
            if status.outcome is not None:
                return status.outcome
        while True:
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            slice_ = _WAIT_SLICE if remaining is None else min(_WAIT_SLICE, remaining)
            status = await self._run(self._wait_slice, agent_id, slice_)
            if status.state is AgentState.MISSING:
                raise LookupError(f"no container {agent_id!r} on the Docker engine")
            if status.outcome is not None:
                return status.outcome
        await self._run(self._terminate, agent_id, "timeout")
        status = await self.lookup(agent_id)
        if status.outcome is None:
            raise LookupError(f"no container {agent_id!r} on the Docker engine")
        return replace(status.outcome, timed_out=True)

    def _wait_slice(self, agent_id: str, seconds: float) -> AgentStatus:
        """Block until the container exits or ``seconds`` pass; its status then."""
        import requests

        container = self._get(agent_id)
        if container is None:
            return AgentStatus(AgentState.MISSING)
        if container.status == "created":  # not started yet: its launcher is on it
            status = self._state(container)
            if status.outcome is None:
                time.sleep(min(seconds, self.poll_interval))
            return status
        if container.status in _RUNNING_STATES:
            try:
                container.wait(timeout=max(seconds, 0.01))
            except requests.exceptions.RequestException:
                pass  # still running after the slice
            container.reload()
        return self._state(container)

    async def stop(self, agent_id: str) -> None:
        await self._run(self._terminate, agent_id, "stop")

    def _terminate(self, agent_id: str, why: str) -> None:
        """Mark why the container ends, then stop it (SIGTERM, SIGKILL after the grace;
        a timeout kills at once)."""
        import docker.errors

        container = self._get(agent_id)
        if container is None or container.status not in ("created", *_RUNNING_STATES):
            return
        try:
            container.put_archive("/", _dir_tar({_MARKER: why}))
            if why == "timeout":
                container.kill()
            else:
                container.stop(timeout=int(self.kill_grace))
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):  # gone, or not running any more
                raise

    # -- logs / remove --

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the container's stdout and stderr, interleaved."""
        return await self._run(self._logs, agent_id, tail)

    def _logs(self, agent_id: str, tail: int) -> str:
        container = self._get(agent_id)
        if container is None or tail <= 0:
            return ""
        data: bytes = container.logs(stdout=True, stderr=True, tail=tail)
        return data.decode(errors="replace")

    async def follow_logs(self, agent_id: str,
                          cursor: str = "") -> AsyncIterator[tuple[str, str]]:
        """The container's output as Docker streams it; the cursor names the last lines
        given (``_LogPosition``). The stream is read in a thread of its own (it blocks for
        the container's whole life), never in the pool the other calls share."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[bytes, str] | None] = asyncio.Queue()
        streams: list[Any] = []
        done = threading.Event()

        def put(item: tuple[bytes, str] | None) -> None:
            if not done.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def pump() -> None:
            try:
                self._pump_logs(agent_id, cursor, streams, put)
            except Exception:
                pass
            finally:
                put(None)

        threading.Thread(target=pump, name=f"flow-logs-{agent_id[:40]}", daemon=True).start()
        try:
            while (item := await queue.get()) is not None:
                yield item[0].decode("utf-8", "replace"), item[1]
        finally:
            done.set()
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.close()

    def _pump_logs(self, agent_id: str, cursor: str, streams: list[Any],
                   put: Callable[[tuple[bytes, str] | None], None]) -> None:
        position = _LogPosition(cursor)
        container = self._get(agent_id)
        if container is None:
            return
        since = None if position.floor is None else position.floor // 1_000_000_000
        stream = container.logs(stdout=True, stderr=True, stream=True, follow=True,
                                timestamps=True, since=since)
        streams.append(stream)
        pending = b""
        for chunk in stream:
            pending += chunk
            lines = pending.split(b"\n")
            pending = lines.pop()
            if lines:
                position.give(lines, put)
        if pending:
            position.give([pending], put)

    async def list_agents(self) -> list[AgentEntry]:
        """The containers that carry an execution label (running or not)."""
        return await self._run(self._list_agents)

    def _list_agents(self) -> list[AgentEntry]:
        key = f"{LABEL_PREFIX}execution_id"
        out = []
        for c in self._docker().containers.list(all=True, filters={"label": key}):
            labels = c.labels or {}
            out.append(AgentEntry(c.name, labels.get(key, ""),
                                  labels.get(f"{LABEL_PREFIX}store", ""),
                                  running=c.status in ("created", *_RUNNING_STATES)))
        return out

    async def remove(self, agent_id: str) -> None:
        """Remove the container (killing it if it runs). Idempotent."""
        await self._run(self._remove, agent_id)

    def _remove(self, agent_id: str) -> None:
        import docker.errors

        container = self._get(agent_id)
        if container is None:
            return
        try:
            container.remove(force=True, v=True)  # with its anonymous /flow volume
        except docker.errors.APIError as exc:
            if exc.status_code not in (404, 409):  # gone, or its removal is under way
                raise


def _nanos(stamp: str) -> int | None:
    """Nanoseconds since the epoch from a Docker log timestamp (RFC 3339, nanoseconds)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z", stamp)
    if m is None:
        return None
    seconds = int(dt.datetime.fromisoformat(m.group(1) + "+00:00").timestamp())
    return seconds * 1_000_000_000 + int((m.group(2) or "0").ljust(9, "0"))


class _LogPosition:
    """Where a reader of a container's log is: the cursor ``follow_logs`` gives and takes.

    Docker stamps each line as it reads it from the container's stdout or stderr, and the
    two pipes are read apart: a stderr line can reach the stream after a stdout line
    stamped later than it. A cursor that were only the last line's stamp would then skip
    that line on resume. So the cursor names the last ``KEEP`` lines given, by stamp and
    digest; a resumed reader skips the lines stamped before the oldest of them and those
    lines themselves, and gives the rest. (An older cursor, one stamp, still works as it
    did: everything stamped after it.)
    """

    KEEP = 16
    _PREFIX = "v2:"

    def __init__(self, cursor: str) -> None:
        self._recent: deque[tuple[int, str]] = deque(maxlen=self.KEEP)
        self._seen: set[tuple[int, str]] = set()
        #: lines stamped before this were given before (None: give every line)
        self.floor: int | None = None
        if cursor.startswith(self._PREFIX):
            for part in cursor[len(self._PREFIX):].split(","):
                when, _, digest = part.partition(".")
                if when.isdigit() and digest:
                    self._seen.add((int(when), digest))
            self._recent.extend(sorted(self._seen))
            self.floor = min((w for w, _ in self._seen), default=None)
        else:
            after = _nanos(cursor)
            self.floor = None if after is None else after + 1

    def give(self, lines: list[bytes], put: Callable[[tuple[bytes, str] | None], None]) -> None:
        """Hand on the lines not given before, without their stamps, with the new cursor."""
        out = []
        for line in lines:
            stamp, _, text = line.partition(b" ")
            when = _nanos(stamp.decode("ascii", "replace"))
            if when is None:  # not a stamped line: nothing to place it by
                out.append(text)
                continue
            key = (when, hashlib.blake2b(line, digest_size=6).hexdigest())
            if (self.floor is not None and when < self.floor) or key in self._seen:
                continue  # given before the engine that recorded it died
            self._recent.append(key)
            out.append(text)
        if out:
            cursor = self._PREFIX + ",".join(f"{w}.{d}" for w, d in self._recent)
            put((b"\n".join(out) + b"\n", cursor if self._recent else ""))


class _Chunks(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the Docker API's streams)."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = iter(chunks)
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            try:
                self._left = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


def _stdout_end(container: Any, window: int) -> tuple[bytes, int]:
    """The last ``window`` bytes of the container's stdout, and how many bytes of their
    first line come before them; streamed, so a huge stdout costs no memory."""
    buf = bytearray()
    cut = 0
    for chunk in container.logs(stdout=True, stderr=False, stream=True):
        buf += chunk
        if len(buf) > 2 * window:
            cut = _drop_head(buf, len(buf) - window, cut)
    if len(buf) > window:
        cut = _drop_head(buf, len(buf) - window, cut)
    return bytes(buf), cut


def _drop_head(buf: bytearray, n: int, cut: int) -> int:
    """Drop ``buf``'s first ``n`` bytes; the new count of first-line bytes before it."""
    newline = buf.rfind(b"\n", 0, n)
    cut = n - newline - 1 if newline >= 0 else cut + n
    del buf[:n]
    return cut


def _check_name(agent_id: str) -> None:
    if not _NAME_RE.fullmatch(agent_id):
        raise ValueError(f"invalid agent id {agent_id!r}: use [A-Za-z0-9][A-Za-z0-9_.-]*")
