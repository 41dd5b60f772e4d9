"""The supervisor of one ``process``-runtime agent. Stdlib only, and import-light on purpose.

Command line::

    python -m agentainer_flow.engine.runtimes._supervisor \\
        AGENT_DIR [--timeout S] [--grace S] [--cwd DIR] -- CMD [ARG...]

``ProcessRuntime`` starts it as ``python -I -S -c "<import this module from its folder>"``
instead: ``-m`` loads ``site`` and the package, which costs tens of milliseconds per launch,
and a script would be compiled on every run. The command comes on the command line and the
environment (secrets included) in the process environment, so nothing secret is ever written
to the agent directory. Only light stdlib modules are imported: not ``json`` (it pulls in
``re``, ~15 ms of start-up), not ``signal`` (``enum``, ~10 ms: ``_signal`` is used), not
``subprocess``, not ``typing``.

The first process forks and exits once the child reported (through a pipe) whether it
claimed the agent directory, so the supervisor is reparented away from the engine: the
engine never holds a child it must reap and may die (even by SIGKILL) without affecting the
agent. The child claims the directory by creating ``supervisor.pid`` exclusively (a hard
link): of several supervisors started for one directory (concurrent launches, a launch
repeated after an engine crash) exactly one wins and the others exit without running
anything (exit code ``EXIT_TAKEN`` of the first process). Having claimed it, the supervisor
reads the ``stop`` marker (``stop`` or ``timeout``): a stop requested before the claim runs
nothing and records the agent stopped. Otherwise it:

* spawns the command in its own process group, stdout/stderr appended to ``stdout.log`` /
  ``stderr.log`` in the agent directory, and records ``agent.pid``;
* enforces ``--timeout`` (SIGTERM to the agent's group, SIGKILL after ``--grace``);
* on SIGTERM/SIGINT/SIGHUP stops the agent the same way (``stopped``), on SIGUSR1 likewise
  but marks the run ``timed_out`` (the runtime's ``wait(timeout=...)`` uses that);
* reaps the agent, kills what is left of its process group, and writes ``result.json``
  atomically and once (temp file, fsync, hard link: the first result written wins):
  ``exit_code`` (negative signal number when killed by a signal), ``started_at``,
  ``finished_at``, ``timed_out``, ``stopped``.

Pid files hold ``{"pid", "start", "boot_id", "started_at"}``: ``start`` is field 22 of
``/proc/<pid>/stat`` (start time in clock ticks since boot) so a reused pid is not mistaken
for the recorded process.
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # typing itself is not imported: start-up time matters here
if TYPE_CHECKING:
    import signal
else:
    try:  # the C module: ``signal`` imports ``enum`` (~10 ms of start-up)
        import _signal as signal
    except ImportError:  # pragma: no cover - not CPython
        import signal

__all__ = [
    "AGENT_PID",
    "EXIT_TAKEN",
    "OUTPUT",
    "RESULT",
    "STDERR",
    "STDOUT",
    "STOP",
    "SUPERVISOR_LOG",
    "SUPERVISOR_PID",
    "boot_id",
    "main",
    "proc_stat",
    "run",
    "write_atomic",
]

SUPERVISOR_PID = "supervisor.pid"
AGENT_PID = "agent.pid"
RESULT = "result.json"
STDOUT = "stdout.log"
STDERR = "stderr.log"
OUTPUT = "output.json"
SUPERVISOR_LOG = "supervisor.log"
STOP = "stop"
#: the first process's exit code when another supervisor owns the directory, or the agent
#: already has a result: nothing was started, the launch adopts what is there
EXIT_TAKEN = 3
_CLAIMED = b"c"
_TAKEN = b"t"

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# the agent starts with default dispositions for these (Python ignores SIGPIPE and SIGXFSZ,
# and the supervisor handles the others)
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
)


def proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start_ticks)`` of ``pid`` from ``/proc``, or None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()  # fields 3.. (comm may hold spaces)
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def boot_id() -> str:
    """The kernel's boot id (empty where there is none): pids do not survive a reboot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return f.read().decode("ascii", "replace").strip()
    except OSError:
        return ""


