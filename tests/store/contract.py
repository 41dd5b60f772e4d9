"""The ``EventStore`` contract: what every backend must do, as plain async functions.

Each case takes an opened, empty ``store``; ``test_contract.py`` runs every case in
``CASES`` on every backend. A backend is correct when it behaves like ``MemoryEventStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from unittest import mock

import pytest

from agentainer_flow.store import (
    AppendConflictError,
    EventStore,
    ExecutionNotFoundError,
    ExecutionRecord,
    ExecutionStatus,
    LeaseLostError,
    NewExecution,
    QueueConfig,
    StoredEvent,
    WorkerInfo,
)
from agentainer_flow.store.events import (
    CancelRequested,
    Event,
    ExecutionCompleted,
    ExecutionFailed,
    ExecutionStarted,
    StepCompleted,
    StepStarted,
    TimerStarted,
)

Case = Callable[[EventStore], Awaitable[None]]
CASES: list[Case] = []


def case(fn: Case) -> Case:
    """Register a contract case."""
    CASES.append(fn)
    return fn


async def new(
    store: EventStore,
    eid: str,
    *,
    workflow: str = "wf",
    tags: dict[str, str] | None = None,
    key: str | None = None,
    parent: str | None = None,
    secrets: bytes | None = None,
    queue: str | None = None,
    priority: int = 0,
    concurrency_key: str | None = None,
) -> tuple[ExecutionRecord, bool]:
    """Create an execution with a matching ``ExecutionStarted``."""
    return await store.create_execution(
        NewExecution(
            id=eid,
            workflow_name=workflow,
            tags=tags or {},
            idempotency_key=key,
            parent_id=parent,
            secrets=secrets,
            queue=queue,
            priority=priority,
            concurrency_key=concurrency_key,
        ),
        ExecutionStarted(workflow_name=workflow, tags=tags or {}, parent_id=parent, input={"x": 1}),
    )


@contextlib.contextmanager
def _clock_at(t: float) -> Iterator[None]:
    """The stores' clock (``store.base.now``, as each backend imported it) stopped at ``t``."""
    from agentainer_flow.store import memory, sql

    with mock.patch.object(memory, "now", lambda: t), mock.patch.object(sql, "now", lambda: t):
        yield


def steps(name: str, result: object = None) -> list[Event]:
    """The two events of one finished step, as the engine appends them."""
    return [StepStarted(step=name, ts=1.0), StepCompleted(step=name, result=result, ts=2.0)]


async def get(store: EventStore, eid: str) -> ExecutionRecord:
    record = await store.get_execution(eid)
    assert record is not None, eid
    return record


# executions -----------------------------------------------------------------------------
@case
async def create_returns_the_new_record(store: EventStore) -> None:
    before = time.time()
    record, created = await new(store, "e1", tags={"team": "a"}, parent="p0", key="k1")
    assert created
    assert record.id == "e1"
    assert record.workflow_name == "wf"
    assert record.workflow_version == "1"
    assert record.status == ExecutionStatus.PENDING
    assert record.tags == {"team": "a"}
    assert record.parent_id == "p0"
    assert record.idempotency_key == "k1"
    assert record.last_seq == 1
    assert not record.cancel_requested
    assert record.finished_at is None and record.duration is None
    assert record.lease_owner is None and record.wake_at is None and record.error is None
    assert before <= record.created_at <= time.time()
    assert record.updated_at == record.created_at
    assert await get(store, "e1") == record
    history = await store.load("e1")
    assert [s.seq for s in history] == [1]
    assert history[0].execution_id == "e1"
    assert history[0].event == ExecutionStarted(
        workflow_name="wf", tags={"team": "a"}, parent_id="p0", input={"x": 1}
    )


@case
async def create_is_idempotent_by_id(store: EventStore) -> None:
    first, created = await new(store, "e1")
    assert created
    again, created_again = await new(store, "e1", workflow="other", key="k")
    assert not created_again
    assert again == first
    assert len(await store.load("e1")) == 1
    # the key of the ignored request was not recorded
    _, created_third = await new(store, "e2", key="k")
    assert created_third


@case
async def create_is_idempotent_by_key(store: EventStore) -> None:
    first, _ = await new(store, "e1", key="order-42")
    again, created = await new(store, "e2", key="order-42")
    assert not created
    assert again == first
    assert await store.get_execution("e2") is None
    assert await store.load("e2") == []


@case
async def concurrent_creates_of_one_key_create_once(store: EventStore) -> None:
    results = await asyncio.gather(*(new(store, f"e{i}", key="same") for i in range(10)))
    assert sum(created for _, created in results) == 1
    assert len({record.id for record, _ in results}) == 1
    assert len(await store.list_executions()) == 1


