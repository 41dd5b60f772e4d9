"""Database outages are ridden out: a lost connection, a server restart, a locked or read-only
SQLite file. Against the real PostgreSQL server (its backends terminated, the server itself
restarted) and a TCP proxy in front of it that cuts connections at chosen moments."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import LogCapture

from agentainer_flow import Context, ExecutionMode, WorkflowClient, step, workflow
from agentainer_flow.store import (
    AppendConflictError,
    NewExecution,
    StoreUnavailableError,
    create_store,
)
from agentainer_flow.store.events import ExecutionStarted, StepCompleted, StepStarted
from agentainer_flow.store.postgres import PostgresEventStore
from agentainer_flow.store.sqlite import SQLiteEventStore
from agentainer_flow.testing import mock_agent, reset_mocks

# helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def captured_logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog entry (any level) logged inside the block."""
    old = structlog.get_config()
    capture = LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**old)


def named(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


def admin_conninfo(postgres_server: str) -> str:
    url = sa.make_url(postgres_server).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def database_of(postgres_url: str) -> str:
    name = sa.make_url(postgres_url).database
    assert name
    return name


async def new_execution(store: Any, eid: str) -> None:
    await store.create_execution(
        NewExecution(id=eid, workflow_name="wf"), ExecutionStarted(workflow_name="wf")
    )


class Proxy:
    """A TCP proxy in front of the Postgres server.

    ``close()`` makes its port refuse connections (a server that stays down); ``arm(marker)``
    cuts the next connection that sends ``marker``: after the server answered it (the
    statement ran and committed, but the client never hears of it), or before the server
    gets it (``after=False``).
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._marker: bytes | None = None
        self._after = True
        self._hang = False
        self.cut = threading.Event()
        self._closed = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, postgres_url: str, **query: str) -> str:
        url = sa.make_url(postgres_url).set(host="127.0.0.1", port=self.port)
        return url.update_query_dict(query).render_as_string(hide_password=False)

    def arm(self, marker: bytes, *, after: bool = True, hang: bool = False) -> None:
        """Cut (or, ``hang``: leave unanswered, open) the next connection sending
        ``marker``."""
        with self._lock:
            self._marker, self._after, self._hang = marker, after, hang
            self.cut.clear()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(10)
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
                pump = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
                self._threads.append(pump)
            pump.start()

    def _take_marker(self, data: bytes) -> bool | None:
        """Whether to cut after (True) or before (False) forwarding ``data``; None: don't."""
        with self._lock:
            if self._marker is None or self._marker not in data:
                return None
            self._marker = None
            return self._after

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(client, selectors.EVENT_READ)
                selector.register(upstream, selectors.EVENT_READ)
                tail = b""  # the end of what the client sent: a marker split in two
                answered_cuts = False  # the marker went through: cut at the server's answer
                while True:
                    ready = selector.select(timeout=30 if answered_cuts else None)
                    if not ready:
                        return  # no answer: a test fails, not hangs
                    for key, _ in ready:
                        source = key.fileobj
                        assert isinstance(source, socket.socket)
                        data = source.recv(65536)
                        if not data:
                            return
                        if source is upstream:
                            if answered_cuts:  # the server ran it: the client never hears
                                self.cut.set()
                                return
                            client.sendall(data)
                            continue
                        if answered_cuts:  # the rest of the client's messages, e.g. Sync
                            upstream.sendall(data)
                            continue
                        window = tail + data
                        tail = window[-64:]
                        cut = self._take_marker(window)
                        if cut is None:
                            upstream.sendall(data)
                            continue
                        if self._hang:  # it runs, and the client never hears back
                            upstream.sendall(data)
                            self.cut.set()
                            client.settimeout(20)  # then closed: a test fails, not hangs
                            with contextlib.suppress(TimeoutError):
                                while more := client.recv(65536):
                                    upstream.sendall(more)
                            return
                        if cut:  # let it run, and cut when the server answers: it ran
                            upstream.sendall(data)
                            answered_cuts = True
                            continue
                        self.cut.set()
                        return
        except OSError:
            return
        finally:
            with self._lock:
                for sock in (client, upstream):
                    if sock in self._sockets:
                        self._sockets.remove(sock)
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@pytest.fixture
def proxy(postgres_url: str) -> Iterator[Proxy]:
    url = sa.make_url(postgres_url)
    opened = Proxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        yield opened
    finally:
        opened.close()


# a workflow in the middle of its run -----------------------------------------------------

#: how many times each (execution, step) body ran in this process
BODY_RUNS: Counter[tuple[str, str]] = Counter()


@workflow(name="outage_flow")
class OutageFlow:
    def __init__(self, n: int) -> None:
        self.n = n

    @step()
    async def fetch(self, ctx: Context) -> int:
        BODY_RUNS[(ctx.execution_id, "fetch")] += 1
        for i in range(3):
            await ctx.log(f"fetching {i}")
            await asyncio.sleep(0.05)
        return self.n

    @step(depends_on=["fetch"])
    async def work(self, ctx: Context, fetch_result: int) -> int:
        BODY_RUNS[(ctx.execution_id, "work")] += 1
        agent = await ctx.deploy_agent("outage-agent", "outage:1")
        result = await agent.wait_for_completion()
        ctx.state["v"] = result["v"]
        return int(fetch_result * 10 + result["v"])

    @step(depends_on=["fetch"])
    async def tick(self, ctx: Context) -> int:
        """Durable timers one after the other: a write every 0.1 s for 4 s at least."""
        BODY_RUNS[(ctx.execution_id, "tick")] += 1
        for _ in range(40):
            await ctx.sleep(0.1)
        return 40

    @step(depends_on=["work", "tick"])
    async def finish(self, ctx: Context, work_result: int, tick_result: int) -> int:
        BODY_RUNS[(ctx.execution_id, "finish")] += 1
        await asyncio.sleep(0.05)
        return work_result + tick_result


async def run_twenty_through(
    url: str, disrupt: Callable[[], Awaitable[None]]
) -> tuple[list[dict[str, Any]], float]:
    """Run 20 executions of ``OutageFlow`` at once while ``disrupt`` runs; check that each
    completed with its result, its agent launched once, each step body run once. Returns
    the logs and how long the run took."""
    BODY_RUNS.clear()
    try:
        with captured_logs() as logs, mock_agent("outage-agent") as agent:
            agent.returns({"v": 7}, delay=1.5)
            started = time.monotonic()
            async with WorkflowClient(store=url, runtime="mock") as client:
                executions = [
                    await client.run_workflow(OutageFlow(n), ExecutionMode.ASYNC)
                    for n in range(20)
                ]
                await disrupt()
                results = await asyncio.wait_for(
                    asyncio.gather(*(e.get_result() for e in executions)), 180
                )
                elapsed = time.monotonic() - started
                assert results == [n * 10 + 7 + 40 for n in range(20)]
                steps = ("fetch", "work", "tick", "finish")
                for execution in executions:
                    assert await execution.status() == "completed"
                    assert [BODY_RUNS[(execution.id, s)] for s in steps] == [1, 1, 1, 1]
                assert len(agent.calls) == 20  # each agent launched once
    finally:
        reset_mocks()
    stopped = named(logs, "execution_stopped")
    assert not stopped, stopped
    return logs, elapsed


# (a) terminated backends -----------------------------------------------------------------


@pytest.mark.postgres
async def test_executions_ride_out_terminated_backends(
    postgres_url: str, postgres_server: str
) -> None:
    """Every connection of the database is terminated five times while 20 executions run:
    they all complete, and nothing ran twice."""
    admin = admin_conninfo(postgres_server)
    name = database_of(postgres_url)
    killed: list[int] = []

    def terminate() -> int:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            ).fetchone()
            return int(row[0]) if row else 0

    async def disrupt() -> None:
        for _ in range(5):
            await asyncio.sleep(0.3)
            killed.append(await asyncio.to_thread(terminate))

    logs, _ = await run_twenty_through(postgres_url, disrupt)
    assert sum(killed) > 0
    retries = named(logs, "store_retrying")
    assert retries, "no operation met a terminated connection"
    assert all(entry["reason"] and entry["attempt"] >= 1 for entry in retries)


