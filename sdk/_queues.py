"""Queues: where executions wait for workers, with limits that hold across every worker.

``Queue("gpu", concurrency=2, rate_limit="10/m")`` declares one in code. Declaring it
records nothing yet: its limits are written to the store when an execution is started on
it (``run_workflow(..., queue=gpu)``) and when a worker that serves it starts. ``flow queue
set`` writes them from the command line; the last writer wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agentainer_flow.engine.errors import ConfigurationError
from agentainer_flow.store import DEFAULT_QUEUE, QueueConfig

__all__ = ["DEFAULT_QUEUE", "MAX_LIMIT", "Queue", "check_priority", "check_queue_name",
           "declared_queues", "parse_rate"]

#: the largest limit, count or priority the stores hold (a 32-bit integer column)
MAX_LIMIT = 2**31 - 1

_DECLARED: dict[str, Queue] = {}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|m|min|h|hour|d|day)?\s*",
                   re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400,
         "day": 86400}


def check_queue_name(name: object) -> str:
    """``name`` if it can name a queue, else ``ConfigurationError`` saying why: text, not
    empty, without surrounding spaces, commas (a worker's queues are listed with them) or
    control characters, at most 200 characters."""
    if not isinstance(name, str):
        raise ConfigurationError(f"a queue name must be text, got {type(name).__name__}")
    if not name.strip():
        raise ConfigurationError("a queue needs a name (got an empty one)")
    problem = None
    if name != name.strip():
        problem = "it starts or ends with a space"
    elif "," in name:
        problem = "it holds a comma (a worker's queues are listed comma-separated)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        problem = "it holds a control character"
    elif len(name) > 200:
        problem = f"it is {len(name)} characters long (at most 200)"
    if problem:
        raise ConfigurationError(f"invalid queue name {name!r}: {problem}")
    return name


def _check_limit(value: object, what: str) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a whole number, got {value!r}")
    if not 1 <= value <= MAX_LIMIT:
        raise ConfigurationError(f"{what} must be between 1 and {MAX_LIMIT}, got {value}")


def check_priority(priority: object) -> int:
    """``priority`` if it is a whole number the stores can hold, else ``ConfigurationError``."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ConfigurationError(f"priority must be a whole number, got {priority!r}")
    if not -MAX_LIMIT - 1 <= priority <= MAX_LIMIT:
        raise ConfigurationError(
            f"priority must be between {-MAX_LIMIT - 1} and {MAX_LIMIT}, got {priority}")
    return priority


def parse_rate(text: str) -> tuple[int, float]:
    """``"10/m"`` → (10, 60.0): at most 10 starts per minute. Also ``"5/s"``, ``"100/h"``,
    ``"3/30s"``."""
    m = _RATE.fullmatch(text)
    if m is None or int(m.group(1)) <= 0:
        raise ConfigurationError(
            f"invalid rate limit {text!r}: use COUNT/PERIOD, e.g. '10/m', '5/s', '3/30s'")
    count = int(m.group(1))
    span = float(m.group(2) or 1) * _UNIT[(m.group(3) or "s").lower()]
    if span <= 0 or span == float("inf"):
        raise ConfigurationError(f"invalid rate limit {text!r}: the period must be positive")
    if count > MAX_LIMIT:
        raise ConfigurationError(
            f"invalid rate limit {text!r}: the count must be at most {MAX_LIMIT}")
    return count, span


@dataclass(frozen=True)
class Queue:
    """A named queue and its limits (``None``: no limit).

    ``concurrency``: executions running at once, across every worker and machine.
    ``rate_limit``: starts per period, e.g. ``"10/m"``.
    ``concurrency_key``: a tag name; with ``key_concurrency`` (default 1), at most that many
    executions with the same value of the tag run at once (one tenant at a time).
    """

    name: str
    concurrency: int | None = None
    rate_limit: str | None = None
    concurrency_key: str | None = None
    key_concurrency: int | None = field(default=None)

    def __post_init__(self) -> None:
        check_queue_name(self.name)
        _check_limit(self.concurrency, f"queue {self.name!r}: concurrency")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        _check_limit(self.key_concurrency, f"queue {self.name!r}: key_concurrency")
        if self.key_concurrency is not None and self.concurrency_key is None:
            raise ConfigurationError(
                f"queue {self.name!r}: key_concurrency limits executions per value of a tag; "
                "name the tag with concurrency_key= (--concurrency-key)")
        if self.concurrency_key is not None:
            if not isinstance(self.concurrency_key, str) or not self.concurrency_key.strip():
                raise ConfigurationError(
                    f"queue {self.name!r}: concurrency_key must name a tag")
        _DECLARED[self.name] = self

    def config(self) -> QueueConfig:
        """The limits as the store keeps them."""
        count, span = parse_rate(self.rate_limit) if self.rate_limit else (None, None)
        key_limit = self.key_concurrency
        if self.concurrency_key is not None and key_limit is None:
            key_limit = 1
        return QueueConfig(name=self.name, concurrency=self.concurrency, rate_count=count,
                           rate_seconds=span, key_tag=self.concurrency_key,
                           key_concurrency=key_limit)


def declared_queues() -> dict[str, Queue]:
    """The queues declared in code so far (by the modules imported), by name."""
    return dict(_DECLARED)
