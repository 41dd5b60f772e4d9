"""``flow status``/``history``/``list``/``logs`` show a stored history without the workflow's
code: a result or state of a type this process cannot import (a dataclass of the workflow's
own file) is shown as its data, where rebuilding it would fail."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agentainer_flow.engine import values
from agentainer_flow.engine.errors import SerializationError

from .flowcli import Flow, id_of

CODE = '''
import dataclasses
from agentainer_flow import Context, step, workflow

@dataclasses.dataclass
class Report:
    words: int
    title: str

@workflow(name="{name}")
class Reports:
    @step()
    async def make(self, ctx: Context) -> Report:
        ctx.state["last"] = Report(1, "state")
        return Report(3, "hello")
'''


def test_read_commands_show_values_whose_type_is_not_importable(tmp_path: Path) -> None:
    flow = Flow(tmp_path)
    module = f"reports_{uuid.uuid4().hex[:8]}"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{module}.py").write_text(CODE.format(name=module))
    ran = flow("run", str(code / f"{module}.py"))
    assert ran.code == 0, ran
    eid = id_of(ran)
    status = flow("status", eid, "--json")  # from a directory where the module is not
    assert status.code == 0, status
    assert status.json()["result"] == {"__type__": f"{module}:Report", "words": 3,
                                       "title": "hello"}
    for args in (("history", eid), ("history", eid, "--events"), ("history", eid, "--json"),
                 ("status", eid), ("list",), ("logs", eid)):
        shown = flow(*args)
        assert shown.code == 0, shown
    assert "hello" in flow("status", eid).out


def test_load_names_what_cannot_be_rebuilt_and_displaying_shows_it() -> None:
    unknown = {"__flow__": "dataclass", "type": "nowhere_module_x:Thing",
               "data": {"a": 1, "b": [1, 2]}}
    with pytest.raises(SerializationError, match="nowhere_module_x:Thing"):
        values.load(unknown)
    damaged = {"__flow__": "int", "v": "xyz"}
    with pytest.raises(SerializationError, match="cannot be read back"):
        values.load(damaged)
    with values.displaying():
        shown = values.load({"k": unknown, "n": damaged})
    assert values.to_jsonable(shown["k"]) == {"__type__": "nowhere_module_x:Thing", "a": 1,
                                              "b": [1, 2]}
    assert "nowhere_module_x:Thing(a=1" in repr(shown["k"])
    assert shown["n"].type_name == "<unreadable int>"
    with pytest.raises(SerializationError):  # only within it
        values.load(unknown)
