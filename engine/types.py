"""Small value types steps see: agent results, parallel context, resource requests."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AgentResult", "ParallelContext", "ResourceRequirements"]


@dataclass(frozen=True, kw_only=True)
class AgentResult(Mapping[str, Any]):
    """What an agent reported. ``result["k"]`` reads ``result.output["k"]``.

    It is a read-only mapping over ``output``, so code that treats an agent's result as the
    dict it printed (``result["is_valid"]``, ``dict(result)``) works as written.
    """

    output: dict[str, Any] = field(default_factory=dict)
    exit_code: int = 0
    agent_name: str = ""
    agent_id: str = ""
    started_at: float | None = None
    finished_at: float | None = None

    def __getitem__(self, key: str) -> Any:
        return self.output[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.output)

    def __len__(self) -> int:
        return len(self.output)

    @property
    def duration(self) -> float | None:
        """Seconds the agent ran, when known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def to_dict(self) -> dict[str, Any]:
        """The reported output (what ``ctx.json`` writes for an agent result)."""
        return dict(self.output)


@dataclass(frozen=True, slots=True)
class ParallelContext:
    """Where a parallel step instance stands: ``index`` in ``0..total-1``."""

    index: int
    total: int
    item: Any = None


@dataclass(frozen=True, kw_only=True)
class ResourceRequirements:
    """CPU and memory for an agent: ``cpu`` in cores (0.5 = half a core), ``memory`` like
    "512m" or "2g". Runtimes that cannot enforce limits record them and go on."""

    cpu: float | None = None
    memory: str | None = None
    gpu: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("cpu", self.cpu), ("memory", self.memory), ("gpu", self.gpu))
                if v is not None}
