"""``Worker``: claims executions from the store and runs them, inside any asyncio program.

``flow worker`` is this class with signal handling and printed progress. A service runs one
next to its web server::

    async with WorkflowClient(store="postgresql://...") as client:
        worker = Worker(client, queues=["gpu"], concurrency=4)
        await worker.run()          # until worker.stop() (e.g. from a SIGTERM handler)

Claims honour each queue's limits (see ``Queue``); a new execution or a due timer wakes
the worker at once where the store can say so (Postgres LISTEN/NOTIFY), else within
``poll_interval``. Agents that crashes left behind are reaped at start and every minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Sequence

from agentainer_flow.engine._testhooks import reach
from agentainer_flow.engine.errors import (
    ExecutionBlockedError,
    ExecutionSuspended,
    WorkflowNotRegisteredError,
)
from agentainer_flow.engine.leases import holder_is_dead
from agentainer_flow.engine.observe import combine
from agentainer_flow.store import (
    ExecutionRecord,
    FlowError,
    HistoryCorruptedError,
    StoredEvent,
    StoreError,
    WorkerInfo,
)
from agentainer_flow.store._logging import get_logger

from ._client import WorkflowClient
from ._loading import ensure_registered
from ._metrics import FlowMetrics, MetricsServer
from ._queues import Queue, check_queue_name, declared_queues

__all__ = ["Worker"]

log = get_logger("agentainer_flow.worker")
#: most executions one worker runs at once
MAX_CONCURRENCY = 100_000

#: seconds between a worker's sweeps for agents that crashes left behind
GC_INTERVAL = 60.0
#: seconds between a worker's heartbeats; ``flow workers`` calls one silent for three of
#: them lost
HEARTBEAT_INTERVAL = 5.0
#: histories at most this long are read together for a claim's executions (``_preload``)
PRELOAD_EVENTS = 64

Report = Callable[[str], None]


class Worker:
    """Claims unfinished executions (of ``queues``, or of every queue) under a lease and
    runs them with ``client``'s engine, at most ``concurrency`` at once.

    ``suspend_after``: an execution whose every step instance sleeps at least this many
    seconds, or waits for a child workflow, is let go (lease released, nothing kept in
    memory) and claimed again when due or when the child ends (``None``: keep it, and run
    its children in this process). ``once``: process what is claimable now, then return. ``grace``:
    on ``stop()``, how
    long running executions may go on before they are handed back (their agents keep
    running and are adopted by the next holder). ``report``/``report_error``: where
    progress lines go (``flow worker`` prints them); structlog gets them either way.

    An execution runs on the code of the version it was started on. One whose workflow,
    or whose version of it, this worker has not loaded is handed back untouched (released,
    not failed, logged as ``execution_code_missing``) for a worker that has the code, and
    this worker does not claim it again.

    ``metrics_port``: serve this worker's Prometheus metrics at
    ``http://metrics_host:metrics_port/metrics`` while it runs (``FlowMetrics``: the step
    attempts, agents, takeovers and store calls of its executions, and the store's queue
    depth); 0 picks a free port. It takes no token: ``metrics_host`` (default
    ``127.0.0.1``) must be an address only your Prometheus reaches.
    """

    def __init__(
        self,
        client: WorkflowClient,
        *,
        queues: Sequence[str | Queue] | None = None,
        concurrency: int = 4,
        poll_interval: float = 1.0,
        once: bool = False,
        grace: float = 30.0,
        name: str | None = None,
        report: Report | None = None,
        report_error: Report | None = None,
        suspend_after: float | None = 2.0,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}, "
                             f"got {concurrency}")
        for q in queues or ():
            check_queue_name(q.name if isinstance(q, Queue) else q)
        self.client = client
        self.queues: list[str] | None = (
            None if queues is None else [q.name if isinstance(q, Queue) else q for q in queues])
        self._declared = [q for q in (queues or ()) if isinstance(q, Queue)]
        self.concurrency = concurrency
        self.poll_interval = poll_interval
        self.once = once
        self.grace = grace
        self.name = name or client.engine.owner_id
        self._report = report or (lambda line: None)
        self._report_error = report_error or (lambda line: None)
        self.running: dict[str, asyncio.Task[None]] = {}
        self.skipped: set[str] = set()  # cannot run here (not importable, diverged): left
        self.done = 0
        self.suspended = 0  # runs that let a sleeping execution go
        self.suspend_after = suspend_after
        self._stop = asyncio.Event()
        self._hurry = asyncio.Event()
        self._last_gc: float | None = None
        #: dead workers of this machine whose leases were ended (``_free_the_dead``)
        self._freed: set[str] = set()
        self._started_at = time.time()
        #: this worker's metrics (with ``metrics_port``), else ``None``
        self.metrics: FlowMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        if metrics_port is not None:
            metrics = self.metrics = FlowMetrics()
            client.engine.observer = combine(client.engine.observer, metrics)
            self.metrics_server = MetricsServer(lambda: metrics.exposition(client.store),
                                                host=metrics_host, port=metrics_port)

    @property
    def worker_id(self) -> str:
        """The lease owner id of this worker's claims (its engine's)."""
        return self.client.engine.owner_id

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called."""
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop claiming; running executions get ``grace`` seconds. A second call hands
        them back at once."""
        if self._stop.is_set():
            self._hurry.set()
        self._stop.set()
        self.client.engine.draining = True  # running attempts finish; nothing new starts

    async def run(self) -> int:
        """Claim and run until ``stop()`` (or, with ``once``, until nothing is claimable);
        returns how many executions it saw to an outcome."""
        await self.client.open()
        self.client.engine.suspend_after = self.suspend_after
        # new work, wake-ups and cancels from other processes are heard from now on
        self.client.store.listen()
        await self._declare()
        if self.metrics_server is not None:
            await self.metrics_server.start()
            self._say(f"metrics at {self.metrics_server.url}")
        beat = asyncio.ensure_future(self._beat())
        queues = ", ".join(self.queues) if self.queues is not None else "every queue"
        self._say(f"worker {self.name} started (concurrency {self.concurrency}, {queues}"
                  + (", once" if self.once else "") + ")")
        try:
            while not self._stop.is_set():
                await self._gc()
                try:
                    claimed = await self._claim()
                except FlowError as exc:
                    if self.once:
                        raise
                    self._error(f"claiming failed (retrying): {exc}")  # e.g. a database blip
                    claimed = 0
                if self.once and not claimed and not self.running:
                    break
                await self._wait(self.poll_interval if not (self.once and claimed) else 0.0)
        finally:
            await self._shutdown()
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat
            with contextlib.suppress(FlowError):
                await self.client.store.heartbeat(self._info(), gone=True)
            if self.metrics_server is not None:
                await self.metrics_server.close()
        self._say(f"worker {self.name} stopped; {self.done} executions processed")
        return self.done

    # -- pieces --

    def _info(self) -> WorkerInfo:
        return WorkerInfo(id=self.worker_id, name=self.name, host=socket.gethostname(),
                          pid=os.getpid(), queues=tuple(self.queues or ()),
                          concurrency=self.concurrency, held=len(self.running),
                          started_at=self._started_at)

    async def _beat(self) -> None:
        """Tell the store this worker lives (``flow workers``), every few seconds, and end
        the leases of the workers of this machine that died (``_free_the_dead``)."""
        while True:
            try:
                await self.client.store.heartbeat(self._info())
                await self._free_the_dead()
            except FlowError as exc:  # a store outage: the claims will say so too
                log.warning("worker_heartbeat_failed", error=str(exc))
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    async def _free_the_dead(self) -> None:
        """A worker of this machine that died (SIGKILLed, out of memory) is known by its
        pid and start time: its leases end now, and the claims take its executions over
        without waiting for them to expire. Workers of other machines are left to their
        leases' expiry."""
        store = self.client.store
        for other in await store.list_workers():
            if other.id == self.worker_id or other.id in self._freed \
                    or not holder_is_dead(other.id):
                continue
            expired = await store.expire_leases(other.id)
            self._freed.add(other.id)
            if expired:
                log.info("dead_worker_leases_ended", worker=other.id, executions=len(expired))
                self._say(f"worker {other.name} ({other.id}) is gone: its {len(expired)} "
                          "executions are taken over now")

    async def _declare(self) -> None:
        """Write the limits of the queues declared in code that this worker serves."""
        declared = {q.name: q for q in self._declared}
        for name, queue in declared_queues().items():
            if self.queues is None or name in self.queues:
                declared.setdefault(name, queue)
        for queue in declared.values():
            await self.client.store.set_queue(queue.config())

    async def _gc(self) -> None:
        now = time.monotonic()
        if self._last_gc is not None and now - self._last_gc < GC_INTERVAL:
            return
        self._last_gc = now
        try:
            reaped = await self.client.gc()
        except Exception as exc:  # the worker's job is to run executions
            self._error(f"removing left-behind agents failed: {exc}")
            return
        for r in reaped:
            self._say(f"{r.execution_id}: removed left-behind agent {r.agent_id} ({r.reason})")

    async def _claim(self) -> int:
        free = self.concurrency - len(self.running)
        if free <= 0:
            return 0
        store = self.client.store
        extra = min(len(self.skipped), 100)  # so skipped rows cannot starve runnable ones
        with self.client.engine.observer.time_store("claim"):
            records = await store.claim(self.worker_id,
                                        lease_seconds=self.client.engine.lease_seconds,
                                        limit=free + extra, queues=self.queues)
        if records:
            reach("worker.claimed")  # a crash here: the leases expire, others claim them
        started = 0
        starting: list[ExecutionRecord] = []
        for record in records:
            # skipped ones are left alone; children are claimed like any execution (their
            # parents let go of them while they wait, see ``Engine.ensure_child``)
            if record.id in self.skipped or started >= free:
                await store.release(self.worker_id, record.id)
                continue
            try:
                ensure_registered(record, exact_version=True)
            except FlowError as exc:
                if isinstance(exc, WorkflowNotRegisteredError):
                    self._hand_back(record, exc)
                else:
                    self._error(f"execution {record.id}: {exc}")
                self.skipped.add(record.id)
                await store.release(self.worker_id, record.id)
                continue
            holder = record.taken_over_from
            if holder is not None and holder != self.worker_id:
                # its holder stopped renewing (died, or stalled past its lease)
                self.client.engine.observer.lease_taken_over(
                    record.id, record.workflow_name, previous_holder=holder)
                log.info("execution_taken_over", execution_id=record.id,
                         previous_holder=holder)
                self._say(f"{record.id} {record.workflow_name}: taken over from {holder}")
            self._say(f"{record.id} {record.workflow_name}: claimed ({record.status.value})")
            starting.append(record)
            started += 1
        # The short histories of what was claimed, read together (``load_many``) rather
        # than by each run: not of an execution whose previous run here is still ending,
        # nor long ones (each run loads its own). The runs are registered first, so that a
        # stop meanwhile hands every claimed execution back.
        ids = [r.id for r in starting
               if r.last_seq <= PRELOAD_EVENTS and r.id not in self.running]
        preload = asyncio.ensure_future(self._preload(ids)) if len(ids) > 1 else None
        for record in starting:
            # claimed again while its run here ends (it let go of the lease a moment ago, to
            # be woken at once): the new run starts once that one is over
            previous = self.running.get(record.id)
            self.running[record.id] = asyncio.ensure_future(
                self._process(record, previous, preload))
            # the engine renews the lease from here on, and its runner carries the token
        return started

    async def _preload(self, ids: list[str]) -> dict[str, list[StoredEvent]]:
        try:
            return await self.client.store.load_many(ids)
        except Exception as exc:  # each run then loads its own, and says what went wrong
            log.warning("worker_preload_failed", error=str(exc))
            return {}

    async def _process(self, record: ExecutionRecord,
                       previous: asyncio.Task[None] | None = None,
                       preload: asyncio.Future[dict[str, list[StoredEvent]]] | None = None,
                       ) -> None:
        eid = record.id
        me = asyncio.current_task()
        ended = False
        try:
            history = None if preload is None else (await asyncio.shield(preload)).get(eid)
            reach("worker.run_starting")  # claimed and read back, nothing run yet
            if previous is not None:
                await asyncio.wait({previous})
            outcome = await asyncio.shield(
                self.client.engine.launch(eid, leased=record, history=history))
            ended = True  # the terminal append released the lease
            detail = f": {outcome.error}" if outcome.error else ""
            self.done += 1
            self._say(f"{eid} {record.workflow_name}: {outcome.status}{detail}")
        except asyncio.CancelledError:
            raise
        except HistoryCorruptedError as exc:  # never replayed: left for a person to look at
            self.skipped.add(eid)
            self._error(f"execution {eid} not run: {exc}")
        except WorkflowNotRegisteredError as exc:  # its code went away since the claim
            self.skipped.add(eid)
            self._hand_back(record, exc)
        except ExecutionSuspended as asleep:
            if asleep.wake_at is None:
                self._say(f"{eid} {record.workflow_name}: handed back (shutting down)")
            else:
                self.suspended += 1
                self._say(f"{eid} {record.workflow_name}: suspended (asleep, or waiting for "
                          f"a child workflow) until {_clock(asleep.wake_at)} at the latest; "
                          "released")
        except (StoreError, ExecutionBlockedError) as exc:
            # the store went away (it is retried at the next claim), the lease was taken
            # over (the new holder runs it), or it waits for a secret (`flow resume`)
            self._error(f"execution {eid} stopped here: {exc}")
        except Exception as exc:
            self.skipped.add(eid)
            self._error(f"execution {eid} stopped: {type(exc).__name__}: {exc}")
        finally:
            # a newer claim of it by this worker holds the lease now: leave it be
            superseded = self.running.get(eid) is not me
            if not superseded:
                self.running.pop(eid, None)
            if not ended and not superseded:
                with contextlib.suppress(FlowError):
                    await asyncio.shield(self.client.store.release(self.worker_id, eid))

    async def _wait(self, timeout: float) -> None:
        """Until stopped, a run ends, or (with room for more) the store changes or a
        suspended execution is due."""
        if len(self.running) < self.concurrency and timeout:
            wake = await self.client.store.next_wake()
            if wake is not None:
                timeout = min(timeout, wake - time.time())
                if timeout <= 0:
                    return  # due now: claim it
        waiters = {asyncio.ensure_future(self._stop.wait()), *self.running.values()}
        change = None
        if len(self.running) < self.concurrency and timeout:
            change = asyncio.ensure_future(self.client.store.wait_for_change(None, timeout))
            waiters.add(change)
        try:
            await asyncio.wait(waiters, timeout=timeout or None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                if w not in self.running.values():
                    w.cancel()

    async def _shutdown(self) -> None:
        """Let the running step attempts finish for up to ``grace`` seconds (or until
        ``stop()`` again; no new attempt starts), then hand the executions back: leases
        released, agents left to be adopted."""
        tasks = list(self.running.values())  # each removes itself from ``running``
        if not tasks:
            return
        if self._stop.is_set() and self.grace > 0 and not self._hurry.is_set():
            self._say(f"waiting up to {self.grace:g}s for {len(tasks)} running executions")
            hurry = asyncio.ensure_future(self._hurry.wait())
            finished = asyncio.ensure_future(asyncio.wait(tasks))  # cancelling it keeps them
            try:
                await asyncio.wait({finished, hurry}, timeout=self.grace,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                hurry.cancel()
                finished.cancel()
        tasks = list(self.running.values())
        if tasks:
            await self.client.engine.shutdown()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _hand_back(self, record: ExecutionRecord, exc: WorkflowNotRegisteredError) -> None:
        """This worker lacks the code of the execution (its workflow, or the version it
        was started on): it is left as it is for a worker that has it, never failed."""
        log.warning("execution_code_missing", execution_id=record.id,
                    workflow=record.workflow_name, version=record.workflow_version,
                    available=list(getattr(exc, "available", ())), worker=self.name)
        self._report_error(f"execution {record.id}: handed back (not run here): {exc}")

    def _say(self, line: str) -> None:
        log.info("worker", message=line, worker=self.name)
        self._report(line)

    def _error(self, line: str) -> None:
        log.warning("worker_error", message=line, worker=self.name)
        self._report_error(line)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
