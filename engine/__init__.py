"""The execution layer: workflow specs, the replay executor and scheduler, clocks, secrets
and agent runtimes. Imports ``agentainer_flow.store``, never the SDK."""

from __future__ import annotations

from .clock import Clock, RealClock, VirtualClock
from .engine import Engine, Outcome
from .spec import ErrorHandler, RetryPolicy, StepSpec, WorkflowSpec, get_workflow_spec

__all__ = [
    "Clock",
    "Engine",
    "ErrorHandler",
    "Outcome",
    "RealClock",
    "RetryPolicy",
    "StepSpec",
    "VirtualClock",
    "WorkflowSpec",
    "get_workflow_spec",
]
