"""History checksums: each event's ``chain`` is a hash over the previous event's chain and
its own seq, type and encoded payload, so a missing, duplicated, reordered or changed event
breaks the chain from that event on, and the executions row's ``last_chain`` pins the end.

Events written before schema version 2 have no chain (NULL): they are accepted, and the
chain continues over them from the last event that has one (``""`` before the first).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from .base import AuditedEvent, StoredEvent
from .errors import HistoryCorruptedError
from .events import Event, decode_event

__all__ = ["ChainCache", "Row", "audited", "chain_all", "chain_of", "verified"]

#: a stored event as the backends read it: (seq, type name, encoded payload, chain or None)
Row = tuple[int, str, Any, str | None]
#: the executions row's (last_seq, last_chain), or None when there is no row
End = tuple[int, str | None] | None

_sha256 = hashlib.sha256


def chain_of(prev: str | None, seq: int, type_name: str, data: bytes) -> str:
    """The chain value of event ``seq`` (of type ``type_name``, payload ``data``) that
    follows an event whose chain is ``prev`` (``None`` or ``""`` for the first)."""
    return _sha256(f"{prev or ''}\x1f{seq}\x1f{type_name}\x1f".encode() + data).hexdigest()[:32]


def chain_all(prev: str | None, encoded: Sequence[tuple[int, str, bytes]]) -> list[str]:
    """The chain values of consecutive events ``(seq, type name, payload)`` after ``prev``."""
    out: list[str] = []
    for seq, type_name, data in encoded:
        prev = chain_of(prev, seq, type_name, data)
        out.append(prev)
    return out


class ChainCache:
    """``{execution_id: (last_seq, last_chain)}`` of recently appended or loaded executions,
    so an append can chain without reading the previous event. Bounded: the least recently
    used entries go first. A stale entry is harmless: appends are guarded on ``last_chain``.
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = 10_000) -> None:
        self._entries: dict[str, tuple[int, str | None]] = {}
        self._size = size

    def prev(self, execution_id: str, seq: int) -> tuple[bool, str | None]:
        """(known, chain of event ``seq``) if the cache knows event ``seq`` is the last."""
        entry = self._entries.get(execution_id)
        if entry is not None and entry[0] == seq:
            return True, entry[1]
        return False, None

    def put(self, execution_id: str, last_seq: int, last_chain: str | None) -> None:
        """Remember that the execution's log ends at ``last_seq`` with ``last_chain``."""
        entries = self._entries
        entries.pop(execution_id, None)
        entries[execution_id] = (last_seq, last_chain)
        if len(entries) > self._size:
            del entries[next(iter(entries))]

    def put_if_newer(self, execution_id: str, last_seq: int, last_chain: str | None) -> None:
        """``put``, unless the cache knows a later end already (a load racing an append)."""
        entry = self._entries.get(execution_id)
        if entry is None or entry[0] < last_seq:
            self.put(execution_id, last_seq, last_chain)

    def forget(self, execution_id: str) -> None:
        self._entries.pop(execution_id, None)


def verified(
    execution_id: str, after_seq: int, rows: Sequence[Row], end: End
) -> tuple[list[StoredEvent], tuple[int, str | None] | None]:
    """The events of ``rows`` after ``after_seq``, checked; and the (seq, chain) they end at.

    ``rows`` start at ``after_seq`` itself when it is not 0 (the event to chain from, its
    chain being the last non-NULL one up to it) and run to the end of the log; ``end`` is
    the executions row's (last_seq, last_chain). Raises ``HistoryCorruptedError`` at the
    first gap, changed event, undecodable payload or cut tail.
    """
    prev: str | None = None
    if after_seq > 0:
        if not rows or rows[0][0] != after_seq:
            if rows or (end is not None and end[0] >= after_seq):
                raise HistoryCorruptedError(execution_id, after_seq, "the event is missing")
            return [], None  # nothing there yet
        prev = rows[0][3]
        rows = rows[1:]
    seq = after_seq + len(rows)
    # The fast path checks the whole batch at once (seqs are unique and sorted, so they are
    # contiguous if the ends are right); on any doubt, the careful path finds the damage.
    try:
        if rows and (rows[0][0] != after_seq + 1 or rows[-1][0] != seq):
            raise _Doubt()
        last = _chained(prev, rows)
        decode = decode_event
        events = [StoredEvent(execution_id, s, decode(data)) for s, _, data, _ in rows]
    except (_Doubt, TypeError, msgspec.DecodeError, msgspec.ValidationError):
        events, last = _careful(execution_id, after_seq, prev, rows)
    if end is None:
        return events, None
    last_seq, last_chain = end
    if last_seq > seq:
        raise HistoryCorruptedError(execution_id, seq + 1, _cut(seq + 1, last_seq))
    if last_seq < seq:
        raise HistoryCorruptedError(execution_id, last_seq + 1, _beyond(last_seq))
    if last_chain != last:  # events after the last one found were cut, the row moved back
        raise HistoryCorruptedError(execution_id, seq + 1, _TAIL)
    return events, (seq, last)


