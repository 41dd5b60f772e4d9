"""The public API is pinned: an accidental addition or removal fails here."""

import agentainer_flow
import agentainer_flow.testing

PUBLIC = {
    "AgentConfigurationError", "AgentFailedError", "AgentHandle", "AgentOutputError",
    "AgentResult", "AgentTimeoutError",
    "AppendConflictError", "ChildWorkflowError", "ChildWorkflowHandle", "ConfigurationError",
    "Context", "ErrorHandler", "ExecutionEvent", "ExecutionMode", "ExecutionNotFoundError",
    "ExecutionBlockedError", "IdempotencyConflictError",
    "ExecutionRecord", "ExecutionStatus", "FlowError", "HistoryCorruptedError", "LeaseLostError",
    "NonDeterminismError", "ParallelContext", "Queue", "Worker", "ResourceRequirements",
    "RetryPolicy", "RuntimeUnavailableError",
    "SecretLeakError", "SecretNotFoundError", "SecretStore", "SerializationError", "StepError",
    "StepTimeoutError", "StoreError", "StoreUnavailableError", "Workflow",
    "WorkflowCancelledError", "WorkflowClient", "WorkflowDefinitionError",
    "WorkflowExecution", "WorkflowFailedError", "WorkflowMetrics",
    "WorkflowNotRegisteredError", "WorkflowState", "WorkflowTimeoutError", "__version__",
    "parse_duration", "step", "workflow",
    "ForkOrigin", "StepNotFoundError", "WorkflowVersionNotRegisteredError",
    "AmbiguousExecutionIdError", "StoreNotFoundError",
    "RemoteError", "RemoteWorkflowClient", "RemoteWorkflowExecution",
    "FlowMetrics", "Observer", "TracingObserver", "set_default_observer",
}

TESTING = {
    "MockAgent", "MockCall", "MockRegistry", "MockRuntime", "VirtualClock",
    "WorkflowTestCase", "mock_agent", "reset_mocks", "test_client", "check_determinism",
    "DeterminismReport", "CrashPoints", "NondeterministicCall", "ReplayCheckReport",
    "check_replay",
}


def test_public_names() -> None:
    assert set(agentainer_flow.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(agentainer_flow, name), name


def test_testing_names() -> None:
    assert set(agentainer_flow.testing.__all__) == TESTING


def test_errors_share_one_root_with_stable_codes() -> None:
    errors = [getattr(agentainer_flow, n) for n in PUBLIC if n.endswith("Error")]
    codes = set()
    for cls in errors:
        assert issubclass(cls, agentainer_flow.FlowError), cls
        codes.add(cls.code)
    assert len(codes) == len(errors)  # every error has its own code
