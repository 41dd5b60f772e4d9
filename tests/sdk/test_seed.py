"""The seed's examples (sections 1, 3, 4, 5, 7) run against mock agents."""

import pytest

from agentainer_flow import (
    AgentResult,
    ExecutionStatus,
    WorkflowFailedError,
)
from agentainer_flow.testing import WorkflowTestCase, mock_agent

from .seed_workflows import (
    CALLS,
    ConditionalWorkflow,
    DataWorkflow,
    DynamicParallelWorkflow,
    ParentWorkflow,
    ResilientWorkflow,
)


class TestDataWorkflow(WorkflowTestCase):
    """Section 5, as written in the seed."""

    async def test_successful_workflow(self):
        # Setup test data
        config = {"source_url": "test://data", "output_path": "test://output"}
        wf = DataWorkflow(config)

        # Mock agent responses
        with mock_agent("fetcher") as fetcher:
            fetcher.returns({"data_path": "/test/data.json"})

        with mock_agent("validator") as validator:
            validator.returns({"is_valid": True})

        with mock_agent("processor-*") as processor:
            processor.returns({"processed": True})

        with mock_agent("aggregator") as aggregator:
            aggregator.returns({"result": "success"})

        # Run workflow
        result = await self.run_workflow(wf)

        # Assertions
        assert result["result"] == "success"
        assert self.workflow_state["raw_data"] == "/test/data.json"
        assert self.workflow_state["processed_chunks"] == 5

    async def test_agents_get_what_the_steps_computed(self):
        fetcher = mock_agent("fetcher").returns({"data_path": "/d.json"})
        mock_agent("validator").returns({"is_valid": True})
        processor = mock_agent("processor-*").returns({"processed": True})
        aggregator = mock_agent("aggregator").returns({"result": "success"})
        wf = DataWorkflow({"source_url": "s3://in", "output_path": "s3://out"})
        result = await self.run_workflow(wf, secrets={"api_key": "k-123456"})
        assert isinstance(result, AgentResult)
        assert fetcher.calls[0].env == {"SOURCE_URL": "s3://in", "API_KEY": "k-123456"}
        chunks = sorted(c.env["CHUNK_ID"] for c in processor.calls)
        assert chunks == ["0", "1", "2", "3", "4"]
        assert {c.env["TOTAL_CHUNKS"] for c in processor.calls} == {"5"}
        assert {c.env["DATA_PATH"] for c in processor.calls} == {"/d.json"}
        assert aggregator.calls[0].env["OUTPUT_PATH"] == "s3://out"
        assert '"processed": true' in aggregator.calls[0].env["CHUNK_RESULTS"]
        # the secret's value is nowhere in the history
        assert all("k-123456" not in repr(e.details) for e in self.events)
        assert "[secret:api_key]" in repr(self.events)

    async def test_failed_validation_agent_fails_the_run(self):
        mock_agent("fetcher").returns({"data_path": "/d.json"})
        mock_agent("validator").fails("schema mismatch", exit_code=3)
        wf = DataWorkflow({"source_url": "s3://in", "output_path": "s3://out"})
        with pytest.raises(WorkflowFailedError, match="validator"):
            await self.run_workflow(wf)
        assert await self.execution.status() == ExecutionStatus.FAILED
        # max_retries=3: the failing step was tried four times
        failures = [e for e in self.events if e.type == "step_failed" and e.step == "validate"]
        assert len(failures) == 4


class TestConditional(WorkflowTestCase):
    """Section 3: ``when=`` picks a branch; the other is skipped."""

    async def test_large(self):
        result = await self.run_workflow(ConditionalWorkflow(), input={"data_size": 5000})
        assert result == {"process_large": None, "process_small": None}
        skipped = [e.step for e in self.events if e.type == "step_skipped"]
        assert skipped == ["process_small"]

    async def test_small(self):
        await self.run_workflow(ConditionalWorkflow(), input={"data_size": 10})
        skipped = [e.step for e in self.events if e.type == "step_skipped"]
        assert skipped == ["process_large"]


class TestSubWorkflow(WorkflowTestCase):
    """Section 3: a child workflow's result is the step's result."""

    async def test_child_result(self):
        worker = mock_agent("sub-worker").returns({"rows": 42})
        result = await self.run_workflow(ParentWorkflow())
        assert result == {"rows": 42}
        assert worker.calls[0].env == {"DATA_PATH": "/path/to/data"}
        children = await self.client.list_executions(parent_id=self.execution.id)
        assert len(children) == 1 and children[0].workflow_name == "data_processing"


class TestDynamicParallel(WorkflowTestCase):
    """Section 3: one instance per item of the upstream list."""

    async def test_one_instance_per_task(self):
        tasks = [
            {"id": i, "processor_image": f"img-{i}:1", "env_vars": {"N": str(i)}}
            for i in range(3)
        ]
        mock_agent("analyzer").returns({"tasks": tasks})
        proc = mock_agent("processor-*").returns(lambda call: {"n": call.env["N"]})
        result = await self.run_workflow(DynamicParallelWorkflow())
        assert [r["n"] for r in result] == ["0", "1", "2"]
        assert sorted(c.image for c in proc.calls) == ["img-0:1", "img-1:1", "img-2:1"]


class TestResilient(WorkflowTestCase):
    """Section 7: retries, CONTINUE, FAIL and always_run cleanup."""

    def setUp(self):
        CALLS.clear()

    async def test_continue_then_cleanup(self):
        result = await self.run_workflow(ResilientWorkflow())
        assert CALLS.count("cleanup") == 1
        assert [c for c in CALLS if c.startswith("flaky")] == [f"flaky:{i}" for i in range(1, 6)]
        assert result == {"flaky_step": None, "critical_step": "ok"}

    async def test_fail_still_runs_cleanup(self):
        with pytest.raises(WorkflowFailedError, match="critical failure"):
            await self.run_workflow(ResilientWorkflow(), input={"break_critical": True})
        # the workflow policy (3 attempts) applies to the step without its own
        assert [c for c in CALLS if c.startswith("critical")] == [
            "critical:1", "critical:2", "critical:3"]
        assert CALLS[-1] == "cleanup"


class TestSeedDeterminism(WorkflowTestCase):
    """The seed's data workflow survives a crash at every event of its history."""

    async def test_data_workflow_is_crash_safe(self):
        mock_agent("fetcher").returns({"data_path": "/test/data.json"})
        mock_agent("validator").returns({"is_valid": True})
        mock_agent("processor-*").returns({"processed": True})
        mock_agent("aggregator").returns({"result": "success"})
        config = {"source_url": "test://data", "output_path": "test://output"}
        report = await self.assert_deterministic(lambda: DataWorkflow(config))
        assert report.outcome == "completed"
        assert report.crash_points == list(range(1, report.events))
