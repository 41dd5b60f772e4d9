"""Property: for generated DAGs (the public ``workflow_dags`` strategy), a crash at any
hypothesis-chosen point of the history resumes to the uncrashed result and history,
launching every agent exactly once, and a second run of every step records the same."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings

from agentainer_flow.testing import CrashPoints, check_determinism
from agentainer_flow.testing.strategies import (
    GeneratedWorkflow,
    crash_points,
    workflow_dags,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag=workflow_dags(), points=crash_points())
def test_generated_dags_resume_identically(dag: type[GeneratedWorkflow],
                                           points: CrashPoints) -> None:
    report = asyncio.run(check_determinism(dag, crash_points=points,
                                           registry=dag.registry()))
    assert report.reran and report.crash_points
    assert report.crash_points == points.resolve(report.events)
    assert report.outcome == "completed"
    assert report.nondeterministic_calls == []  # the generated steps use ctx only