@case
async def get_unknown_is_none(store: EventStore) -> None:
    assert await store.get_execution("nope") is None
    assert await store.load("nope") == []


@case
async def secrets_round_trip_as_bytes(store: EventStore) -> None:
    blob = bytes(range(256)) + b"\x00\xff end"
    record, _ = await new(store, "e1", secrets=blob)
    assert record.secrets == blob
    stored = await get(store, "e1")
    assert stored.secrets == blob and isinstance(stored.secrets, bytes)
    await new(store, "e2")
    assert (await get(store, "e2")).secrets is None


# the log --------------------------------------------------------------------------------
@case
async def append_and_load_in_order(store: EventStore) -> None:
    await new(store, "e1")
    result = await store.append("e1", 2, steps("a", 1))
    assert result.last_seq == 3 and not result.cancel_requested
    result = await store.append(
        "e1", 4, [*steps("b", {"k": [1, 2]}), TimerStarted(step="b", index=0, fire_at=9.5)]
    )
    assert result.last_seq == 6
    history = await store.load("e1")
    assert [s.seq for s in history] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(s, StoredEvent) and s.execution_id == "e1" for s in history)
    assert history[2].event == StepCompleted(step="a", result=1, ts=2.0)
    assert history[4].event == StepCompleted(step="b", result={"k": [1, 2]}, ts=2.0)
    assert history[5].event == TimerStarted(step="b", index=0, fire_at=9.5)
    assert [s.seq for s in await store.load("e1", after_seq=3)] == [4, 5, 6]
    assert await store.load("e1", after_seq=6) == []
    record = await get(store, "e1")
    assert record.last_seq == 6
    assert record.updated_at >= record.created_at


@case
async def append_of_nothing_updates_the_row(store: EventStore) -> None:
    await new(store, "e1")
    result = await store.append("e1", 2, [], status=ExecutionStatus.RUNNING)
    assert result.last_seq == 1
    record = await get(store, "e1")
    assert record.status == ExecutionStatus.RUNNING and record.last_seq == 1


@case
async def conflicting_append_raises_and_writes_nothing(store: EventStore) -> None:
    await new(store, "e1")
    await store.append("e1", 2, steps("a"))
    before = await get(store, "e1")
    for seq in (2, 3, 5, 1):
        with pytest.raises(AppendConflictError) as info:
            await store.append(
                "e1", seq, steps("x"), status=ExecutionStatus.FAILED, error="no", wake_at=1.0
            )
        assert info.value.execution_id == "e1"
        assert info.value.expected_seq == seq
        assert info.value.actual_last_seq == 3
    assert [s.seq for s in await store.load("e1")] == [1, 2, 3]
    assert await get(store, "e1") == before
    assert (await store.append("e1", 4, steps("b"))).last_seq == 5


@case
async def append_to_unknown_execution_raises(store: EventStore) -> None:
    with pytest.raises(ExecutionNotFoundError):
        await store.append("nope", 2, steps("a"))


@case
async def concurrent_appends_at_one_seq_one_wins(store: EventStore) -> None:
    await new(store, "e1")
    for round_ in range(3):
        seq = 2 + round_ * 2
        outcomes = await asyncio.gather(
            *(store.append("e1", seq, steps(f"w{i}", i)) for i in range(5)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, AppendConflictError) for o in losers), outcomes
        assert winners[0].last_seq == seq + 1
    history = await store.load("e1")
    assert [s.seq for s in history] == list(range(1, 8))
    # each pair is one writer's
    for i in (1, 3, 5):
        started, completed = history[i].event, history[i + 1].event
        assert isinstance(started, StepStarted) and isinstance(completed, StepCompleted)
        assert started.step == completed.step


@case
async def status_transitions_and_finished_at(store: EventStore) -> None:
    record, _ = await new(store, "e1")
    await store.append("e1", 2, steps("a"), status=ExecutionStatus.RUNNING)
    running = await get(store, "e1")
    assert running.status == ExecutionStatus.RUNNING and running.finished_at is None
    await store.append("e1", 4, [ExecutionCompleted(result=3)], status=ExecutionStatus.COMPLETED)
    done = await get(store, "e1")
    assert done.status == ExecutionStatus.COMPLETED
    assert done.finished_at is not None and done.finished_at >= record.created_at
    assert done.duration is not None and done.duration >= 0
    assert done.error is None

    await new(store, "e2")
    await store.append(
        "e2", 2, [ExecutionFailed(error="boom")], status=ExecutionStatus.FAILED, error="boom"
    )
    failed = await get(store, "e2")
    assert failed.status == ExecutionStatus.FAILED and failed.error == "boom"
    assert failed.finished_at is not None
    assert failed.status.is_terminal


