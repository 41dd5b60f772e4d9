"""Queued starts (``run_workflow(..., queue=...)``) leave nothing in the starting engine.

The execution runs on whichever worker claims it, so the engine that recorded it must not
keep its workflow object, its secrets or a record to run: in a process that starts
executions all day (``flow server``) that memory would grow without end, and a ``Worker``
of that process must run what it claimed, under the lease (fencing token) it took.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest
from cryptography.fernet import Fernet

from agentainer_flow import (
    Context,
    ExecutionMode,
    ExecutionStatus,
    Worker,
    WorkflowClient,
    step,
    workflow,
)
from agentainer_flow.store import ExecutionRecord

STARTS = 1000


@workflow(name="enqueue_probe")
class Probe:
    """One step that reads a secret: it runs only if the worker finds the secret."""

    def __init__(self, n: int) -> None:
        self.n = n

    @step()
    async def use(self, ctx: Context) -> int:
        return self.n + len(ctx.secrets["token"])


def _kept(client: WorkflowClient, ids: set[str]) -> dict[str, set[str]]:
    engine: Any = client.engine  # what the engine keeps per execution, by map
    return {name: ids & set(getattr(engine, name))
            for name in ("_fresh", "_objects", "_secrets", "tasks", "runners")}


async def test_queued_starts_leave_nothing_and_a_worker_here_runs_them_fenced(
        sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # the secrets reach the worker encrypted in the store, as they reach any worker
    monkeypatch.setenv("FLOW_SECRETS_KEY", Fernet.generate_key().decode())
    async with WorkflowClient(sqlite_url, "mock") as client:
        started = await asyncio.gather(*(
            client.run_workflow(Probe(n), ExecutionMode.ASYNC, queue="jobs",
                                secrets={"token": "s3cret-value"})
            for n in range(STARTS)))
        ids = {e.id for e in started}
        assert len(ids) == STARTS
        assert _kept(client, ids) == {name: set() for name in
                                      ("_fresh", "_objects", "_secrets", "tasks", "runners")}

        # a worker on the same client: every append carries the fencing token its claim
        # took (a record kept from the start would carry none)
        store: Any = client.store
        claims: dict[str, int] = {}
        appends: list[tuple[str, int | None]] = []
        claim, append = store.claim, store.append

        async def claiming(worker_id: str, **kwargs: Any) -> list[ExecutionRecord]:
            got: list[ExecutionRecord] = await claim(worker_id, **kwargs)
            for r in got:
                assert r.lease_owner == worker_id and r.lease_token > 0
                claims[r.id] = r.lease_token
            return got

        async def appending(execution_id: str, *args: Any, **kwargs: Any) -> Any:
            appends.append((execution_id, kwargs.get("lease_token")))
            return await append(execution_id, *args, **kwargs)

        monkeypatch.setattr(store, "claim", claiming)
        monkeypatch.setattr(store, "append", appending)
        worker = Worker(client, queues=["jobs"], concurrency=50, once=True,
                        poll_interval=0.02)
        await asyncio.wait_for(worker.run(), 300)

        assert set(claims) == ids  # each claimed once, by this worker
        assert {eid for eid, _ in appends} == ids
        for eid, token in appends:
            assert token == claims[eid], eid
        rows = await client.list_executions(statuses=[ExecutionStatus.COMPLETED], limit=None)
        assert {r.id for r in rows} == ids
        results = {await client.get_execution(e.id).get_result() for e in started[:5]}
        assert results == {n + len("s3cret-value") for n in range(5)}
        assert _kept(client, ids) == {name: set() for name in
                                      ("_fresh", "_objects", "_secrets", "tasks", "runners")}


async def test_a_queued_start_that_finds_an_execution_running_here_leaves_it_alone(
        sqlite_url: str) -> None:
    async with WorkflowClient(sqlite_url, "mock") as client:
        gate = asyncio.Event()

        @workflow(name="enqueue_gated")
        class Gated:
            @step()
            async def wait(self, ctx: Context) -> str:
                await asyncio.wait_for(gate.wait(), 30)
                return len(ctx.secrets["token"]) * "x"

        first = await client.run_workflow(Gated(), ExecutionMode.ASYNC, idempotency_key="k",
                                          secrets={"token": "abc-secret"})
        again = await client.run_workflow(Gated(), ExecutionMode.ASYNC, idempotency_key="k",
                                          queue="jobs", secrets={"token": "abc-secret"})
        assert again.id == first.id
        assert first.id in client.engine.tasks  # still running here, with its secrets
        gate.set()
        assert await first.get_result() == "x" * len("abc-secret")


@pytest.mark.parametrize("store_kind", ["sqlite", pytest.param("postgres",
                                                               marks=pytest.mark.postgres)])
async def test_a_worker_reads_what_it_claims_together(
        store_kind: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The histories of a claim's executions come from one ``load_many``, not one load
    each; a run whose history was left out (damaged, too long) loads its own."""
    url = str(request.getfixturevalue(f"{store_kind}_url"))
    monkeypatch.setenv("FLOW_SECRETS_KEY", Fernet.generate_key().decode())
    async with WorkflowClient(url, "mock") as client:
        started = await asyncio.gather(*(
            client.run_workflow(Probe(n), ExecutionMode.ASYNC, queue="batch",
                                secrets={"token": "t"}) for n in range(40)))
        store: Any = client.store
        together: list[list[str]] = []
        alone: list[str] = []
        inside = contextvars.ContextVar("inside", default=False)
        load_many, load = store.load_many, store.load
        left_out = started[0].id  # as if its history were damaged: its run loads it

        async def loading_many(ids: list[str]) -> Any:
            together.append(list(ids))
            token = inside.set(True)
            try:
                got = await load_many(ids)
            finally:
                inside.reset(token)
            got.pop(left_out, None)
            return got

        async def loading(execution_id: str, after_seq: int = 0) -> Any:
            if not inside.get():  # the SQLite store's load_many loads each: not alone
                alone.append(execution_id)
            return await load(execution_id, after_seq)

        monkeypatch.setattr(store, "load_many", loading_many)
        monkeypatch.setattr(store, "load", loading)
        worker = Worker(client, queues=["batch"], concurrency=20, once=True,
                        poll_interval=0.02)
        await asyncio.wait_for(worker.run(), 120)
        monkeypatch.undo()
        results = [await e.get_result() for e in started]

    assert results == [n + 1 for n in range(40)]
    read_together = {eid for ids in together for eid in ids}
    assert len(read_together) >= 30, together  # claims of up to 20, a few alone
    assert left_out in read_together and alone.count(left_out) == 1  # then its run loaded it
    for e in started:  # each history read once, but the one left out
        assert (e.id in read_together) + alone.count(e.id) == 1 + (e.id == left_out), e.id