# (b) a server restart ----------------------------------------------------------------------


def _cluster(postgres_server: str) -> tuple[str, str] | None:
    """(version, name) of the local cluster serving the test server, if pg_ctlcluster can
    restart it."""
    url = sa.make_url(postgres_server)
    if url.host not in (None, "127.0.0.1", "localhost") or not _which("pg_ctlcluster"):
        return None
    try:
        out = subprocess.run(
            ["pg_lsclusters", "--no-header"], capture_output=True, text=True, timeout=30
        ).stdout
    except OSError:
        return None
    for line in out.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == str(url.port or 5432):
            return fields[0], fields[1]
    return None


def _which(program: str) -> bool:
    import shutil

    return shutil.which(program) is not None


def _ready(postgres_server: str) -> bool:
    url = sa.make_url(postgres_server)
    probe = subprocess.run(
        ["pg_isready", "-q", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432)],
        timeout=30,
    )
    return probe.returncode == 0


def _ensure_up(postgres_server: str, version: str, cluster: str) -> None:
    """Start the cluster if it is down, and wait until it accepts connections."""
    if not _ready(postgres_server):
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "start"],
            capture_output=True, timeout=120,
        )
    for _ in range(120):
        if _ready(postgres_server):
            return
        time.sleep(0.5)
    raise AssertionError(f"PostgreSQL {version}/{cluster} did not come back up")


