"""The README tells the truth: its quickstart code and the example it runs both work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_quickstart_code_runs(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "quickstart_readme.py"
    script.write_text(code.group(1))
    env = {k: v for k, v in os.environ.items() if k != "FLOW_STORE"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "section 0 of 3\nsection 1 of 3\nsection 2 of 3" in proc.stdout
    assert (tmp_path / ".flow" / "flow.db").exists()
    assert b"sk-..." not in (tmp_path / ".flow" / "flow.db").read_bytes()


def test_example_workflow_runs_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "QUICKSTART_STORE": f"sqlite:///{tmp_path / 'q.db'}"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "'words': 15" in proc.stdout and "workflow completed" in proc.stdout