@case
async def wake_at_and_due_timers(store: EventStore) -> None:
    t = time.time()
    for eid in ("b", "a", "c"):
        await new(store, eid)
    await store.append("a", 2, steps("s"), wake_at=t + 100)
    await store.append("b", 2, steps("s"), wake_at=t + 50)
    assert (await get(store, "a")).wake_at == t + 100
    assert await store.due_timers(t) == []
    assert await store.due_timers(t + 60) == [("b", t + 50)]
    assert await store.due_timers(t + 100) == [("a", t + 100), ("b", t + 50)]
    # an append without wake_at leaves it; wake_at=None clears it
    await store.append("a", 4, steps("s2"))
    assert (await get(store, "a")).wake_at == t + 100
    await store.append("a", 6, steps("s3"), wake_at=None)
    assert (await get(store, "a")).wake_at is None
    # a terminal status clears it, whatever wake_at says
    await store.append(
        "b", 4, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED, wake_at=t + 1
    )
    assert (await get(store, "b")).wake_at is None
    assert await store.due_timers(t + 1000) == []


@case
async def list_filters_newest_first(store: EventStore) -> None:
    await new(store, "p", workflow="parent")
    await new(store, "c1", workflow="child", parent="p", tags={"team": "a", "env": "prod"})
    await new(store, "c2", workflow="child", parent="p", tags={"team": "b"})
    middle = time.time()
    await asyncio.sleep(0.002)
    await new(store, "c3", workflow="child", tags={"team": "a", "app.name": "x y", 'q"\\': "1"})
    await store.append("c2", 2, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED)
    await store.append("c3", 2, steps("s"), status=ExecutionStatus.RUNNING)

    def ids(records: list[ExecutionRecord]) -> list[str]:
        return [r.id for r in records]

    assert ids(await store.list_executions()) == ["c3", "c2", "c1", "p"]
    assert ids(await store.list_executions(workflow_name="child")) == ["c3", "c2", "c1"]
    assert ids(await store.list_executions(workflow_name="none")) == []
    assert ids(await store.list_executions(statuses=[ExecutionStatus.PENDING])) == ["c1", "p"]
    assert ids(
        await store.list_executions(statuses=[ExecutionStatus.COMPLETED, ExecutionStatus.RUNNING])
    ) == ["c3", "c2"]
    assert ids(await store.list_executions(statuses=[])) == []
    assert ids(await store.list_executions(tags={"team": "a"})) == ["c3", "c1"]
    assert ids(await store.list_executions(tags={"team": "a", "env": "prod"})) == ["c1"]
    assert ids(await store.list_executions(tags={"app.name": "x y"})) == ["c3"]
    assert ids(await store.list_executions(tags={'q"\\': "1"})) == ["c3"]
    assert ids(await store.list_executions(tags={"team": "z"})) == []
    assert ids(await store.list_executions(parent_id="p")) == ["c2", "c1"]
    assert ids(await store.list_executions(created_after=middle)) == ["c3"]
    assert ids(await store.list_executions(limit=2)) == ["c3", "c2"]
    assert ids(await store.list_executions(limit=None)) == ["c3", "c2", "c1", "p"]
    assert ids(await store.list_executions(workflow_name="child", tags={"team": "a"}, limit=1)) == [
        "c3"
    ]
    since = (await get(store, "c2")).updated_at
    assert set(ids(await store.list_executions(updated_after=since))) == {"c2", "c3"}
    assert (await store.list_executions(workflow_name="child"))[0] == await get(store, "c3")


@case
async def list_pages_by_where_the_last_page_ended(store: EventStore) -> None:
    # 7 executions, 3 of them created at the same moment (as a burst can be): pages of 2
    # by (created_at, id) give each one once, newest first, whatever is created meanwhile
    for i in range(4):
        await new(store, f"e{i}", workflow="paged")
        await asyncio.sleep(0.002)
    records = await store.list_executions(workflow_name="paged", limit=None)
    with _clock_at(records[1].created_at):  # created at the very time e2 was
        for suffix in ("z", "x", "y"):
            await new(store, f"same-{suffix}", workflow="paged")
    expected = [r.id for r in await store.list_executions(workflow_name="paged", limit=None)]
    assert len(expected) == 7 and set(expected[1:5]) == {"e2", "same-x", "same-y", "same-z"}
    paged: list[str] = []
    before: tuple[float, str] | None = None
    while True:
        page = await store.list_executions(workflow_name="paged", limit=2, before=before)
        paged += [r.id for r in page]
        if len(page) < 2:
            break
        before = (page[-1].created_at, page[-1].id)
        if len(paged) == 2:  # one created now is newer than every page: not in later ones
            await new(store, "late", workflow="paged")
    assert paged == expected
    boundary = records[1].created_at  # e2, and the three made at its time
    assert [r.id for r in await store.list_executions(
        workflow_name="paged", created_before=boundary, limit=None)] == ["e1", "e0"]
    assert await store.list_executions(workflow_name="paged", created_before=0.0) == []


