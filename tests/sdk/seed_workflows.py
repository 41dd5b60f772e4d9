"""The workflows of the seed design, as written there (sections 1, 3 and 7)."""

from typing import Any, Dict, List  # noqa: UP035 - the seed's spelling

from agentainer_flow import Context, ErrorHandler, RetryPolicy, step, workflow


@workflow(
    name="my_workflow",
    description="Process data through multiple stages",
    max_retries=3,
    timeout="1h"
)
class DataWorkflow:
    """A complete data processing workflow."""

    def __init__(self, config: Dict[str, Any]):
        self.config = config

    @step(name="fetch", timeout="10m")
    async def fetch_data(self, ctx: Context) -> Dict[str, Any]:
        """Fetch data from external source."""
        agent = await ctx.deploy_agent(
            name="fetcher",
            image="my-fetcher:latest",
            env={
                "SOURCE_URL": self.config["source_url"],
                "API_KEY": ctx.secrets["api_key"]
            }
        )
        result = await agent.wait_for_completion()

        # Store in workflow state
        ctx.state["raw_data"] = result.output["data_path"]
        return result.output

    @step(name="validate", depends_on=["fetch"])
    async def validate_data(self, ctx: Context, fetch_result: Dict) -> bool:
        """Validate the fetched data."""
        agent = await ctx.deploy_agent(
            name="validator",
            image="data-validator:latest",
            env={"DATA_PATH": fetch_result["data_path"]}
        )
        result = await agent.wait_for_completion()
        return result.output["is_valid"]

    @step(
        name="process",
        depends_on=["validate"],
        parallel=True,
        max_workers=5
    )
    async def process_chunk(self, ctx: Context, chunk_id: int) -> Dict:
        """Process a single chunk of data in parallel."""
        agent = await ctx.deploy_agent(
            name=f"processor-{chunk_id}",
            image="processor:latest",
            env={
                "DATA_PATH": ctx.state["raw_data"],
                "CHUNK_ID": str(chunk_id),
                "TOTAL_CHUNKS": str(ctx.parallel_context.total)
            }
        )
        return await agent.wait_for_completion()

    @step(
        name="aggregate",
        depends_on=["process"],
        reduce=True  # Indicates this step aggregates parallel results
    )
    async def aggregate_results(
        self,
        ctx: Context,
        process_results: List[Dict]
    ) -> Dict:
        """Aggregate results from parallel processing."""
        # Store intermediate results
        ctx.state["processed_chunks"] = len(process_results)

        agent = await ctx.deploy_agent(
            name="aggregator",
            image="aggregator:latest",
            env={
                "CHUNK_RESULTS": ctx.json(process_results),
                "OUTPUT_PATH": self.config["output_path"]
            }
        )
        return await agent.wait_for_completion()


@workflow(name="conditional_workflow")
class ConditionalWorkflow:

    @step(name="check_condition")
    async def check_condition(self, ctx: Context) -> str:
        # Some logic to determine path
        if ctx.input["data_size"] > 1000:
            return "large"
        else:
            return "small"

    @step(
        name="process_large",
        depends_on=["check_condition"],
        when=lambda result: result == "large"
    )
    async def process_large_data(self, ctx: Context):
        # Process large dataset
        pass

    @step(
        name="process_small",
        depends_on=["check_condition"],
        when=lambda result: result == "small"
    )
    async def process_small_data(self, ctx: Context):
        # Process small dataset
        pass


@workflow(name="data_processing")
class DataProcessingWorkflow:
    def __init__(self, params: Dict):
        self.params = params

    @step(name="work")
    async def work(self, ctx: Context):
        agent = await ctx.deploy_agent(name="sub-worker", image="worker:latest",
                                       env={"DATA_PATH": self.params["data_path"]})
        return (await agent.wait_for_completion()).output


@workflow(name="parent_workflow")
class ParentWorkflow:

    @step(name="prepare")
    async def prepare_data(self, ctx: Context):
        # Prepare data
        return {"data_path": "/path/to/data"}

    @step(name="run_sub_workflow", depends_on=["prepare"])
    async def run_sub_workflow(self, ctx: Context, prepare_result: Dict):
        # Run another workflow as a step
        sub_wf = DataProcessingWorkflow(prepare_result)
        result = await ctx.run_workflow(sub_wf)
        return result


@workflow(name="dynamic_parallel")
class DynamicParallelWorkflow:

    @step(name="determine_tasks")
    async def determine_tasks(self, ctx: Context) -> List[Dict]:
        # Dynamically determine what to process
        agent = await ctx.deploy_agent(
            name="analyzer",
            image="analyzer:latest"
        )
        result = await agent.wait_for_completion()
        return result.output["tasks"]  # List of task definitions

    @step(
        name="process_task",
        depends_on=["determine_tasks"],
        parallel=True,
        dynamic=True  # Indicates dynamic parallelism
    )
    async def process_task(self, ctx: Context, task: Dict):
        # Process each task from the previous step
        agent = await ctx.deploy_agent(
            name=f"processor-{task['id']}",
            image=task["processor_image"],
            env=task["env_vars"]
        )
        return await agent.wait_for_completion()


CALLS: List[str] = []


@workflow(
    name="resilient_workflow",
    retry_policy=RetryPolicy(
        max_attempts=3,
        backoff="exponential",
        max_delay="5m"
    )
)
class ResilientWorkflow:

    @step(
        name="flaky_step",
        retry_policy=RetryPolicy(max_attempts=5),
        error_handler=ErrorHandler.CONTINUE  # Continue workflow on failure
    )
    async def flaky_operation(self, ctx: Context):
        # Operation that might fail
        CALLS.append(f"flaky:{ctx.attempt}")
        raise RuntimeError("flaky service unavailable")

    @step(
        name="critical_step",
        error_handler=ErrorHandler.FAIL  # Fail workflow on error
    )
    async def critical_operation(self, ctx: Context):
        # Critical operation
        CALLS.append(f"critical:{ctx.attempt}")
        if ctx.input and ctx.input.get("break_critical"):
            raise ValueError("critical failure")
        return "ok"

    @step(
        name="cleanup",
        always_run=True  # Run even if previous steps failed
    )
    async def cleanup(self, ctx: Context):
        # Cleanup resources
        CALLS.append("cleanup")
