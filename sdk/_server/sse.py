"""Server-Sent Events: one execution's events, its log lines, and events across executions.

Every message carries an ``id`` a client sends back as ``Last-Event-ID`` when it reconnects,
and the stream goes on right after that message: nothing missed, nothing twice.

- One execution (events or log lines): the id is the event's ``seq``. Its log lines are
  one message per event (``data`` holds each line), so a cut never falls inside an event.
- Across executions: there is no global sequence in the store, so the stream has an order
  of its own: by the *effective time* of each event (the largest ``ts`` of its execution's
  events up to it, so an execution's events keep their order), then execution id, then
  seq. The id is ``<effective time>:<execution id>:<seq>`` (the execution id
  percent-encoded: an id may hold a newline, which would end the field); a reconnecting
  stream skips what sorts at or before it. An event is sent once ``SETTLE`` seconds have
  passed since its time, so that an append that commits a little late still sorts after
  what was sent.
  (An append committed more than that after its event's time, or a worker clock off by
  more, may be missed by a reconnect; a live stream never misses it.)

Each stream ends with an ``end`` message (no id) once there is nothing more to send; a
stream that stops without one was cut, and the client reconnects. Comments (``: keep
alive``) are sent while nothing happens, so proxies do not close an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec

from agentainer_flow.store import WATCH_SECONDS, EventStore, StoredEvent

from .._client import _is_log, _log_lines
from .._events import ExecutionEvent, event_type

__all__ = [
    "KEEPALIVE_SECONDS",
    "SETTLE",
    "execution_events",
    "execution_logs",
    "message",
    "parse_cursor",
    "workflow_events",
]

#: seconds of silence after which a comment is sent
KEEPALIVE_SECONDS = 15.0
#: seconds an event of the cross-execution stream waits before it is sent (see above)
SETTLE = 0.5
#: seconds before a cursor's time whose executions a reconnect looks at again (other
#: processes' clocks and late commits)
_SLACK = 5.0

Cursor = tuple[float, str, int]


def message(data: str, *, id: str | None = None, event: str | None = None) -> bytes:
    """One SSE message; ``data`` may hold several lines."""
    parts = []
    if event is not None:
        parts.append(f"event: {event}\n")
    if id is not None:
        parts.append(f"id: {id}\n")
    parts.extend(f"data: {line}\n" for line in data.split("\n"))
    return ("".join(parts) + "\n").encode()


def _end(**fields: Any) -> bytes:
    return message(msgspec.json.encode(fields).decode(), event="end")


def _event_json(stored: StoredEvent) -> str:
    """An event as the history route shows it (``EventOut``)."""
    from .convert import event_out

    return event_out(stored).model_dump_json()


def parse_seq(last_event_id: str | None) -> int:
    """The seq of a ``Last-Event-ID`` of a one-execution stream (0: from the start)."""
    text = (last_event_id or "").strip()
    if not text:
        return 0
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"Last-Event-ID {text!r} is not an event seq of this stream (a "
                         "number); send back the id of the last message received")
    return int(text)


def parse_cursor(last_event_id: str | None) -> Cursor | None:
    """The position a ``Last-Event-ID`` of the cross-execution stream names."""
    text = (last_event_id or "").strip()
    if not text:
        return None
    head, _, rest = text.partition(":")
    execution_id, _, seq = rest.rpartition(":")
    try:
        return float(head), urllib.parse.unquote(execution_id), int(seq)
    except ValueError:
        raise ValueError(f"Last-Event-ID {text!r} is not a position of this stream "
                         "(<time>:<execution id>:<seq>); send back the id of the last "
                         "message received") from None


async def with_keepalive(stream: AsyncIterator[bytes],
                         every: float = KEEPALIVE_SECONDS) -> AsyncIterator[bytes]:
    """``stream``'s messages, with a comment after every ``every`` seconds of silence."""
    pending: asyncio.Future[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield b": keep alive\n\n"
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def execution_events(store: EventStore, execution_id: str,
                           after_seq: int) -> AsyncIterator[bytes]:
    """The execution's events after ``after_seq``, then new ones until it ends."""
    last = after_seq
    async for stored in store.subscribe(execution_id, after_seq):
        last = stored.seq
        yield message(_event_json(stored), id=str(stored.seq))
    record = await store.get_execution(execution_id)
    yield _end(execution_id=execution_id, last_seq=last,
               status=record.status.value if record is not None else None)


async def execution_logs(store: EventStore, execution_id: str,
                         after_seq: int) -> AsyncIterator[bytes]:
    """The execution's log lines (one message per event) after ``after_seq``, then new
    ones until it ends."""
    last = after_seq
    async for stored in store.subscribe(execution_id, after_seq):
        last = stored.seq
        event = ExecutionEvent.from_stored(stored)
        if _is_log(event):
            yield message("\n".join(_log_lines(event)), id=str(stored.seq))
    yield _end(execution_id=execution_id, last_seq=last)


async def workflow_events(
    store: EventStore,
    *,
    workflow: str | None,
    types: Sequence[str] | None,
    since: float | None,
    after: Cursor | None,
    follow: bool,
    poll_interval: float = 0.25,
) -> AsyncIterator[bytes]:
    """Events of every execution (of ``workflow``; of ``types``), in the order described
    in this module's docstring, from after the cursor ``after`` (the whole history of
    executions created since ``since`` without one); with ``follow``, forever."""
    wanted = set(types) if types else None
    seen: dict[str, int] = {}  # per execution: the last seq looked at
    tops: dict[str, float] = {}  # per execution: its effective time at that seq
    checked_at: float | None = None
    renew_at = 0.0
    while True:
        if follow and time.monotonic() >= renew_at:  # writers elsewhere: announce appends
            await store.watch(None)
            renew_at = time.monotonic() + WATCH_SECONDS / 3
        started = time.time()
        if checked_at is not None:
            updated_after: float | None = checked_at - _SLACK
        else:
            updated_after = after[0] - _SLACK if after is not None else None
        rows = await store.list_executions(workflow_name=workflow, created_after=since,
                                           updated_after=updated_after, limit=None)
        horizon = started - SETTLE if follow else float("inf")
        batch: list[tuple[Cursor, StoredEvent]] = []
        for row in rows:
            last = seen.get(row.id)
            if last is not None and row.last_seq <= last:
                continue
            top = tops.get(row.id, 0.0)
            for stored in await store.load(row.id, last or 0):
                top = max(top, stored.event.ts)
                if top > horizon:
                    break  # not settled: it and what follows wait for a later round
                seen[row.id], tops[row.id] = stored.seq, top
                key = (top, row.id, stored.seq)
                if last is None and after is not None and key <= after:
                    continue  # sent before the reconnect
                if wanted is None or event_type(stored.event) in wanted:
                    batch.append((key, stored))
        batch.sort(key=lambda item: item[0])
        for key, stored in batch:
            event_id = f"{key[0]!r}:{urllib.parse.quote(key[1], safe='')}:{key[2]}"
            yield message(_event_json(stored), id=event_id)
        checked_at = started
        if not follow:
            yield _end(caught_up=True)
            return
        await store.wait_for_change(None, poll_interval)