@case
async def request_cancel_flags_unfinished_only(store: EventStore) -> None:
    await new(store, "e1")
    assert not (await store.append("e1", 2, steps("a"))).cancel_requested
    assert await store.request_cancel("e1", "over budget: 'x' \u00e9")
    flagged = await get(store, "e1")
    assert flagged.cancel_requested and flagged.cancel_reason == "over budget: 'x' \u00e9"
    result = await store.append("e1", 4, [CancelRequested(reason="user")])
    assert result.cancel_requested
    assert await store.request_cancel("e1", "again")  # asking twice is fine
    assert (await get(store, "e1")).cancel_reason == "over budget: 'x' \u00e9"  # the first
    await store.append("e1", 5, [ExecutionCompleted()], status=ExecutionStatus.CANCELLED)
    assert not await store.request_cancel("e1")
    assert not await store.request_cancel("nope")
    await new(store, "e2")
    await store.append("e2", 2, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED)
    assert not await store.request_cancel("e2")
    assert not (await get(store, "e2")).cancel_requested
    await new(store, "e3")
    assert await store.request_cancel("e3")  # no reason given: none kept
    assert (await get(store, "e3")).cancel_reason is None


# workers --------------------------------------------------------------------------------
@case
async def claim_leases_due_unfinished_executions(store: EventStore) -> None:
    t = time.time()
    for eid in ("old", "mid", "done", "later", "new"):
        await new(store, eid)
    await store.append("done", 2, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED)
    await store.append("later", 2, steps("s"), wake_at=t + 3600)
    await store.append("mid", 2, steps("s"), status=ExecutionStatus.RUNNING, wake_at=t - 1)

    first = await store.claim("w1", lease_seconds=30, limit=2)
    assert [r.id for r in first] == ["old", "mid"]
    for r in first:
        assert r.lease_owner == "w1"
        assert r.taken_over_from is None  # nobody held them
        assert r.lease_expires_at is not None and r.lease_expires_at >= t + 29
        assert (await get(store, r.id)).lease_owner == "w1"
    second = await store.claim("w2", lease_seconds=30, limit=10)
    assert [r.id for r in second] == ["new"]  # not terminal, not before wake_at, not leased
    assert await store.claim("w3", lease_seconds=30, limit=10) == []
    assert await store.claim("w3", lease_seconds=30, limit=0) == []


@case
async def concurrent_claims_never_share(store: EventStore) -> None:
    for i in range(12):
        await new(store, f"e{i:02}")
    batches = await asyncio.gather(
        *(store.claim(f"w{i}", lease_seconds=30, limit=3) for i in range(6))
    )
    claimed = [r.id for batch in batches for r in batch]
    assert sorted(claimed) == [f"e{i:02}" for i in range(12)]


@case
async def the_end_of_an_execution_releases_its_lease(store: EventStore) -> None:
    await new(store, "e1")
    [claimed] = await store.claim("w1", lease_seconds=30)
    await store.append("e1", 2, steps("a"), lease_token=claimed.lease_token)
    assert (await get(store, "e1")).lease_owner == "w1"  # a step's append keeps it
    await store.append("e1", 4, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED,
                       lease_token=claimed.lease_token)
    row = await get(store, "e1")
    assert row.lease_owner is None and row.lease_expires_at is None  # no release needed


@case
async def expired_lease_is_reclaimable_and_fences_the_old_worker(store: EventStore) -> None:
    await new(store, "e1")
    # a lease long enough for the two calls below on a slow, busy machine (0.05 s was not)
    [claimed] = await store.claim("w1", lease_seconds=1.0)
    assert claimed.id == "e1"
    result = await store.append("e1", 2, steps("a"), lease_owner="w1")
    assert result.last_seq == 3
    assert await store.claim("w2", lease_seconds=30) == []  # w1's lease is live
    await asyncio.sleep(max(0.0, claimed.lease_expires_at - time.time()) + 0.05)  # type: ignore[operator]
    # expired: w1 may no longer append, and nothing is written
    with pytest.raises(LeaseLostError):
        await store.append("e1", 4, steps("b"), lease_owner="w1")
    assert (await get(store, "e1")).last_seq == 3
    [reclaimed] = await store.claim("w2", lease_seconds=30)
    assert reclaimed.id == "e1" and reclaimed.lease_owner == "w2"
    assert reclaimed.taken_over_from == "w1"  # what a worker counts as a takeover
    assert (await get(store, "e1")).taken_over_from is None  # not a column
    assert await store.renew_lease("w1", ["e1"], 30) == []  # taken over: not w1's any more
    with pytest.raises(LeaseLostError):
        await store.append("e1", 4, steps("b"), lease_owner="w1")
    assert (await store.append("e1", 4, steps("b"), lease_owner="w2")).last_seq == 5
    # a seq conflict is reported as such even for a worker without the lease
    with pytest.raises(AppendConflictError):
        await store.append("e1", 4, steps("c"), lease_owner="w1")


