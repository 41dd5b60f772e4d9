"""The ``process`` runtime: agents run as local subprocesses under a small detached supervisor.

Each agent gets a directory ``<root>/<agent_id>``. ``root`` comes from the store's location
(``default_agent_root``): ``$FLOW_HOME/agents`` if set, else next to a SQLite database file,
else a per-store folder under ``$XDG_STATE_HOME``; never the working directory, so engines
resuming one store from anywhere find the same agents. The directory holds:

``spec.json``        non-secret metadata: name, image, command argv, labels, timeout, cwd,
                     created time. The environment is *not* written: env values may be
                     secrets, so they reach the agent only through the process environment.
``launch.lock``      ``flock``-ed by the process launching the agent until a supervisor owns
                     the directory: a directory nobody owns or locks is an interrupted launch.
``supervisor.pid``,  ``{"pid", "start", "boot_id", "started_at"}``; ``start`` is the process
``agent.pid``        start time (``/proc/<pid>/stat`` field 22) so a reused pid is not taken
                     for the agent. ``supervisor.pid`` is the supervisor's exclusive claim.
``stop``             a stop asked for before a supervisor owned the directory.
``stdout.log``,      the agent's output streams.
``stderr.log``
``output.json``      where ``$FLOW_OUTPUT`` points: the agent's reported output.
``result.json``      written once (exclusively) when the agent is gone: exit code,
                     start/finish times, ``timed_out``, ``stopped``.
``supervisor.log``   the supervisor's own errors, if any.

The directory is the agent's identity, and ``launch`` is idempotent from every state it can
be left in by a crash: it creates the directory atomically (a rename of a prepared temp
directory, locked before the rename), then starts a supervisor unless one owns the directory
or a result exists. The supervisor claims the directory exclusively before it runs anything
and ``launch`` returns once some supervisor owns it, so launching an id twice, concurrently
or after an engine died anywhere in a launch, runs the command once. The supervisor
(``_supervisor.py``) double-forks out of the engine into its own session, so the agent
survives the engine being killed and a new engine adopts it by its directory:
``lookup``/``wait`` read the pid files and ``result.json``; a claimed directory with no result
and nothing alive (a killed supervisor, a reboot) is a lost agent (exit code -1), and so is an
interrupted launch nobody completed. The outcome (output, log tail) is always computed from
the files, so every reader gets the same one.

The command argv *is* written to ``spec.json`` (and is visible in ``ps``); it is not secret-free
in general, so the engine must redact secret values before the argv reaches the event log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._testhooks import reach
from ..errors import ConfigurationError
from ..secrets import redact_known
from . import _supervisor as sup
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
    store_label,
)

__all__ = ["ProcessRuntime", "default_agent_root"]

SPEC = "spec.json"
LAUNCH_LOCK = "launch.lock"
#: where ``flock`` is not supported: an unowned directory younger than this is taken for a
#: launch under way (elsewhere the lock says it exactly)
_SPAWN_GRACE = 10.0
#: the SDK's default store, whose agents live in ``.flow/agents``
_DEFAULT_STORE = "sqlite:///.flow/flow.db"
_ENGINE_SECRET_PREFIX = "FLOW_SECRET"
_LOG_TAIL_LINES = 50
_LOG_TAIL_CHARS = 4096
_LOST = (
    "flow: agent lost: its supervisor is gone and no result was recorded "
    "(supervisor killed or machine rebooted)"
)
_NEVER_STARTED = (
    "flow: agent never started: its launch was interrupted before a supervisor took it "
    "(launching it again completes the launch)"
)


def default_agent_root(store_url: str) -> Path:
    """Where the ``process`` runtime keeps the agents of the store at ``store_url``.

    ``$FLOW_HOME/agents`` if set; else ``X/agents`` for ``sqlite:///X/flow.db`` (next to the
    database file); else ``$XDG_STATE_HOME`` (default ``~/.local/state``)
    ``/agentainer-flow/<hash of the store>/agents``. Always absolute: an engine resuming the
    store from another working directory must find the agents the first one launched.
    """
    home = os.environ.get("FLOW_HOME")
    if home:
        return Path(home).expanduser().absolute() / "agents"
    database = _sqlite_file(store_url)
    if database is not None:
        return database.parent / "agents"
    state = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    digest = store_label(store_url)
    return base / "agentainer-flow" / digest / "agents"


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite store URL, resolved as the store resolves it."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("sqlite", "sqlite+aiosqlite"):
        return None
    import sqlalchemy as sa

    try:
        database = sa.make_url(url).database or ""
    except sa.exc.ArgumentError:
        return None
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser().absolute()


def _supervisor_argv(python: str) -> list[str]:
    """How to start the supervisor quickly: ``-I -S`` skips ``site`` (the editable-install
    finder alone costs tens of ms) and ``PYTHON*`` variables; importing the module from its
    directory, rather than running it as a script, reuses its cached bytecode."""
    path = os.path.abspath(sup.__file__)
    if os.path.isfile(path) and path.endswith(".py"):
        folder = os.path.dirname(path)
        code = f"import sys; sys.path[:0] = [{folder!r}]; import _supervisor; _supervisor.run()"
        return [python, "-I", "-S", "-c", code]
    return [python, "-m", "agentainer_flow.engine.runtimes._supervisor"]


@dataclass(frozen=True, slots=True)
class _Pid:
    pid: int
    start: str
    boot_id: str
    started_at: float | None


def _read_pid(path: Path) -> _Pid | None:
    data = _read_json(path)
    if data is None:
        return None
    try:
        started_at = data.get("started_at")
        return _Pid(
            pid=int(data["pid"]),
            start=str(data.get("start") or ""),
            boot_id=str(data.get("boot_id") or ""),
            started_at=float(started_at) if started_at is not None else None,
        )
    except (KeyError, TypeError, ValueError):
        return None


def _alive(p: _Pid) -> bool:
    """Whether the recorded process still runs (not a zombie, not a reuse of its pid)."""
    if p.pid <= 0:
        return False
    if p.boot_id and p.boot_id != sup.boot_id():
        return False
    stat = sup.proc_stat(p.pid)
    if stat is not None:
        state, start = stat
        return state not in ("Z", "X", "x") and (not p.start or start == p.start)
    if os.path.isdir("/proc/self"):
        return False  # there is a /proc and the pid is not in it
    try:  # no /proc (macOS): best effort
        os.kill(p.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _note(result: Mapping[str, Any]) -> str:
    """What the log tail says of an agent that ended without a supervisor's result."""
    if result.get("never_started"):
        return _NEVER_STARTED + "\n"
    return _LOST + "\n" if result.get("lost") else ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_tail(path: Path, max_bytes: int) -> str:
    """The end of a file (at most ``max_bytes``, starting on a line boundary)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    if start > 0:
        newline = data.find(b"\n")
        data = data[newline + 1 :] if newline >= 0 else b""
    return data.decode("utf-8", "replace")


def _read_agent_output(agent_dir: Path) -> dict[str, Any]:
    """The output protocol on an agent's directory: its output file, else stdout's end (the
    file and the last line are sized before they are read, so a huge one costs no memory)."""
    limit = max_output_bytes()
    path = agent_dir / sup.OUTPUT
    try:
        size: int | None = path.stat().st_size
    except OSError:
        size = None
    data = None
    if size is not None and size <= limit:
        try:
            data = path.read_bytes()
        except OSError:
            data = None
    tail, cut = _stdout_end(agent_dir / sup.STDOUT, limit + STDOUT_WINDOW_SLACK)
    return read_output(data, tail, first_line_cut=cut, output_file_size=size, limit=limit)


def _stdout_end(path: Path, window: int) -> tuple[bytes, int]:
    """The last ``window`` bytes of a file, and how many bytes of their first line come
    before them (found by scanning back for the newline, without keeping what is read)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - window)
            f.seek(start)
            data = f.read()
            cut = 0
            pos = start
            while pos > 0:
                step = min(pos, 1024 * 1024)
                f.seek(pos - step)
                chunk = f.read(step)
                newline = chunk.rfind(b"\n")
                if newline >= 0:
                    cut += step - newline - 1
                    break
                cut += step
                pos -= step
    except OSError:
        return b"", 0
    return data, cut