@pytest.mark.postgres
@pytest.mark.slow
async def test_executions_ride_out_a_server_restart(
    postgres_url: str, postgres_server: str
) -> None:
    """The server is restarted while 20 executions run: they pause, then all complete."""
    found = _cluster(postgres_server)
    if found is None:
        message = "no local PostgreSQL cluster that pg_ctlcluster can restart"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: this test must run)")
        pytest.skip(message)
    version, cluster = found
    took: list[float] = []

    async def disrupt() -> None:
        await asyncio.sleep(0.3)
        started = time.monotonic()
        restart = await asyncio.to_thread(
            subprocess.run,
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, cluster, "restart"],
            capture_output=True, text=True, timeout=180,
        )
        took.append(time.monotonic() - started)
        assert restart.returncode == 0, restart.stderr

    try:
        logs, elapsed = await run_twenty_through(postgres_url, disrupt)
    finally:
        await asyncio.to_thread(_ensure_up, postgres_server, version, cluster)
    recovered = named(logs, "store_recovered")
    assert named(logs, "store_retrying") and recovered
    longest = max(entry["seconds"] for entry in recovered)
    print(
        f"\nrestart took {took[0]:.2f} s; the longest operation paused {longest:.2f} s; "
        f"20 executions took {elapsed:.2f} s; {len(recovered)} operations were retried"
    )


# (c) a server that stays down --------------------------------------------------------------


@pytest.mark.postgres
async def test_a_server_that_stays_down_fails_after_retry_for(
    postgres_url: str, proxy: Proxy
) -> None:
    async with create_store(proxy.url(postgres_url, retry_for="2")) as store:
        assert isinstance(store, PostgresEventStore) and store.retry_for == 2
        await new_execution(store, "x")
        proxy.close()  # its port now refuses connections, and the open ones are cut
        with captured_logs() as logs:
            for call in (
                lambda: store.get_execution("x"),
                lambda: store.append("x", 2, [StepStarted(step="s")]),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError) as info:
                    await asyncio.wait_for(call(), 120)
                assert time.monotonic() - started >= 2  # it kept trying for retry_for
                message = str(info.value)
                assert message.startswith(
                    f"lost the connection to PostgreSQL at 127.0.0.1:{proxy.port} "
                    "(server restarting?) and could not reconnect for 2 s: "
                ), message
                assert "refused" in message.lower() or "closed" in message.lower(), message
                assert "cannot open" not in message
        retries = named(logs, "store_retrying")
        assert [e["attempt"] for e in retries][:3] == [1, 2, 3]
        assert all(e["reason"] for e in retries)


@pytest.mark.postgres
async def test_retry_for_zero_fails_at_once(postgres_url: str, proxy: Proxy) -> None:
    async with create_store(proxy.url(postgres_url), retry_for=0) as store:
        await new_execution(store, "x")
        proxy.close()
        with pytest.raises(StoreUnavailableError, match=r"retrying is off \(retry_for=0"):
            await asyncio.wait_for(store.get_execution("x"), 60)