@case
async def the_leases_of_a_dead_owner_end_at_once(store: EventStore) -> None:
    for eid in ("held", "other", "done"):
        await new(store, eid)
    claimed = await store.claim("dead", lease_seconds=300, limit=3)
    assert sorted(r.id for r in claimed) == ["done", "held", "other"]
    await store.release("dead", "other")
    await store.append("done", 2, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED,
                       lease_owner="dead")
    assert [r.id for r in await store.claim("w2", lease_seconds=30, limit=5)] == ["other"]
    assert sorted(await store.expire_leases("dead")) == ["held"]  # not released, not done
    assert await store.expire_leases("dead") == []
    assert await store.expire_leases("nobody") == []
    taken = await store.claim("w2", lease_seconds=30, limit=5)
    assert [(r.id, r.taken_over_from) for r in taken] == [("held", "dead")]
    with pytest.raises(LeaseLostError):  # fenced, as after any takeover
        await store.append("held", 2, steps("a"), lease_owner="dead")


@case
async def append_with_a_lease_never_claimed_raises(store: EventStore) -> None:
    await new(store, "e1")
    with pytest.raises(LeaseLostError):
        await store.append("e1", 2, steps("a"), lease_owner="w1")
    assert (await get(store, "e1")).last_seq == 1
    assert (await store.append("e1", 2, steps("a"))).last_seq == 3  # no lease asked: fine


@case
async def renew_and_release(store: EventStore) -> None:
    for eid in ("a", "b", "c"):
        await new(store, eid)
    await store.claim("w1", lease_seconds=30, limit=2)  # a, b
    await store.claim("w2", lease_seconds=30, limit=1)  # c
    t = time.time()
    assert await store.renew_lease("w1", ["a", "b", "c", "nope"], 300) == ["a", "b"]
    assert (await get(store, "a")).lease_expires_at >= t + 299  # type: ignore[operator]
    assert await store.renew_lease("w1", [], 300) == []
    await store.release("w2", "a")  # not w2's: no effect
    assert (await get(store, "a")).lease_owner == "w1"
    await store.release("w1", "a")
    released = await get(store, "a")
    assert released.lease_owner is None and released.lease_expires_at is None
    assert await store.renew_lease("w1", ["a"], 300) == []
    assert [r.id for r in await store.claim("w3", lease_seconds=30)] == ["a"]
    await store.release("w1", "nope")  # unknown: no error


# change notification --------------------------------------------------------------------
@case
async def subscribe_yields_history_then_new_events_until_terminal(store: EventStore) -> None:
    await new(store, "e1")
    await store.append("e1", 2, steps("a"))
    seen: list[int] = []

    async def follow() -> None:
        async for stored in store.subscribe("e1"):
            seen.append(stored.seq)

    task = asyncio.create_task(follow())
    for _ in range(100):
        if seen == [1, 2, 3]:
            break
        await asyncio.sleep(0.01)
    assert seen == [1, 2, 3]
    await store.append("e1", 4, steps("b"))
    await store.append("e1", 6, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED)
    await asyncio.wait_for(task, 5)
    assert seen == [1, 2, 3, 4, 5, 6]
    late = [s.seq async for s in store.subscribe("e1", after_seq=4)]
    assert late == [5, 6]


@case
async def wait_for_change_wakes_on_append(store: EventStore) -> None:
    await new(store, "e1")
    waiter = asyncio.create_task(store.wait_for_change("e1", 10))
    any_waiter = asyncio.create_task(store.wait_for_change(None, 10))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await store.append("e1", 2, steps("a"))
    await asyncio.wait_for(asyncio.gather(waiter, any_waiter), 5)
    assert time.monotonic() - started < 5


# throughput -----------------------------------------------------------------------------
@case
async def concurrent_appends_to_many_executions_all_land(store: EventStore) -> None:
    ids = [f"e{i:03}" for i in range(100)]
    await asyncio.gather(*(new(store, eid) for eid in ids))
    commits_before = getattr(store, "commit_count", None)
    results = await asyncio.gather(*(store.append(eid, 2, steps("s", eid)) for eid in ids))
    assert [r.last_seq for r in results] == [3] * 100
    for eid in ids:
        history = await store.load(eid)
        assert [s.seq for s in history] == [1, 2, 3]
        assert history[2].event == StepCompleted(step="s", result=eid, ts=2.0)
    if commits_before is not None:  # a backend that counts commits: they were grouped
        commits = store.commit_count - commits_before  # type: ignore[attr-defined]
        assert commits < 100, commits