_FOLLOW_CHUNK = 256 * 1024
_FOLLOW_POLL = 0.25  # seconds between looks at a running agent's output files


def _offsets(cursor: str) -> list[int]:
    try:
        out, err = (int(x) for x in cursor.split(":"))
    except ValueError:
        return [0, 0]
    return [max(0, out), max(0, err)]


def _new_lines(path: Path, offset: int, final: bool) -> tuple[bytes, int, bool]:
    """Whole lines written to ``path`` past ``offset`` (at most a chunk; everything left once
    the writer is ``final``), the new offset, and whether more is there to read."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(_FOLLOW_CHUNK + 1)
    except OSError:
        return b"", offset, False
    more = len(data) > _FOLLOW_CHUNK
    data = data[:_FOLLOW_CHUNK]
    if not final or more:
        end = data.rfind(b"\n") + 1
        if end == 0 and len(data) == _FOLLOW_CHUNK:
            end = len(data)  # a line longer than a chunk: give it in pieces
        data = data[:end]
    return data, offset + len(data), more


def _tail_lines(path: Path, lines: int) -> str:
    if lines <= 0:
        return ""
    text = _read_tail(path, max(64 * 1024, lines * 512))
    kept = text.splitlines(keepends=True)[-lines:]
    out = "".join(kept)
    return out if not out or out.endswith("\n") else out + "\n"


def _log_tail(agent_dir: Path, note: str = "") -> str:
    """The last ~50 lines of stderr then stdout, capped at ~4 KB (stdout keeps up to 1 KB)."""
    err = _tail_lines(agent_dir / sup.STDERR, _LOG_TAIL_LINES)
    out = _tail_lines(agent_dir / sup.STDOUT, _LOG_TAIL_LINES)
    budget = _LOG_TAIL_CHARS - len(note)
    err = _last(err, budget - min(len(out), 1024))
    out = _last(out, budget - len(err))
    return err + out + note


def _last(text: str, chars: int) -> str:
    return text[len(text) - chars :] if chars > 0 else ""


def _check_agent_id(agent_id: str) -> None:
    ok = (
        0 < len(agent_id) <= 200
        and agent_id[0].isascii()
        and agent_id[0].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in agent_id)
    )
    if not ok:
        raise ValueError(f"invalid agent id {agent_id!r}: use [A-Za-z0-9][A-Za-z0-9_.-]*")


def _image_keys(image: str) -> list[str]:
    """``image`` itself, then without its tag/digest, then with ``:latest`` if it had none."""
    keys = [image]
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    if name not in keys:
        keys.append(name)
    if image == name:
        keys.append(f"{name}:latest")
    return keys


class ProcessRuntime(AgentRuntime):
    """Runs agents as local subprocesses, one detached supervisor per agent.

    ``images`` maps container images to commands so that workflows written for images run
    locally; a key without a tag (``"my-fetcher"``) matches any tag of that image. A command
    given to ``deploy_agent`` wins over the mapping.

    The command argv and labels are written to ``spec.json`` in clear; the environment never
    is (it reaches the agent through the supervisor's process environment). Secrets placed
    into the argv are therefore on disk: the engine redacts them from events, not from here.
    """

    name = "process"
    follows_logs = True

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        images: Mapping[str, Sequence[str]] | None = None,
        poll_interval: float = 0.05,
        python: str = sys.executable,
        cwd: str | Path | None = None,
        kill_grace: float = 5.0,
    ) -> None:
        """``cwd``: the agents' working directory (default: the engine's at launch time).
        ``kill_grace``: seconds between SIGTERM and SIGKILL when stopping an agent."""
        if root is None:  # a runtime without a store: the default store's agents
            root = default_agent_root(_DEFAULT_STORE)
        self.root = Path(root).absolute()
        self.images: dict[str, list[str]] = {k: list(v) for k, v in (images or {}).items()}
        self.poll_interval = poll_interval
        self.python = python
        self.cwd = Path(cwd).absolute() if cwd is not None else None
        self.kill_grace = kill_grace

    # -- paths --

    def agent_dir(self, agent_id: str) -> Path:
        """The directory of ``agent_id`` (it exists once the agent was launched)."""
        _check_agent_id(agent_id)
        return self.root / agent_id

    async def open(self) -> None:
        """Create the root; clear what killed launches left there long ago."""
        self.root.mkdir(parents=True, exist_ok=True)
        await self.cleanup_orphans()

    # -- launch --

    def command_for(self, spec: AgentSpec) -> list[str]:
        """The argv ``spec`` runs: its command, else its image's mapped command."""
        if spec.command:
            return list(spec.command)
        for key in _image_keys(spec.image):
            command = self.images.get(key)
            if command:
                return list(command)
        raise ConfigurationError(
            f"agent '{spec.name}': no command for image '{spec.image}': pass command=[...] to "
            f"deploy_agent or map the image with ProcessRuntime(images={{'{spec.image}': [...]}})"
        )

    async def launch(self, spec: AgentSpec) -> None:
        """Start the agent, or adopt it: safe to repeat from any state a crash left.

        No directory: create it and start a supervisor. A directory nobody owns and nobody
        is launching (its launcher died before or while starting the supervisor): start a
        supervisor again; the claim is exclusive, so a supervisor of the dead launcher that
        is still starting and this one cannot both run the agent. Owned, or with a result:
        adopt it. Returns once a supervisor owns the directory (or it has a result)."""
        final = self.agent_dir(spec.agent_id)
        lock: int | None = None
        try:
            while True:
                if lock is None and not final.is_dir():
                    lock = self._create(spec, final)
                    if lock is not None:
                        reach("agent.dir_created")
                if _settled(final):
                    return  # adopt
                if lock is None:
                    lock = _try_lock(final)
                    if lock is None:  # another launch is under way: let it finish
                        await asyncio.sleep(self.poll_interval)
                        continue
                    if _settled(final):
                        return
                await self._spawn(spec, final)
                return
        finally:
            if lock is not None:
                os.close(lock)

    def _create(self, spec: AgentSpec, final: Path) -> int | None:
        """Create the agent directory, locked (so it never looks abandoned to others).

        Returns the held lock, or None if the directory was created concurrently."""
        command = self.command_for(spec)
        self.root.mkdir(parents=True, exist_ok=True)
        cwd = self.cwd or Path.cwd()
        tmp = self.root / f".tmp-{spec.agent_id}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        lock: int | None = None
        # an argv holding secret values is not recorded (``_spawn`` then takes it from the
        # spec again); people see it redacted under "command_redacted"
        shown = [redact_known(arg) for arg in command]
        try:
            lock = _try_lock(tmp)  # a fresh file: nobody else can hold it
            meta = {
                "agent_id": spec.agent_id,
                "name": spec.name,
                "image": spec.image,
                "command": command if shown == command else None,
                **({} if shown == command else {"command_redacted": shown}),
                "labels": dict(spec.labels),
                "resources": dict(spec.resources),
                "network": spec.network,
                "timeout": spec.timeout,
                "cwd": str(cwd),
                "runtime": self.name,
                "created_at": time.time(),
            }
            (tmp / SPEC).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    return None  # created concurrently by someone else
                raise
            held, lock = lock, None
            return held
        finally:
            if lock is not None:
                os.close(lock)
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    async def _spawn(self, spec: AgentSpec, agent_dir: Path) -> None:
        """Start a supervisor for the unowned ``agent_dir`` and wait until it, or another
        one, owns it. The command and working directory are the recorded ones."""
        meta = _read_json(agent_dir / SPEC) or {}
        command = meta.get("command")
        if not (isinstance(command, list) and command and all(isinstance(c, str) for c in command)):
            command = self.command_for(spec)
        recorded_cwd = meta.get("cwd")
        cwd = recorded_cwd if isinstance(recorded_cwd, str) and recorded_cwd else str(
            self.cwd or Path.cwd()
        )
        # the engine's own secrets (FLOW_SECRET_<NAME>, FLOW_SECRETS_KEY) are not inherited:
        # an agent gets the secrets its spec passes, nothing else
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENGINE_SECRET_PREFIX)}
        env.update(spec.env)
        env["FLOW_OUTPUT"] = str(agent_dir / sup.OUTPUT)
        env["FLOW_AGENT_ID"] = spec.agent_id
        env["FLOW_AGENT_NAME"] = spec.name
        argv = [*_supervisor_argv(self.python), str(agent_dir)]
        if spec.timeout is not None:
            argv += ["--timeout", repr(float(spec.timeout))]
        argv += ["--grace", repr(float(self.kill_grace)), "--cwd", cwd, "--", *command]
        try:
            proc = _start_supervisor(argv, env, agent_dir)
        except Exception:
            self._abandon(agent_dir)
            raise
        reach("agent.supervisor_spawned")
        # the first supervisor process forks the real one and exits once that one claimed the
        # directory (or found it owned)
        try:
            await self._wait_child(proc)
        except BaseException:
            proc.wait()  # cancelled: it only waits for the claim, so this is brief
            raise
        if proc.returncode in (0, sup.EXIT_TAKEN) and _settled(agent_dir):
            return
        log_text = _read_tail(agent_dir / sup.SUPERVISOR_LOG, 4096).strip()
        self._abandon(agent_dir)
        raise RuntimeError(
            f"agent '{spec.name}': the process supervisor failed to start "
            f"(exit code {proc.returncode}){': ' + log_text if log_text else ''}"
        )

    async def _wait_child(self, proc: subprocess.Popen[bytes]) -> None:
        """Reap a short-lived child without blocking the event loop."""
        fd = _pidfd_open(proc.pid)
        if fd is None:
            await asyncio.to_thread(proc.wait)
            return
        try:
            await _readable(fd, None)
        finally:
            os.close(fd)
        proc.wait()

    def _abandon(self, agent_dir: Path) -> None:
        """A launch that failed: make sure nothing runs, forget the directory if unowned."""
        _request_stop(agent_dir, timed_out=False)
        if not (agent_dir / sup.SUPERVISOR_PID).exists():
            self._discard(agent_dir)

    def _discard(self, agent_dir: Path) -> None:
        """Delete an agent directory (renamed away first, so it vanishes at once)."""
        trash = self.root / f".trash-{agent_dir.name}-{secrets.token_hex(4)}"
        try:
            os.rename(agent_dir, trash)
        except FileNotFoundError:
            return
        except OSError:
            trash = agent_dir
        shutil.rmtree(trash, ignore_errors=True)

    # -- state --

    async def lookup(self, agent_id: str) -> AgentStatus:
        return self._status(self.agent_dir(agent_id))

    def _status(self, agent_dir: Path) -> AgentStatus:
        if not agent_dir.is_dir():
            return AgentStatus(AgentState.MISSING)
        result = _read_json(agent_dir / sup.RESULT)
        if result is not None:
            return AgentStatus(AgentState.EXITED, self._outcome(agent_dir, result))
        # the lock first: a launch that ends between the two checks has claimed by then
        if _launch_under_way(agent_dir) or self._live_pid(agent_dir) is not None:
            return AgentStatus(AgentState.RUNNING)
        result = _read_json(agent_dir / sup.RESULT)  # it may have finished meanwhile
        if result is None:
            result = {"exit_code": -1, "lost": True}
            if not (agent_dir / sup.SUPERVISOR_PID).exists():
                result["never_started"] = True
        return AgentStatus(AgentState.EXITED, self._outcome(agent_dir, result))

    def _live_pid(self, agent_dir: Path) -> _Pid | None:
        """The supervisor if it runs, else the agent if it runs (supervisor killed), else None."""
        for name in (sup.SUPERVISOR_PID, sup.AGENT_PID):
            p = _read_pid(agent_dir / name)
            if p is not None and _alive(p):
                return p
        return None

    @staticmethod
    def _outcome(agent_dir: Path, result: Mapping[str, Any]) -> AgentOutcome:
        output: dict[str, Any] = {}
        problem = ""
        try:
            output = _read_agent_output(agent_dir)
        except AgentOutputProblem as exc:
            problem = str(exc)
        started_at = result.get("started_at")
        finished_at = result.get("finished_at")
        lost = bool(result.get("lost"))
        if lost and started_at is None:
            agent = _read_pid(agent_dir / sup.AGENT_PID)
            started_at = agent.started_at if agent else None
        return AgentOutcome(
            exit_code=int(result.get("exit_code", -1)),
            output=output,
            log_tail=_log_tail(agent_dir, _note(result)),
            started_at=float(started_at) if started_at is not None else None,
            finished_at=float(finished_at) if finished_at is not None else None,
            timed_out=bool(result.get("timed_out", False)),
            output_error=problem,
        )

    # -- wait / stop --

    async def wait(self, agent_id: str, timeout: float | None = None) -> AgentOutcome:
        agent_dir = self.agent_dir(agent_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            status = self._status(agent_dir)
            if status.state is AgentState.MISSING:
                raise LookupError(f"no agent {agent_id!r} under {self.root}")
            if status.outcome is not None:
                return status.outcome
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            live = self._live_pid(agent_dir)
            if live is None:  # being launched by someone else
                await asyncio.sleep(self.poll_interval)
            else:
                await self._wait_exit(live, remaining)
        await self._terminate(agent_dir, timed_out=True)
        outcome = self._status(agent_dir).outcome
        if outcome is None:  # removed meanwhile
            raise LookupError(f"no agent {agent_id!r} under {self.root}")
        return replace(outcome, timed_out=True)

    async def _wait_exit(self, p: _Pid, seconds: float | None) -> bool:
        """Wait until process ``p`` is gone (a pidfd where the kernel has them, else polling).

        Returns False on timeout. Cancelling only stops the waiting."""
        fd = _pidfd_open(p.pid)
        if fd is not None:
            try:
                if not _alive(p):  # the pid was reused before we opened it
                    return True
                if not await _readable(fd, seconds):
                    return False
                _reap_if_ours(fd)
                return True
            finally:
                os.close(fd)
        loop = asyncio.get_running_loop()
        deadline = None if seconds is None else loop.time() + seconds
        while _alive(p):
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval)
        return True

    async def stop(self, agent_id: str) -> None:
        await self._terminate(self.agent_dir(agent_id), timed_out=False)

    async def _terminate(self, agent_dir: Path, *, timed_out: bool) -> None:
        """Stop the agent and make sure ``result.json`` exists afterwards (unless the agent
        was lost: its outcome is known without one)."""
        result_path = agent_dir / sup.RESULT
        if _stop_before_start(agent_dir, timed_out=timed_out):
            return
        if self._status(agent_dir).state is not AgentState.RUNNING:
            return
        supervisor = _read_pid(agent_dir / sup.SUPERVISOR_PID)
        if supervisor is not None and _alive(supervisor):
            # the supervisor stops the agent (SIGTERM, SIGKILL after the grace) and records it
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor.pid, signal.SIGUSR1 if timed_out else signal.SIGTERM)
            if not await self._wait_exit(supervisor, self.kill_grace + 5.0):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(supervisor.pid, signal.SIGKILL)
                await self._wait_exit(supervisor, 5.0)
            if result_path.exists():
                return
        # no supervisor to do it: stop the agent's process group ourselves
        agent = _read_pid(agent_dir / sup.AGENT_PID)
        exit_code = -1
        if agent is not None and _alive(agent):
            exit_code = -signal.SIGTERM
            _killpg(agent.pid, signal.SIGTERM)
            if not await self._wait_exit(agent, self.kill_grace):
                exit_code = -signal.SIGKILL
                _killpg(agent.pid, signal.SIGKILL)
                await self._wait_exit(agent, 5.0)
            _killpg(agent.pid, signal.SIGKILL)
        result: dict[str, Any] = {
            "exit_code": exit_code,
            "started_at": agent.started_at if agent else None,
            "finished_at": time.time(),
            "timed_out": timed_out,
            "stopped": not timed_out,
        }
        if exit_code == -1:
            result["lost"] = True
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            sup.write_atomic(str(result_path), json.dumps(result) + "\n", exclusive=True)

    # -- logs / remove --

    async def logs(self, agent_id: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the agent's output. The two streams are kept in
        separate files, so their interleaving is not known: stderr's lines come first, then
        stdout's (where an agent's last words, its output, usually are)."""
        agent_dir = self.agent_dir(agent_id)
        text = _tail_lines(agent_dir / sup.STDERR, tail) + _tail_lines(agent_dir / sup.STDOUT, tail)
        return "".join(text.splitlines(keepends=True)[-tail:]) if tail > 0 else ""

    async def follow_logs(self, agent_id: str,
                          cursor: str = "") -> AsyncIterator[tuple[str, str]]:
        """Stdout then stderr lines as the files grow (polled); the cursor is the two files'
        offsets, ``"OUT:ERR"``."""
        agent_dir = self.agent_dir(agent_id)
        offsets = _offsets(cursor)
        while True:
            finished = self._finished(agent_dir)
            parts = []
            more = False
            for i, name in enumerate((sup.STDOUT, sup.STDERR)):
                data, offsets[i], full = _new_lines(agent_dir / name, offsets[i], finished)
                more = more or full
                if data:
                    parts.append(data.decode("utf-8", "replace"))
            if parts:
                yield "".join(parts), f"{offsets[0]}:{offsets[1]}"
            if finished and not more:
                return
            if not more:
                await asyncio.sleep(_FOLLOW_POLL)

    def _finished(self, agent_dir: Path) -> bool:
        """Whether the agent has ended (or its directory is gone): nothing more to print."""
        if not agent_dir.is_dir() or (agent_dir / sup.RESULT).exists():
            return True
        return not _launch_under_way(agent_dir) and self._live_pid(agent_dir) is None

    async def list_agents(self) -> list[AgentEntry]:
        """The agent directories under the root, with the execution in their labels."""
        return await asyncio.to_thread(self._list_agents)

    def _list_agents(self) -> list[AgentEntry]:
        try:
            names = [e.name for e in os.scandir(self.root)
                     if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")]
        except OSError:
            return []
        out = []
        for name in names:
            labels = (_read_json(self.root / name / SPEC) or {}).get("labels") or {}
            execution = labels.get("flow.execution") if isinstance(labels, dict) else None
            if isinstance(execution, str) and execution:
                out.append(AgentEntry(name, execution, str(labels.get("flow.store", "")),
                                      running=not self._finished(self.root / name)))
        return out

    async def remove(self, agent_id: str) -> None:
        """Stop the agent if it may still run (or start: an interrupted launch), then delete
        its directory. Works in every state; a directory already gone is fine."""
        agent_dir = self.agent_dir(agent_id)
        if not agent_dir.is_dir():
            return
        await self._terminate(agent_dir, timed_out=False)
        _reap_exited(_read_pid(agent_dir / sup.SUPERVISOR_PID))
        self._discard(agent_dir)

    async def cleanup_orphans(self, older_than: float = 300.0) -> int:
        """Delete what killed launches and removals left under the root (``.tmp-*``,
        ``.trash-*`` older than ``older_than`` seconds). Best effort; returns how many."""
        return await asyncio.to_thread(self._cleanup_orphans, older_than)

    def _cleanup_orphans(self, older_than: float) -> int:
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return 0
        cutoff = time.time() - older_than
        removed = 0
        for entry in entries:
            if not entry.name.startswith((".tmp-", ".trash-")):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
            except OSError:
                continue
            path = Path(entry.path)
            if entry.name.startswith(".tmp-") and _launch_under_way(path):
                continue  # a (very slow) launch is preparing it
            shutil.rmtree(path, ignore_errors=True)
            removed += not path.exists()
        return removed


def _settled(agent_dir: Path) -> bool:
    """Whether a supervisor owns the directory or the agent has a result: nothing to start."""
    return (agent_dir / sup.SUPERVISOR_PID).exists() or (agent_dir / sup.RESULT).exists()


def _try_lock(agent_dir: Path) -> int | None:
    """Take the directory's launch lock: the fd holding it, or None if another process holds
    it or the directory is gone. Where ``flock`` is not supported the fd holds nothing (the
    supervisor's exclusive claim still keeps the agent from running twice)."""
    try:
        fd = os.open(agent_dir / LAUNCH_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass  # no flock on this file system
    return fd


def _launch_under_way(agent_dir: Path) -> bool:
    """Whether a live process holds the directory's launch lock (it is starting a
    supervisor). Where ``flock`` is not supported: whether the directory is young."""
    try:
        fd = os.open(agent_dir / LAUNCH_LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
    except BlockingIOError:
        return True
    except OSError:
        try:
            return time.time() - (agent_dir / SPEC).stat().st_mtime < _SPAWN_GRACE
        except OSError:
            return False
    finally:
        os.close(fd)
    return False


def _request_stop(agent_dir: Path, *, timed_out: bool) -> None:
    """Leave the ``stop`` marker: a supervisor that claims the directory later runs nothing."""
    with contextlib.suppress(OSError):
        sup.write_atomic(str(agent_dir / sup.STOP), "timeout\n" if timed_out else "stop\n",
                         sync=False)


def _stop_before_start(agent_dir: Path, *, timed_out: bool) -> bool:
    """The part of a stop that needs no supervisor: True when there is nothing to signal
    (the directory is gone, has a result, or was never claimed and now never will be)."""
    result_path = agent_dir / sup.RESULT
    if not agent_dir.is_dir() or result_path.exists():
        return True
    # marker, then claim check; a supervisor does claim, then marker check: whatever the
    # interleaving, either we see its claim and signal it, or it sees the marker
    _request_stop(agent_dir, timed_out=timed_out)
    if (agent_dir / sup.SUPERVISOR_PID).exists():
        return False
    # never started, and now never will: record it (a supervisor that claims meanwhile
    # records the same; whichever is first wins)
    stopped = {"exit_code": -signal.SIGTERM, "started_at": None, "finished_at": time.time(),
               "timed_out": timed_out, "stopped": not timed_out}
    with contextlib.suppress(FileNotFoundError):
        sup.write_atomic(str(result_path), json.dumps(stopped) + "\n", exclusive=True)
    return result_path.exists() or not agent_dir.is_dir()


def _start_supervisor(
    argv: list[str], env: dict[str, str], agent_dir: Path
) -> subprocess.Popen[bytes]:
    """Start the supervisor's first process (fork+exec: fast enough to do on the loop)."""
    with open(agent_dir / sup.SUPERVISOR_LOG, "ab") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            cwd=agent_dir,
            start_new_session=True,
        )


def _reap_exited(p: _Pid | None) -> None:
    """Reap the recorded process if it is an exited (zombie) child of this process."""
    if p is None or _alive(p):
        return
    stat = sup.proc_stat(p.pid)
    if stat is None or stat[0] != "Z" or (p.start and stat[1] != p.start):
        return
    fd = _pidfd_open(p.pid)
    if fd is not None:
        try:
            _reap_if_ours(fd)
        finally:
            os.close(fd)


def _reap_if_ours(pidfd: int) -> None:
    """Reap an exited supervisor if it was reparented to this process (an engine running as
    PID 1 or as a child subreaper would otherwise collect zombies)."""
    p_pidfd = getattr(os, "P_PIDFD", None)
    if p_pidfd is not None:
        with contextlib.suppress(OSError):
            os.waitid(p_pidfd, pidfd, os.WEXITED | os.WNOHANG)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


def _pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid`` (readable once it exits), or None where unsupported or gone."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        fd: int = opener(pid)
    except OSError:
        return None
    return fd


async def _readable(fd: int, seconds: float | None) -> bool:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def on_ready() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_ready)
    try:
        async with asyncio.timeout(seconds):
            await ready
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(fd)
