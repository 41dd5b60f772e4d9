"""The pieces without a server: which client ``WorkflowClient(...)`` is, the value trees a
server accepts, and the Server-Sent Events format both sides speak."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from collections.abc import AsyncIterator

import pytest

from agentainer_flow import ConfigurationError, SerializationError, WorkflowClient
from agentainer_flow._remote import RemoteWorkflowClient, _messages, remote_client_for
from agentainer_flow._server import sse
from agentainer_flow._server.convert import load_value, plain
from agentainer_flow.engine import values


@pytest.fixture(autouse=True)
def _no_server_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGENTAINER_API_URL", "AGENTAINER_API_TOKEN", "FLOW_STORE"):
        monkeypatch.delenv(name, raising=False)


async def test_api_url_makes_a_remote_client_and_a_store_the_embedded_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    remote = WorkflowClient(api_url="http://localhost:8081", api_token="afl_t")
    assert isinstance(remote, RemoteWorkflowClient)
    assert remote.api_url == "http://localhost:8081" and "afl_t" not in repr(remote)
    monkeypatch.setenv("AGENTAINER_API_URL", "http://flow.internal:8081/")
    monkeypatch.setenv("AGENTAINER_API_TOKEN", "afl_from_env")
    from_env = WorkflowClient()
    assert isinstance(from_env, RemoteWorkflowClient)
    assert from_env.api_url == "http://flow.internal:8081"
    embedded = WorkflowClient("memory://")  # a store given: the engine runs here
    assert type(embedded) is WorkflowClient
    await embedded.close()
    with pytest.raises(ConfigurationError, match="not both"):
        WorkflowClient("memory://", api_url="http://localhost:8081")


def test_what_a_remote_client_needs_is_asked_for_clearly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert remote_client_for(None, None, None) is None
    with pytest.raises(ConfigurationError, match="no server URL"):
        RemoteWorkflowClient(api_token="afl_x")
    with pytest.raises(ConfigurationError, match=r"no API token .*AGENTAINER_API_TOKEN"):
        RemoteWorkflowClient("http://localhost:8081")
    with pytest.raises(ConfigurationError, match="http:// or https://"):
        RemoteWorkflowClient("localhost:8081", "afl_x")


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_the_server_rebuilds_only_types_it_has_loaded() -> None:
    tree = values.dump({"p": Point(1, 2), "when": dt.date(2024, 5, 1), "pair": (1, "a")})
    assert load_value(tree, "input") == {"p": Point(1, 2), "when": dt.date(2024, 5, 1),
                                         "pair": (1, "a")}
    assert plain(tree) == {"p": {"x": 1, "y": 2}, "when": "2024-05-01", "pair": [1, "a"]}
    # a type of a module not imported here is refused, and not imported to find out
    absent = "agentainer_flow_test_not_imported_module"
    with pytest.raises(SerializationError, match="has not loaded"):
        load_value({"__flow__": "dataclass", "type": f"{absent}:Evil", "data": {}}, "input")
    assert absent not in sys.modules
    # a loaded callable that is not of the kind named is refused too
    for kind in ("dataclass", "pydantic", "struct", "enum"):
        with pytest.raises(SerializationError, match="has not loaded"):
            load_value({"__flow__": kind, "type": "subprocess:Popen", "data": {"args": "x"}},
                       "input")
    with pytest.raises(SerializationError, match="not a value tree"):
        load_value({"__flow__": "tuple"}, "input")


async def _lines(*chunks: bytes) -> AsyncIterator[str]:
    for line in b"".join(chunks).decode().split("\n"):
        yield line


async def test_events_are_framed_and_read_back() -> None:
    framed = [sse.message('{"a": 1}', id="3"), b": keep alive\n\n",
              sse.message("line one\nline two", id="4"), sse.message("{}", event="end")]
    got = [m async for m in _messages(_lines(*framed))]
    assert got == [("message", "3", '{"a": 1}'), ("message", "4", "line one\nline two"),
                   ("end", None, "{}")]


def test_positions_of_the_stream_across_executions() -> None:
    assert sse.parse_cursor("1718000000.123456:exec:with:colons:12") == (
        1718000000.123456, "exec:with:colons", 12)
    assert sse.parse_cursor(None) is None
    with pytest.raises(ValueError, match="not a position"):
        sse.parse_cursor("12")
    assert sse.parse_seq("17") == 17 and sse.parse_seq("") == 0
    with pytest.raises(ValueError, match="not an event seq"):
        sse.parse_seq("a:1")