@case
async def long_history_loads_whole_and_in_order(store: EventStore) -> None:
    await new(store, "e1")
    seq = 2
    for i in range(20):
        batch = [StepCompleted(step="s", instance=i * 50 + j, result=j) for j in range(50)]
        await store.append("e1", seq, batch)
        seq += len(batch)
    history = await store.load("e1")
    assert [s.seq for s in history] == list(range(1, 1002))
    assert [s.event.instance for s in history[1:]] == list(range(1000))  # type: ignore[attr-defined]


@case
async def acquire_grows_the_fencing_token_and_fences_the_old_holder(store: EventStore) -> None:
    await new(store, "e1")
    first = await store.acquire("e1", "w1", lease_seconds=30)
    assert first is not None and first.lease_owner == "w1" and first.lease_token == 1
    assert first.lease_renewed_at is not None
    assert (await store.append("e1", 2, steps("a"), lease_token=1)).last_seq == 3
    assert await store.acquire("e1", "w2", lease_seconds=30) is None  # w1's lease is live
    again = await store.acquire("e1", "w1", lease_seconds=30)  # the holder itself: new token
    assert again is not None and again.lease_token == 2
    taken = await store.acquire("e1", "w2", lease_seconds=30, takeover_from="w1")
    assert taken is not None and taken.lease_owner == "w2" and taken.lease_token == 3
    with pytest.raises(LeaseLostError, match="taken over by w2"):
        await store.append("e1", 4, steps("b"), lease_token=2)
    assert (await get(store, "e1")).last_seq == 3  # the stale append wrote nothing
    assert (await store.append("e1", 4, steps("b"), lease_token=3)).last_seq == 5
    await store.append("e1", 6, [ExecutionCompleted()], status=ExecutionStatus.COMPLETED,
                       lease_token=3)
    assert await store.acquire("e1", "w3", lease_seconds=30, takeover_from="w2") is None
    assert await store.acquire("missing", "w1", lease_seconds=30) is None


@case
async def an_expired_lease_is_acquired_by_anyone(store: EventStore) -> None:
    await new(store, "e1")
    assert (await store.acquire("e1", "w1", lease_seconds=0.05)) is not None
    await asyncio.sleep(0.1)
    taken = await store.acquire("e1", "w2", lease_seconds=30)
    assert taken is not None and taken.lease_token == 2
    with pytest.raises(LeaseLostError):
        await store.append("e1", 2, steps("a"), lease_token=1)


@case
async def a_creator_holds_the_lease_from_the_start(store: EventStore) -> None:
    record, created = await store.create_execution(
        NewExecution(id="e1", workflow_name="wf", lease_owner="me", lease_seconds=30),
        ExecutionStarted(workflow_name="wf"),
    )
    assert created and record.lease_owner == "me" and record.lease_token == 1
    stored = await get(store, "e1")
    assert stored.lease_owner == "me" and stored.lease_token == 1
    assert stored.lease_expires_at is not None and stored.lease_expires_at > time.time() + 20
    assert await store.claim("w2", lease_seconds=30) == []
    assert (await store.append("e1", 2, steps("a"), lease_token=1)).last_seq == 3
    claimed = await store.acquire("e1", "w2", lease_seconds=30, takeover_from="me")
    assert claimed is not None and claimed.lease_token == 2


@case
async def claims_grow_the_token_and_skip_blocked_executions(store: EventStore) -> None:
    await new(store, "a")
    await new(store, "b")
    await store.append("b", 2, [StepStarted(step="x")], status=ExecutionStatus.BLOCKED)
    [claimed] = await store.claim("w1", lease_seconds=30, limit=5)
    assert claimed.id == "a" and claimed.lease_token == 1
    assert (await get(store, "b")).status is ExecutionStatus.BLOCKED
    blocked = await store.acquire("b", "w2", lease_seconds=30)  # a resume may take it
    assert blocked is not None and blocked.lease_token == 1