async def test_queue_names_limits_and_priorities_are_checked_where_they_enter(
        postgres_url: str) -> None:
    """What the stores cannot hold, or what a worker listing would garble, is refused with
    what is wrong (it was a database error, or silently truncated, or accepted)."""
    from agentainer_flow import ConfigurationError, Queue

    for bad in ("", " q", "a,b", "tab\there", "x" * 201):
        with pytest.raises(ConfigurationError, match="queue"):
            Queue(bad)
    for kwargs, match in (({"concurrency": 2**31}, "between 1 and"),
                          ({"concurrency": 1.5}, "whole number"),
                          ({"rate_limit": "99999999999999999999/s"}, "at most"),
                          ({"key_concurrency": 2}, "concurrency_key")):
        with pytest.raises(ConfigurationError, match=match):
            Queue("checked", **kwargs)
    with pytest.raises(ConfigurationError, match="comma"):
        Worker(WorkflowClient(store="memory://"), queues=["a,b"])
    async with WorkflowClient(store=postgres_url) as client:
        for priority, match in ((2**31, "between"), (1.7, "whole number"), (True, "whole")):
            with pytest.raises(ConfigurationError, match=match):
                await client.run_workflow(Probe(1), ExecutionMode.ASYNC, queue="checked",
                                          priority=priority)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="comma"):
            await client.run_workflow(Probe(1), ExecutionMode.ASYNC, queue="a,b")
        assert await client.list_executions() == []  # nothing was recorded
        top = await client.run_workflow(Probe(1), ExecutionMode.ASYNC, queue="checked",
                                        priority=2**31 - 1)
        assert (await top.describe()).priority == 2**31 - 1
