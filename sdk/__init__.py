"""agentainer-flow: durable, event-sourced workflows for containerised AI agents.

Write a workflow as a class with ``@workflow``; its ``@step`` methods form a DAG. Every agent
deployment, state write, timer and step result is recorded in an event log first, so a
crashed execution resumes where it was: finished work is not done again, and code that no
longer matches its history fails with ``NonDeterminismError``.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from agentainer_flow.engine.commands import AgentHandle, ChildWorkflowHandle
from agentainer_flow.engine.durations import parse_duration
from agentainer_flow.engine.errors import SecretLeakError
from agentainer_flow.engine.observe import Observer, set_default_observer
from agentainer_flow.engine.secrets import SecretStore
from agentainer_flow.engine.spec import ErrorHandler, RetryPolicy
from agentainer_flow.engine.types import AgentResult, ParallelContext, ResourceRequirements
from agentainer_flow.store import ExecutionRecord, ExecutionStatus, HistoryCorruptedError

from ._client import (
    ExecutionMode,
    ForkOrigin,
    WorkflowClient,
    WorkflowExecution,
    WorkflowMetrics,
)
from ._context import Context
from ._decorators import step, workflow
from ._errors import (
    AgentConfigurationError,
    AgentFailedError,
    AgentOutputError,
    AgentTimeoutError,
    AmbiguousExecutionIdError,
    AppendConflictError,
    ChildWorkflowError,
    ConfigurationError,
    ExecutionBlockedError,
    ExecutionNotFoundError,
    FlowError,
    IdempotencyConflictError,
    LeaseLostError,
    NonDeterminismError,
    RuntimeUnavailableError,
    SecretNotFoundError,
    SerializationError,
    StepError,
    StepNotFoundError,
    StepTimeoutError,
    StoreError,
    StoreNotFoundError,
    StoreUnavailableError,
    WorkflowCancelledError,
    WorkflowDefinitionError,
    WorkflowFailedError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
    WorkflowVersionNotRegisteredError,
)
from ._events import ExecutionEvent
from ._metrics import FlowMetrics
from ._otel import TracingObserver
from ._queues import Queue
from ._remote import RemoteError, RemoteWorkflowClient, RemoteWorkflowExecution
from ._worker import Worker

__version__ = "0.1.0"

WorkflowState = MutableMapping  # the seed's name for the type of ``ctx.state``
Workflow = object  # the seed's name for "an instance of a @workflow class"

__all__ = [
    "AgentConfigurationError",
    "AgentFailedError",
    "AgentHandle",
    "AgentOutputError",
    "AgentResult",
    "AgentTimeoutError",
    "AmbiguousExecutionIdError",
    "AppendConflictError",
    "ChildWorkflowError",
    "ChildWorkflowHandle",
    "ConfigurationError",
    "Context",
    "ErrorHandler",
    "ExecutionBlockedError",
    "ExecutionEvent",
    "ExecutionMode",
    "ExecutionNotFoundError",
    "ExecutionRecord",
    "ExecutionStatus",
    "FlowError",
    "FlowMetrics",
    "ForkOrigin",
    "HistoryCorruptedError",
    "IdempotencyConflictError",
    "LeaseLostError",
    "NonDeterminismError",
    "Observer",
    "ParallelContext",
    "Queue",
    "RemoteError",
    "RemoteWorkflowClient",
    "RemoteWorkflowExecution",
    "ResourceRequirements",
    "RetryPolicy",
    "RuntimeUnavailableError",
    "SecretLeakError",
    "SecretNotFoundError",
    "SecretStore",
    "SerializationError",
    "StepError",
    "StepNotFoundError",
    "StepTimeoutError",
    "StoreError",
    "StoreNotFoundError",
    "StoreUnavailableError",
    "TracingObserver",
    "Worker",
    "Workflow",
    "WorkflowCancelledError",
    "WorkflowClient",
    "WorkflowDefinitionError",
    "WorkflowExecution",
    "WorkflowFailedError",
    "WorkflowMetrics",
    "WorkflowNotRegisteredError",
    "WorkflowState",
    "WorkflowTimeoutError",
    "WorkflowVersionNotRegisteredError",
    "__version__",
    "parse_duration",
    "set_default_observer",
    "step",
    "workflow",
]