# history checksums ----------------------------------------------------------------------
@case
async def the_chain_runs_across_appends_and_loads_from_any_seq(store: EventStore) -> None:
    record, _ = await new(store, "e1")
    chains = [record.last_chain]
    assert chains[0] is not None and (await get(store, "e1")).last_chain == chains[0]
    for i in range(4):  # batches of 1, 2, 3 and 4 events
        batch = [StepCompleted(step="s", instance=i * 10 + j, result=j) for j in range(i + 1)]
        last = (await get(store, "e1")).last_seq
        await store.append("e1", last + 1, batch)
        chains.append((await get(store, "e1")).last_chain)
    assert len(set(chains)) == len(chains) and None not in chains
    await store.append("e1", 12, [], status=ExecutionStatus.RUNNING)  # no events: no new link
    assert (await get(store, "e1")).last_chain == chains[-1]
    history = await store.load("e1")
    assert [s.seq for s in history] == list(range(1, 12))
    for after in range(0, 13):
        assert await store.load("e1", after_seq=after) == history[after:], after
    # loads in between appends chain the next append from what they saw
    assert [s.seq for s in await store.load("e1", after_seq=9)] == [10, 11]
    await store.append("e1", 12, steps("t"))
    assert [s.seq for s in await store.load("e1", after_seq=11)] == [12, 13]
    audit = await store.audit("e1")
    assert [(a.seq, a.problem) for a in audit] == [(seq, None) for seq in range(1, 14)]
    assert [a.event for a in audit] == [s.event for s in await store.load("e1")]
    assert [a.type for a in audit][:2] == ["ExecutionStarted", "StepCompleted"]


@case
async def two_histories_chain_independently(store: EventStore) -> None:
    await new(store, "e1")
    await new(store, "e2")
    for seq in (2, 4, 6):
        await asyncio.gather(store.append("e1", seq, steps("a", seq)),
                             store.append("e2", seq, steps("a", -seq)))
    one, two = await store.load("e1"), await store.load("e2")
    assert [s.seq for s in one] == [s.seq for s in two] == list(range(1, 8))
    assert (await get(store, "e1")).last_chain != (await get(store, "e2")).last_chain
    assert await store.audit("nope") == []


@case
async def an_expired_lease_nobody_took_is_renewed_by_its_holder(store: EventStore) -> None:
    await new(store, "e1")
    leased = await store.acquire("e1", "w1", lease_seconds=0.05)
    assert leased is not None
    await asyncio.sleep(0.1)  # e.g. the store was down longer than the lease
    assert await store.renew_lease("w1", ["e1"], 30) == ["e1"]
    record = await get(store, "e1")
    assert record.lease_token == leased.lease_token and record.lease_live(time.time())
    assert (await store.append("e1", 2, steps("a"), lease_token=leased.lease_token)).last_seq == 3


# queues ---------------------------------------------------------------------------------
@case
async def claims_serve_the_queues_asked_for_most_urgent_first(store: EventStore) -> None:
    await new(store, "plain")
    await new(store, "gpu-low", queue="gpu")
    await new(store, "gpu-high", queue="gpu", priority=5)
    await new(store, "cpu", queue="cpu")
    assert (await get(store, "gpu-high")).queue == "gpu"
    assert (await get(store, "gpu-high")).priority == 5
    gpu = await store.claim("w1", lease_seconds=30, limit=5, queues=["gpu"])
    assert [r.id for r in gpu] == ["gpu-high", "gpu-low"]
    assert all(r.first_claimed_at is not None for r in gpu)
    default = await store.claim("w2", lease_seconds=30, limit=5, queues=["default"])
    assert [r.id for r in default] == ["plain"]
    assert [r.id for r in await store.claim("w3", lease_seconds=30, limit=5)] == ["cpu"]


@case
async def a_queue_concurrency_limit_holds_across_claimers(store: EventStore) -> None:
    await store.set_queue(QueueConfig(name="q", concurrency=2))
    for i in range(6):
        await new(store, f"q{i}", queue="q")
    batches = await asyncio.gather(*(store.claim(f"w{i}", lease_seconds=30, limit=3,
                                                 queues=["q"]) for i in range(4)))
    held = [r for batch in batches for r in batch]
    assert len(held) == 2
    assert await store.claim("w9", lease_seconds=30, limit=3) == []  # serving every queue
    await store.release(held[0].lease_owner or "", held[0].id)
    again = await store.claim("w9", lease_seconds=30, limit=3)
    assert len(again) == 1  # one place came free
    stats = {q.config.name: q for q in await store.list_queues()}
    assert stats["q"].config.concurrency == 2
    assert (stats["q"].running, stats["q"].pending) == (2, 4)


@case
async def queue_load_counts_blocked_executions_apart(store: EventStore) -> None:
    for i in range(3):
        await new(store, f"b{i}", queue="q")
    await store.append("b0", 2, steps("a"), status=ExecutionStatus.BLOCKED)
    [stats] = [q for q in await store.list_queues() if q.config.name == "q"]
    assert (stats.pending, stats.blocked, stats.running) == (2, 1, 0)  # no worker claims it


