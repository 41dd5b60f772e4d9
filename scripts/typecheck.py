"""Run mypy on the package as it is imported.

The three layers live in folders (``sdk/``, ``engine/``, ``store/``) that setuptools maps to
``agentainer_flow``, ``agentainer_flow.engine`` and ``agentainer_flow.store``. mypy cannot
follow that mapping, so this builds the import layout as a tree of symlinks under
``.mypy_tree/`` and checks that.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"


def build() -> Path:
    if TREE.exists():
        shutil.rmtree(TREE)
    pkg = TREE / "agentainer_flow"
    pkg.mkdir(parents=True)
    for item in (ROOT / "sdk").iterdir():
        if item.suffix in (".py", ".typed"):
            (pkg / item.name).symlink_to(item)
        elif item.is_dir() and (item / "__init__.py").exists():  # sub-packages
            (pkg / item.name).symlink_to(item, target_is_directory=True)
    (pkg / "engine").symlink_to(ROOT / "engine", target_is_directory=True)
    (pkg / "store").symlink_to(ROOT / "store", target_is_directory=True)
    return pkg


def main() -> int:
    pkg = build()
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           str(pkg), *sys.argv[1:]]
    return subprocess.call(cmd, cwd=TREE)


if __name__ == "__main__":
    sys.exit(main())
