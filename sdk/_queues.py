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

__all__ = ["DEFAULT_QUEUE", "Queue", "declared_queues", "parse_rate"]

_DECLARED: dict[str, Queue] = {}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*(s|sec|m|min|h|hour|d|day)?\s*",
                   re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400,
         "day": 86400}


def parse_rate(text: str) -> tuple[int, float]:
    """``"10/m"`` → (10, 60.0): at most 10 starts per minute. Also ``"5/s"``, ``"100/h"``,
    ``"3/30s"``."""
    m = _RATE.fullmatch(text)
    if m is None or int(m.group(1)) <= 0:
        raise ConfigurationError(
            f"invalid rate limit {text!r}: use COUNT/PERIOD, e.g. '10/m', '5/s', '3/30s'")
    count = int(m.group(1))
    span = float(m.group(2) or 1) * _UNIT[(m.group(3) or "s").lower()]
    if span <= 0:
        raise ConfigurationError(f"invalid rate limit {text!r}: the period must be positive")
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
        if not self.name or not self.name.strip():
            raise ConfigurationError("a queue needs a name")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigurationError(f"queue {self.name!r}: concurrency must be at least 1")
        if self.rate_limit is not None:
            parse_rate(self.rate_limit)
        if self.key_concurrency is not None and self.key_concurrency < 1:
            raise ConfigurationError(
                f"queue {self.name!r}: key_concurrency must be at least 1")
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