@case
async def a_per_key_limit_holds_for_executions_queued_before_it(store: EventStore) -> None:
    """Queued while the queue had no per-key limit (no key recorded): the limit, set
    afterwards, still holds for them: their key is their tag's value."""
    for i, tenant in enumerate(["a", "a", "a", "b"]):
        await new(store, f"early{i}", queue="late-keys", tags={"tenant": tenant})
    running = await store.claim("w0", lease_seconds=30, limit=1, queues=["late-keys"])
    assert [r.id for r in running] == ["early0"]  # started before any limit existed
    await store.set_queue(QueueConfig(name="late-keys", key_tag="tenant", key_concurrency=1))
    assert (await get(store, "early0")).concurrency_key == "a"  # counted from now on
    got = await store.claim("w1", lease_seconds=30, limit=10, queues=["late-keys"])
    assert [(r.id, r.concurrency_key) for r in got] == [("early3", "b")]
    # queued after the limit by a client that did not know of it: keyed at the claim
    await new(store, "unkeyed", queue="late-keys", tags={"tenant": "c"})
    got = await store.claim("w2", lease_seconds=30, limit=10, queues=["late-keys"])
    assert [(r.id, r.concurrency_key) for r in got] == [("unkeyed", "c")]
    assert (await get(store, "unkeyed")).concurrency_key == "c"
    assert await store.claim("w3", lease_seconds=30, limit=10) == []


@case
async def limits_on_the_default_queue_hold(store: EventStore) -> None:
    await store.set_queue(QueueConfig(name="default", concurrency=1))
    for i in range(3):
        await new(store, f"d{i}")
    first = await store.claim("w1", lease_seconds=30, limit=10)
    assert [r.id for r in first] == ["d0"]
    assert await store.claim("w2", lease_seconds=30, limit=10, queues=["default"]) == []
    await store.release("w1", "d0")
    assert [r.id for r in await store.claim("w2", lease_seconds=30, limit=10)] == ["d0"]


@case
async def a_full_queue_does_not_hide_the_work_behind_it(store: EventStore) -> None:
    """A limited queue's backlog, older than everything else, fills the most urgent
    candidates: the claim looks past it for other queues' work and other tenants'."""
    await store.set_queue(QueueConfig(name="narrow", concurrency=1))
    await store.set_queue(QueueConfig(name="shared", key_tag="tenant", key_concurrency=1))
    for i in range(70):
        await new(store, f"n{i:02}", queue="narrow")
    for i in range(70):
        await new(store, f"a{i:02}", queue="shared", tags={"tenant": "a"},
                  concurrency_key="a")
    await new(store, "b", queue="shared", tags={"tenant": "b"}, concurrency_key="b")
    await new(store, "free", queue="wide")
    got = await store.claim("w1", lease_seconds=30, limit=4)
    assert sorted(r.id for r in got) == ["a00", "b", "free", "n00"], [r.id for r in got]
    assert await store.claim("w2", lease_seconds=30, limit=4) == []
    got = await store.claim("w3", lease_seconds=30, limit=4, queues=["shared", "wide"])
    assert got == []  # every tenant of shared is running; nothing else is left


@case
async def a_per_key_limit_and_a_rate_limit_hold(store: EventStore) -> None:
    await store.set_queue(QueueConfig(name="tenants", key_tag="tenant", key_concurrency=1))
    for i, tenant in enumerate(["a", "a", "b", "a", "b"]):
        await new(store, f"t{i}", queue="tenants", concurrency_key=tenant)
    first = await store.claim("w1", lease_seconds=30, limit=10, queues=["tenants"])
    assert sorted(r.concurrency_key or "" for r in first) == ["a", "b"]
    assert await store.claim("w2", lease_seconds=30, limit=10, queues=["tenants"]) == []
    await store.set_queue(QueueConfig(name="slow", rate_count=2, rate_seconds=3600))
    for i in range(4):
        await new(store, f"s{i}", queue="slow")
    got = await store.claim("w1", lease_seconds=30, limit=10, queues=["slow"])
    assert len(got) == 2
    for r in got:
        await store.release("w1", r.id)
    # two started this hour: those two may be claimed again, no third may start
    again = await store.claim("w2", lease_seconds=30, limit=10, queues=["slow"])
    assert sorted(r.id for r in again) == sorted(r.id for r in got)
    assert await store.claim("w3", lease_seconds=30, limit=10, queues=["slow"]) == []


@case
async def workers_report_themselves_and_leave(store: EventStore) -> None:
    info = WorkerInfo(id="h:1:2:3:w1", name="w1", host="h", pid=1, queues=("gpu", "cpu"),
                      concurrency=4, held=2, started_at=time.time())
    before = time.time()
    await store.heartbeat(info)
    await store.heartbeat(WorkerInfo(id="h:9:2:3:w2", name="w2", host="h", pid=9))
    found = {w.name: w for w in await store.list_workers()}
    assert found["w1"].queues == ("gpu", "cpu") and found["w1"].held == 2
    assert found["w1"].heartbeat_at >= before - 1 and found["w2"].queues == ()
    await store.heartbeat(info, gone=True)
    assert [w.name for w in await store.list_workers()] == ["w2"]
