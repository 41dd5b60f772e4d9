"""Running the ``flow`` CLI in real subprocesses, for the acceptance tests of this folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WF = HERE / "workflows_for_cli.py"


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def json(self) -> Any:
        return json.loads(self.out)

    def __str__(self) -> str:  # what a failed assertion shows
        return f"flow {' '.join(self.args)} -> {self.code}\n--- out ---\n{self.out}\n" \
               f"--- err ---\n{self.err}"


class Flow:
    """Runs ``python -m agentainer_flow._cli`` against one store, in a scratch directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.store = f"sqlite:///{root / 'flow.db'}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FLOW_", "COLUMNS"))}
        env.update(FLOW_STORE=self.store, FLOW_HOME=str(root / "home"), PYTHONUNBUFFERED="1")
        self.env = env
        self.outputs: list[Result] = []  # everything printed, for the secrets test

    def _cmd(self, args: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "agentainer_flow._cli", *args]

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(self._cmd(args), cwd=self.root, env={**self.env, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self, args: Sequence[str], proc: subprocess.Popen[str],
               timeout: float = 60) -> Result:
        out, err = proc.communicate(timeout=timeout)
        result = Result(tuple(args), proc.returncode, out, err)
        self.outputs.append(result)
        return result

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return self.finish(args, self.popen(*args, env=env))

    def many(self, *calls: Sequence[str], env: dict[str, str] | None = None) -> list[Result]:
        """Run independent calls concurrently."""
        procs = [(c, self.popen(*c, env=env)) for c in calls]
        return [self.finish(c, p) for c, p in procs]


def id_of(result: Result) -> str:
    """The first execution id (a UUID) in what the command printed on stderr."""
    for word in result.err.split():
        try:
            return str(uuid.UUID(word))
        except ValueError:
            continue
    raise AssertionError(f"no execution id in:\n{result}")
