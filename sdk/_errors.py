"""The public exception hierarchy (defined in the layers below, exported here).

    FlowError
    ├── StoreError (StoreUnavailableError > StoreNotFoundError, AppendConflictError,
    │               LeaseLostError, ExecutionNotFoundError > AmbiguousExecutionIdError)
    ├── WorkflowDefinitionError
    ├── NonDeterminismError
    ├── SerializationError
    ├── SecretNotFoundError
    ├── StepError (AgentFailedError > AgentTimeoutError, AgentOutputError,
    │              AgentConfigurationError (also a ConfigurationError);
    │              StepTimeoutError, ChildWorkflowError)
    ├── WorkflowFailedError (WorkflowTimeoutError, WorkflowCancelledError)
    ├── WorkflowNotRegisteredError > WorkflowVersionNotRegisteredError
    ├── StepNotFoundError          a step name the workflow does not have
    ├── ExecutionBlockedError      waits for a secret (status ``blocked``); resume with it
    ├── IdempotencyConflictError   a key reused for another workflow or input
    ├── RuntimeUnavailableError    the agent runtime (Docker) did not answer: resume later
    └── ConfigurationError

Every class has a stable ``code`` attribute for scripts.
"""

from __future__ import annotations

from agentainer_flow.engine.errors import (
    AgentConfigurationError,
    AgentFailedError,
    AgentOutputError,
    AgentTimeoutError,
    ChildWorkflowError,
    ConfigurationError,
    ExecutionBlockedError,
    IdempotencyConflictError,
    NonDeterminismError,
    RuntimeUnavailableError,
    SecretNotFoundError,
    SerializationError,
    StepError,
    StepNotFoundError,
    StepTimeoutError,
    WorkflowCancelledError,
    WorkflowDefinitionError,
    WorkflowFailedError,
    WorkflowNotRegisteredError,
    WorkflowTimeoutError,
    WorkflowVersionNotRegisteredError,
)
from agentainer_flow.store.errors import (
    AmbiguousExecutionIdError,
    AppendConflictError,
    ExecutionNotFoundError,
    FlowError,
    LeaseLostError,
    StoreError,
    StoreNotFoundError,
    StoreUnavailableError,
)

__all__ = [
    "AgentConfigurationError",
    "AgentFailedError",
    "AgentOutputError",
    "AgentTimeoutError",
    "AmbiguousExecutionIdError",
    "AppendConflictError",
    "ChildWorkflowError",
    "ConfigurationError",
    "ExecutionBlockedError",
    "ExecutionNotFoundError",
    "FlowError",
    "IdempotencyConflictError",
    "LeaseLostError",
    "NonDeterminismError",
    "RuntimeUnavailableError",
    "SecretNotFoundError",
    "SerializationError",
    "StepError",
    "StepNotFoundError",
    "StepTimeoutError",
    "StoreError",
    "StoreNotFoundError",
    "StoreUnavailableError",
    "WorkflowCancelledError",
    "WorkflowDefinitionError",
    "WorkflowFailedError",
    "WorkflowNotRegisteredError",
    "WorkflowTimeoutError",
    "WorkflowVersionNotRegisteredError",
]
