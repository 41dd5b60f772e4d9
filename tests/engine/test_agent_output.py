"""The agent output protocol: ``$FLOW_OUTPUT``, else the last JSON line of stdout; an output
too large to store, or JSON cut short, is a clear error naming the agent, step and size, on
every runtime (never a silent ``{}``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import (
    AgentOutputError,
    Context,
    WorkflowClient,
    WorkflowFailedError,
    step,
    workflow,
)
from agentainer_flow.engine.runtimes.base import (
    DEFAULT_MAX_OUTPUT_BYTES,
    AgentOutputProblem,
    max_output_bytes,
    read_output,
)

# -- the protocol, as a function ----------------------------------------------------------


def test_file_wins_over_stdout() -> None:
    assert read_output(b'{"from": "file"}', b'{"from": "stdout"}\n') == {"from": "file"}


def test_empty_file_falls_back_to_stdout() -> None:
    assert read_output(b"  \n", b'log line\n{"n": 1}\n') == {"n": 1}


def test_last_json_line_of_stdout_and_earlier_lines() -> None:
    assert read_output(None, b'{"n": 1}\n{"n": 2}\n\n') == {"n": 2}
    assert read_output(None, b'{"n": 1}\ndone\n') == {"n": 1}  # a log line after it
    assert read_output(None, b"{progress} 40%\n") == {}  # braces, but not JSON: a log line
    assert read_output(None, b"") == {}
    assert read_output(None, b"[1, 2]\n") == {}


@pytest.mark.parametrize("line", [b'{"data": "abc', b'{"a": 1, "b"', b'{ "a": [1, 2}'])
def test_a_last_line_cut_short_is_an_error(line: bytes) -> None:
    with pytest.raises(AgentOutputProblem, match=rf"last line of its stdout \({len(line)} "
                       r"bytes\) starts like a JSON object but does not parse"):
        read_output(None, b'{"ok": 1}\n' + line + b"\n")


def test_a_file_that_is_not_an_object_or_not_json_is_an_error() -> None:
    with pytest.raises(AgentOutputProblem, match="holds a JSON list, not an object"):
        read_output(b"[1]", b"")
    with pytest.raises(AgentOutputProblem, match=r"\(\$FLOW_OUTPUT, 7 bytes\) is not valid"):
        read_output(b'{"a": 1', b"")


def test_too_large_names_the_size_and_the_limit() -> None:
    big = json.dumps({"a": "x" * 100}).encode()
    with pytest.raises(AgentOutputProblem, match=rf"output file \(\$FLOW_OUTPUT\) is "
                       rf"{len(big)} bytes, over the limit of 50 bytes"):
        read_output(big, b"", limit=50)
    with pytest.raises(AgentOutputProblem, match=rf"last line of its stdout is {len(big)} "
                       "bytes, over the limit of 50 bytes"):
        read_output(None, big + b"\n", limit=50)
    with pytest.raises(AgentOutputProblem, match="is 1000000 bytes"):
        read_output(None, b"", output_file_size=1_000_000, limit=50)


def test_a_line_longer_than_what_was_read_is_sized_by_the_cut() -> None:
    # the runtime read only the end of a 10 MB line: first_line_cut says how much precedes
    with pytest.raises(AgentOutputProblem, match="is 10000000 bytes"):
        read_output(None, b"x" * 1000 + b'"}\n', first_line_cut=10_000_000 - 1002,
                    limit=4096)
    # a long non-JSON log line that did not fit: no output, no error
    assert read_output(None, b"x" * 1000 + b"\n", first_line_cut=10_000_000) == {}


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert max_output_bytes() == DEFAULT_MAX_OUTPUT_BYTES
    monkeypatch.setenv("FLOW_MAX_OUTPUT_BYTES", "1000")
    assert max_output_bytes() == 1000
    monkeypatch.setenv("FLOW_MAX_OUTPUT_BYTES", "lots")
    with pytest.raises(ValueError, match="FLOW_MAX_OUTPUT_BYTES must be a positive number"):
        max_output_bytes()


# -- on real runtimes ---------------------------------------------------------------------

TEN_MB_LINE = "printf '{\"a\": \"'; head -c 10000000 /dev/zero | tr '\\0' x; printf '\"}\\n'"
CUT_LINE = "echo '{\"ok\": 1}'; printf '{\"data\": \"'; head -c 5000 /dev/zero | tr '\\0' y"
BIG_FILE = "head -c 5000000 /dev/zero | tr '\\0' z > \"$FLOW_OUTPUT\""
FINE = "echo 'working'; echo '{\"n\": 42}'; echo 'bye' >&2"


@workflow(name="agent_output_probe")
class OutputProbe:
    def __init__(self, image: str, script: str) -> None:
        self.image = image
        self.script = script

    @step(name="produce")
    async def produce(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(name="producer", image=self.image,
                                       command=["sh", "-c", self.script])
        try:
            return {"output": (await agent.wait_for_completion()).output}
        except AgentOutputError as exc:
            return {"error": str(exc), "type": type(exc).__name__}


async def _run(tmp_path: Path, runtime_image: tuple[str, str], script: str) -> dict[str, Any]:
    runtime, image = runtime_image
    async with WorkflowClient(store=f"sqlite:///{tmp_path}/flow.db", runtime=runtime) as client:
        execution = await client.run_workflow(workflow=OutputProbe(image, script))
        result: dict[str, Any] = await execution.get_result()
        history = await client.get_history(execution.id)
    failed = [e for e in history if e.type == "agent_failed"]
    if "error" in result:
        assert failed and failed[0].details.get("error_type") == "AgentOutputError", failed
    return result


async def test_a_10mb_json_line_is_an_error_naming_step_and_size(
        tmp_path: Path, runtime_image: tuple[str, str]) -> None:
    result = await _run(tmp_path, runtime_image, TEN_MB_LINE)
    assert result["type"] == "AgentOutputError"
    assert "agent 'producer'" in result["error"] and "in step 'produce'" in result["error"]
    assert "is 10000009 bytes, over the limit of 4194304 bytes" in result["error"]


async def test_a_cut_json_line_is_an_error(tmp_path: Path,
                                           runtime_image: tuple[str, str]) -> None:
    result = await _run(tmp_path, runtime_image, CUT_LINE)
    assert result["type"] == "AgentOutputError"
    assert "(5010 bytes) starts like a JSON object but does not parse" in result["error"]
    assert "in step 'produce'" in result["error"]


async def test_an_output_file_over_the_limit_is_an_error(
        tmp_path: Path, runtime_image: tuple[str, str]) -> None:
    result = await _run(tmp_path, runtime_image, BIG_FILE)
    assert "output file ($FLOW_OUTPUT) is 5000000 bytes, over the limit" in result["error"]


async def test_the_last_json_line_is_the_output(tmp_path: Path,
                                                runtime_image: tuple[str, str]) -> None:
    assert await _run(tmp_path, runtime_image, FINE) == {"output": {"n": 42}}


# -- a launch that cannot succeed is not retried --------------------------------------------


@workflow(name="missing_image_probe", max_retries=3)
class MissingImage:
    def __init__(self, image: str, command: list[str] | None) -> None:
        self.image = image
        self.command = command

    @step(name="deploy")
    async def deploy(self, ctx: Context) -> dict[str, Any]:
        agent = await ctx.deploy_agent(name="ghost", image=self.image, command=self.command)
        return (await agent.wait_for_completion()).output


@pytest.mark.parametrize("runtime", ["process", pytest.param("docker", marks=pytest.mark.docker)])
async def test_a_missing_image_fails_once_naming_the_image(
        tmp_path: Path, runtime: str, request: pytest.FixtureRequest) -> None:
    if runtime == "docker":
        request.getfixturevalue("docker_engine")
    image = "flow-test/no-such-image:0"  # not on the engine; no command mapped for it
    async with WorkflowClient(store=f"sqlite:///{tmp_path}/flow.db", runtime=runtime) as client:
        execution = await client.run_workflow(workflow=MissingImage(image, None))
        with pytest.raises(WorkflowFailedError) as failed:
            await execution.get_result()
        history = await client.get_history(execution.id)
    assert image in str(failed.value) and "AgentConfigurationError" == failed.value.error_type
    attempts = [e for e in history if e.type == "step_started"]
    assert len(attempts) == 1, "a configuration error must not be retried"


def test_output_nested_too_deeply_or_unreadable_is_refused_saying_why() -> None:
    """JSON nested deeper than Python's reader goes (which raised a bare RecursionError)
    and a number it will not convert are refused with what is wrong, not 'cut short'."""
    deep = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    for file, stdout in ((deep, b""), (None, deep + b"\n")):
        with pytest.raises(AgentOutputProblem, match="nested too deeply"):
            read_output(file, stdout, limit=10**7)
    assert read_output(None, deep + b"\n" + b"done\n", limit=10**7) == {}  # not its output
    with pytest.raises(AgentOutputProblem, match="cannot be read as JSON: Exceeds") as big:
        read_output(b'{"n": ' + b"9" * 5000 + b"}", b"", limit=10**7)
    assert "cut short" not in str(big.value)
    with pytest.raises(AgentOutputProblem, match="was it cut short"):
        read_output(b'{"n": [1, 2', b"")