async def test_retry_for_comes_from_the_url_or_the_constructor(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/flow.db"
    assert SQLiteEventStore(url).retry_for == 60
    assert SQLiteEventStore(url + "?retry_for=5").retry_for == 5
    assert SQLiteEventStore(url + "?retry_for=5", retry_for=0).retry_for == 0
    pg = PostgresEventStore("postgresql://u:pw@db.example:5433/flow?retry_for=7&sslmode=disable")
    assert pg.retry_for == 7
    assert "retry_for" not in pg._conninfo and "sslmode=disable" in pg._conninfo
    assert PostgresEventStore("postgresql://u@h/db").retry_for == 60
    for bad in ("soon", "-1", "inf"):
        with pytest.raises(StoreUnavailableError, match=f"retry_for={bad} is not a number"):
            SQLiteEventStore(f"{url}?retry_for={bad}")
        with pytest.raises(StoreUnavailableError, match=f"retry_for={bad} is not a number"):
            PostgresEventStore(f"postgresql://u@h/db?retry_for={bad}")


# (e) a connection cut during the commit ----------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("size", "marker"),
    [
        (2, b"WITH appended AS"),  # one statement in autocommit: the statement is the commit
        (150, b"COMMIT"),  # the transaction of sql.py: cut at its COMMIT
    ],
)
async def test_an_append_cut_after_it_committed_is_recognised(
    postgres_url: str, proxy: Proxy, size: int, marker: bytes
) -> None:
    events = [StepCompleted(step="s", instance=i, result=i) for i in range(size)]
    async with create_store(proxy.url(postgres_url)) as store:
        await new_execution(store, "x")
        proxy.arm(marker)
        with captured_logs() as logs:
            result = await asyncio.wait_for(store.append("x", 2, events), 120)
        assert proxy.cut.is_set()  # the server answered, the store never heard it
        assert result.last_seq == size + 1 and result.cancel_requested is False
        assert named(logs, "store_retrying") and named(logs, "store_append_resolved")
        history = await store.load("x")
        assert [s.seq for s in history] == list(range(1, size + 2))  # written once
        assert [s.event for s in history[1:]] == events
        record = await store.get_execution("x")
        assert record is not None and record.last_seq == size + 1
        # and the store goes on from there
        assert (await store.append("x", size + 2, [StepStarted(step="t")])).last_seq == size + 2


@pytest.mark.postgres
async def test_an_append_cut_before_the_server_got_it_is_retried(
    postgres_url: str, proxy: Proxy
) -> None:
    async with create_store(proxy.url(postgres_url)) as store:
        await new_execution(store, "x")
        proxy.arm(b"WITH appended AS", after=False)
        with captured_logs() as logs:
            result = await asyncio.wait_for(store.append("x", 2, [StepStarted(step="s")]), 120)
        assert proxy.cut.is_set() and result.last_seq == 2
        assert named(logs, "store_retrying") and not named(logs, "store_append_resolved")
        assert [s.seq for s in await store.load("x")] == [1, 2]


@pytest.mark.postgres
async def test_other_events_at_the_seqs_are_still_a_conflict(postgres_url: str) -> None:
    """Only the very bytes this append wrote count as its own commit."""
    async with create_store(postgres_url) as store:
        assert isinstance(store, PostgresEventStore)
        await new_execution(store, "x")
        await store.append("x", 2, [StepStarted(step="theirs")])
        with pytest.raises(AppendConflictError):
            await store.append("x", 2, [StepStarted(step="mine")])
        from agentainer_flow.store.events import encode_event

        mine = [encode_event(StepStarted(step="mine"))]
        theirs = [encode_event(StepStarted(step="theirs"))]
        assert await store._committed_append("x", 2, mine) is None
        assert await store._committed_append("x", 2, theirs * 2) is None  # seq 3 is missing
        resolved = await store._committed_append("x", 2, theirs)
        assert resolved is not None and resolved.last_seq == 2


async def test_sqlite_recognises_its_own_append_too(sqlite_url: str) -> None:
    from agentainer_flow.store.events import encode_event

    async with create_store(sqlite_url) as store:
        assert isinstance(store, SQLiteEventStore)
        await new_execution(store, "x")
        await store.append("x", 2, [StepStarted(step="a"), StepStarted(step="b")])
        await store.request_cancel("x")
        sent = [encode_event(StepStarted(step="a")), encode_event(StepStarted(step="b"))]
        resolved = await store._committed_append("x", 2, sent)
        assert resolved is not None
        assert (resolved.last_seq, resolved.cancel_requested) == (3, True)
        assert await store._committed_append("x", 2, sent[::-1]) is None


# SQLite: locked beyond busy_timeout --------------------------------------------------------


async def test_sqlite_waits_out_a_lock_held_beyond_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with create_store(f"sqlite:///{path}?busy_timeout=0.05&retry_for=60") as store:
        await new_execution(store, "x")
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            other.execute("BEGIN IMMEDIATE")  # another process holds the write lock...
            release = threading.Timer(1.0, other.execute, ("COMMIT",))
            release.start()  # ...for a second, twenty times busy_timeout
            with captured_logs() as logs:
                result = await asyncio.wait_for(
                    store.append("x", 2, [StepStarted(step="s")]), 120
                )
            release.join()
        finally:
            other.close()
        assert result.last_seq == 2
        retries = named(logs, "store_retrying")
        assert retries and "database is locked" in retries[0]["reason"]
        assert [s.seq for s in await store.load("x")] == [1, 2]