def write_atomic(path: str, text: str, *, exclusive: bool = False, sync: bool = True) -> bool:
    """Write ``text`` to ``path`` through a temp file and a rename (fsynced unless ``sync``
    is false: pid files need not survive a machine crash, their pids would not either).

    With ``exclusive`` the file is only created if absent (a hard link instead of a rename);
    returns whether ``path`` was written.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    written = True
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                written = False
        else:
            os.replace(tmp, path)
            tmp = ""
    finally:
        if tmp:
            os.unlink(tmp)
    if sync:
        _fsync_dir(os.path.dirname(path) or ".")
    return written


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_value(value: object) -> str:
    # values here are None, bools, ints, finite floats and hex/uuid strings: no escaping needed
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return '"' + value + '"'
    return repr(value)


def _json_object(items: dict[str, object]) -> str:
    return "{" + ", ".join(f'"{k}": {_json_value(v)}' for k, v in items.items()) + "}\n"


def _pid_record(pid: int, started_at: float | None = None) -> str:
    stat = proc_stat(pid)
    return _json_object(
        {
            "pid": pid,
            "start": stat[1] if stat else "",
            "boot_id": boot_id(),
            "started_at": started_at,
        }
    )


class _Supervisor:
    def __init__(self, agent_dir: str, timeout: float | None, grace: float) -> None:
        self.dir = agent_dir
        self.timeout = timeout
        self.grace = grace
        self.pgid = 0  # the agent's process group, once spawned
        self.stopping = False
        self.sent_term = False
        self.timed_out = False
        self.stopped = False

    # -- signal handlers (run in the main thread, between bytecodes) --

    def on_stop(self, signum: int, frame: object) -> None:
        if self.stopping:  # asked twice: no more grace
            self._kill(signal.SIGKILL)
            return
        self.stopped = True
        self._begin_stop()

    def on_timeout_request(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.timed_out = True
            self._begin_stop()

    def on_alarm(self, signum: int, frame: object) -> None:
        if not self.stopping:  # the agent's own timeout
            self.timed_out = True
            self._begin_stop()
        else:  # the grace after SIGTERM is over
            self._kill(signal.SIGKILL)

    def _begin_stop(self) -> None:
        self.stopping = True
        self._deliver_term()
        signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.001))

    def _deliver_term(self) -> None:
        if self.pgid and not self.sent_term:
            self.sent_term = True
            self._kill(signal.SIGTERM)

    def _kill(self, sig: int) -> None:
        if self.pgid:
            try:
                os.killpg(self.pgid, sig)
            except OSError:
                pass

    # -- the run --

    def install_handlers(self) -> None:
        """Handle stop requests before claiming: once ``supervisor.pid`` names this process,
        a SIGTERM must be recorded as a stop, not kill it before it wrote a result."""
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self.on_stop)
        signal.signal(signal.SIGUSR1, self.on_timeout_request)
        signal.signal(signal.SIGALRM, self.on_alarm)

    def claim(self) -> bool:
        """Own the directory: create ``supervisor.pid`` if absent. False when another
        supervisor owns it or the agent already has a result (then nothing may run)."""
        if os.path.exists(os.path.join(self.dir, RESULT)):
            return False
        record = _pid_record(os.getpid(), time.time())
        return write_atomic(os.path.join(self.dir, SUPERVISOR_PID), record, exclusive=True,
                            sync=False)

    def _read_stop_request(self) -> None:
        """A stop asked for before the claim (the ``stop`` marker): run nothing."""
        try:
            with open(os.path.join(self.dir, STOP), "rb") as f:
                request = f.read().strip()
        except FileNotFoundError:
            return
        if not self.stopping:
            self.stopping = True
            if request == b"timeout":
                self.timed_out = True
            else:
                self.stopped = True

    def run(self, cwd: str | None, argv: list[str]) -> None:
        """Run the agent (the directory is claimed) and record its result."""
        self._read_stop_request()
        path = os.path.join
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        out_fd = os.open(path(self.dir, STDOUT), flags, 0o600)
        err_fd = os.open(path(self.dir, STDERR), flags, 0o600)
        started_at = time.time()
        exit_code: int
        if self.stopping:  # stopped before the agent even started
            exit_code = -signal.SIGTERM
        else:
            try:
                if cwd:
                    os.chdir(cwd)
            except OSError as exc:
                message = f"flow: cannot enter working directory {cwd!r}: {exc.strerror}\n"
                os.write(err_fd, message.encode(errors="replace"))
                exit_code = 126
            else:
                exit_code = self._spawn_and_reap(argv, out_fd, err_fd, started_at)
        os.close(out_fd)
        os.close(err_fd)
        result: dict[str, object] = {
            "exit_code": exit_code,
            "started_at": started_at,
            "finished_at": time.time(),
            "timed_out": self.timed_out,
            "stopped": self.stopped,
        }
        # exclusive: a runtime that stopped the agent before the claim may have written it
        write_atomic(path(self.dir, RESULT), _json_object(result), exclusive=True)

    def _spawn_and_reap(self, argv: list[str], out_fd: int, err_fd: int, started_at: float) -> int:
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, out_fd, 1),
                    (os.POSIX_SPAWN_DUP2, err_fd, 2),
                ],
                setpgroup=0,
                setsigdef=_RESET_SIGNALS,
                setsigmask=(),
            )
        except OSError as exc:
            message = f"flow: cannot run {argv[0]!r}: {exc.strerror or exc}\n"
            os.write(err_fd, message.encode(errors="replace"))
            return 127 if isinstance(exc, FileNotFoundError) else 126
        self.pgid = pid
        write_atomic(os.path.join(self.dir, AGENT_PID), _pid_record(pid, started_at), sync=False)
        if self.stopping:
            self._deliver_term()
        elif self.timeout is not None:
            signal.setitimer(signal.ITIMER_REAL, max(self.timeout, 0.001))
        exit_code = self._reap(pid)
        signal.setitimer(signal.ITIMER_REAL, 0)
        self._kill(signal.SIGKILL)  # whatever the agent left behind in its group
        return exit_code

    @staticmethod
    def _reap(pid: int) -> int:
        while True:
            try:
                _, status = os.waitpid(pid, 0)  # retried after signal handlers (PEP 475)
            except ChildProcessError:
                return -1
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return os.waitstatus_to_exitcode(status)


def _parse_args(args: list[str]) -> tuple[str, float | None, float, str | None, list[str]]:
    if "--" not in args:
        raise SystemExit("usage: _supervisor AGENT_DIR [--timeout S] [--grace S] [--cwd D] -- CMD")
    split = args.index("--")
    options, argv = args[:split], args[split + 1 :]
    if not options or not argv:
        raise SystemExit("_supervisor: an agent directory and a command are required")
    agent_dir = options[0]
    timeout: float | None = None
    grace = 5.0
    cwd: str | None = None
    rest = options[1:]
    while rest:
        if len(rest) < 2:
            raise SystemExit(f"_supervisor: {rest[0]} needs a value")
        key, value = rest[0], rest[1]
        rest = rest[2:]
        if key == "--timeout":
            timeout = float(value) if value else None
        elif key == "--grace":
            grace = float(value)
        elif key == "--cwd":
            cwd = value or None
        else:
            raise SystemExit(f"_supervisor: unknown option {key}")
    return agent_dir, timeout, grace, cwd, argv


def main(args: list[str] | None = None) -> int:
    agent_dir, timeout, grace, cwd, argv = _parse_args(sys.argv[1:] if args is None else args)
    agent_dir = os.path.abspath(agent_dir)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        # the launcher waits for this process: it ends once the supervisor owns the directory
        # (0), found it owned or finished (EXIT_TAKEN), or died before saying (1)
        os.close(write_end)
        try:
            answer = os.read(read_end, 1)
        finally:
            os.close(read_end)
        return 0 if answer == _CLAIMED else EXIT_TAKEN if answer == _TAKEN else 1
    os.close(read_end)
    code = 0
    try:
        supervisor = _Supervisor(agent_dir, timeout, grace)
        supervisor.install_handlers()
        claimed = supervisor.claim()
        try:  # the claim is what counts: run even if nobody is left to hear about it
            os.write(write_end, _CLAIMED if claimed else _TAKEN)
        except OSError:
            pass
        os.close(write_end)
        if claimed:
            supervisor.run(cwd, argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def run() -> None:
    """The command-line entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