class _Doubt(Exception):
    """The fast check of a batch failed: look at it event by event."""


def _chained(prev: str | None, rows: Sequence[Row]) -> str | None:
    """The last chain value of ``rows`` after ``prev``, raising ``_Doubt`` on a mismatch."""
    for seq, type_name, data, chain in rows:
        if chain is not None:
            if chain != chain_of(prev, seq, type_name, data):
                raise _Doubt()
            prev = chain
    return prev


def _careful(
    execution_id: str, after_seq: int, prev: str | None, rows: Sequence[Row]
) -> tuple[list[StoredEvent], str | None]:
    """``verified``'s check one event at a time: raises at the first damaged seq."""
    events: list[StoredEvent] = []
    seq = after_seq
    for row_seq, type_name, raw, chain in rows:
        seq += 1
        if row_seq != seq:
            raise HistoryCorruptedError(execution_id, seq, _missing(seq, row_seq - 1))
        data = raw if type(raw) is bytes else _as_bytes(raw)
        if chain is not None:
            if chain != chain_of(prev, seq, type_name, data):
                raise HistoryCorruptedError(execution_id, seq, _undecodable(data) or _CHANGED)
            prev = chain
        problem = _undecodable(data)
        if problem is not None:
            raise HistoryCorruptedError(execution_id, seq, problem)
        events.append(StoredEvent(execution_id, seq, decode_event(data)))
    return events, prev


def audited(execution_id: str, rows: Sequence[Row], end: End) -> list[AuditedEvent]:
    """Every row of a whole log, decoded where it can be, with what ``verified`` would
    refuse marked on the entry it concerns (a cut tail: a final entry without event)."""
    out: list[AuditedEvent] = []
    prev: str | None = None
    expected = 1
    for row_seq, type_name, raw, chain in rows:
        data = raw if type(raw) is bytes else _as_bytes(raw)
        problems: list[str] = []
        if row_seq != expected:
            problems.append(_missing(expected, row_seq - 1) + " before it")
        event: Event | None
        try:
            event = decode_event(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            event = None
            problems.append(f"its payload does not decode ({exc})")
        if chain is not None:
            # a gap or an unreadable payload explains a mismatch already
            if not problems and chain != chain_of(prev, row_seq, type_name, data):
                problems.append(_CHANGED)
            prev = chain
        if end is not None and row_seq > end[0]:
            problems.append(_beyond(end[0]))
        out.append(AuditedEvent(row_seq, str(type_name), event, "; ".join(problems) or None))
        expected = row_seq + 1
    if end is not None:
        last_seq, last_chain = end
        if last_seq >= expected:
            out.append(AuditedEvent(expected, "", None, _cut(expected, last_seq)))
        elif last_seq == expected - 1 and last_chain != prev:
            out.append(AuditedEvent(expected, "", None, _TAIL))
    return out


_CHANGED = (
    "its checksum does not match: this event (or the one before it) was changed, "
    "inserted or moved"
)
_TAIL = (
    "the execution's checksum does not match its last event: the end of the history was "
    "cut or changed"
)


def _missing(first: int, last: int) -> str:
    if first >= last:
        return f"event {first} is missing"
    return f"events {first} to {last} are missing"


def _cut(first: int, last_seq: int) -> str:
    return (f"{_missing(first, last_seq)} at the end (the execution's row says its history "
            f"ends at seq {last_seq})")


def _beyond(last_seq: int) -> str:
    return f"the execution's row says its history ends at seq {last_seq}, before this event"


def _undecodable(data: bytes) -> str | None:
    """Why ``data`` does not decode, or ``None`` if it does."""
    try:
        decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return f"its payload does not decode ({exc})"
    return None


def _as_bytes(data: Any) -> bytes:
    """A payload as bytes (a driver may hand a memoryview; a damaged row may hold text)."""
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    return bytes(data)