async def test_sqlite_gives_up_on_a_lock_after_retry_for(tmp_path: Path) -> None:
    path = tmp_path / "flow.db"
    async with create_store(f"sqlite:///{path}?busy_timeout=0.05&retry_for=1") as store:
        await new_execution(store, "x")
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(StoreUnavailableError) as info:
                await asyncio.wait_for(store.append("x", 2, [StepStarted(step="s")]), 120)
        finally:
            other.close()
        message = str(info.value)
        assert f"the SQLite database {str(path)!r} stayed locked for 1 s" in message
        assert "database is locked" in message
        # the lock is gone: the store works again
        assert (await store.append("x", 2, [StepStarted(step="s")])).last_seq == 2


# (d) SQLite read-only, then writable again -------------------------------------------------

#: Opens the store at argv[1] as a process that file permissions apply to (root drops the
#: capabilities that bypass them) and does argv[2]; prints the outcome as JSON.
_CHILD = r"""
import asyncio, ctypes, json, os, sys

if os.geteuid() == 0:  # drop CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capget(header, data) != 0:
        sys.exit("capget failed")
    for i in range(3):
        data[i] &= ~((1 << 1) | (1 << 2) | (1 << 3))
    if libc.capset(header, data) != 0:
        sys.exit("capset failed")

from agentainer_flow.store import NewExecution, create_store
from agentainer_flow.store.events import ExecutionStarted, StepStarted


async def main(url, action):
    if action == "probe":  # can this process write a file without write permission?
        try:
            open(url, "r+b").close()
            return {"ok": True}
        except PermissionError:
            return {"ok": False}
    store = create_store(url)
    try:
        await store.open()
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "error": str(exc)}
    try:
        if action == "create":
            await store.create_execution(
                NewExecution(id="x", workflow_name="wf"), ExecutionStarted(workflow_name="wf"))
        record = await store.get_execution("x")
        result = await store.append("x", record.last_seq + 1, [StepStarted(step=action)])
        return {"ok": True, "last_seq": result.last_seq}
    finally:
        await store.close()


print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
"""


def _as_user(target: str, action: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, target, action],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return outcome


def _leftovers(db: Path) -> list[str]:
    return sorted(p.name for p in db.parent.iterdir() if p.name != db.name)


def test_sqlite_read_only_then_writable_again(tmp_path: Path) -> None:
    """Made read-only, the store refuses to open and says which file to fix, leaving
    nothing behind; made writable again, it opens with its data."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0o444)
    if _as_user(str(probe), "probe")["ok"]:
        message = "file permissions do not apply to this user, even without capabilities"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: this test must run)")
        pytest.skip(message)
    probe.unlink()
    folder = tmp_path / "store"
    folder.mkdir()
    db = folder / "flow.db"
    url = f"sqlite:///{db}"
    assert _as_user(url, "create") == {"ok": True, "last_seq": 2}
    assert _leftovers(db) == []  # closed cleanly: no -wal, no -shm
    try:
        # the database read-only: refused, and no read-only -wal/-shm created
        db.chmod(0o444)
        outcome = _as_user(url, "open")
        assert outcome["type"] == "StoreUnavailableError"
        assert "flow.db (mode -r--r--r--" in outcome["error"]
        assert f"chmod u+w {db}" in outcome["error"]
        assert "directory" not in outcome["error"]
        assert _leftovers(db) == []
        # and its directory too
        folder.chmod(0o555)
        outcome = _as_user(url, "open")
        assert f"the directory {str(folder)!r} (mode dr-xr-xr-x" in outcome["error"]
        assert f"chmod u+wx {folder}" in outcome["error"]
        assert _leftovers(db) == []
    finally:
        folder.chmod(0o755)
        db.chmod(0o644)
    # writable again: it opens, with its data
    assert _as_user(url, "reopen") == {"ok": True, "last_seq": 3}
    # a read-only -shm left by an older version is named too
    shm = folder / "flow.db-shm"
    shm.write_bytes(b"")
    shm.chmod(0o444)
    outcome = _as_user(url, "open")
    assert "flow.db-shm (mode -r--r--r--" in outcome["error"], outcome
    assert "flow.db (" not in outcome["error"]
    shm.chmod(0o644)
    assert _as_user(url, "again") == {"ok": True, "last_seq": 4}
    assert stat.S_IMODE(db.stat().st_mode) == 0o644
