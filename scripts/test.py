#!/usr/bin/env python
"""The whole test suite as CI runs it, in two parts.

1. Every test but the Postgres outage tests, on two xdist workers: most of the suite waits
   on subprocesses, containers, servers and timers, so two tests at a time take about half
   the time (measured on the 2-core CI machine: 16m30s in one process, 8m12s in two).
2. The outage tests (``tests/store/test_outages.py``) alone: they restart the Postgres
   server and cut its connections, which would fail whatever runs beside them.

Options given (``-x``, ``-q``, ``-k EXPR``...) go to both parts. ``python -m pytest`` still
runs everything in one process.
"""

from __future__ import annotations

import subprocess
import sys

#: tests that take the shared Postgres server down: never beside others
ALONE = "tests/store/test_outages.py"
#: "no tests collected" (e.g. a ``-k`` that matches nothing in one part)
NO_TESTS = 5


def main(argv: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-p", "no:benchmark"]  # a plugin xdist disables
    codes = [
        subprocess.call([*pytest, "-n", "2", f"--ignore={ALONE}", *argv]),
        subprocess.call([*pytest, ALONE, *argv]),
    ]
    failed = [code for code in codes if code not in (0, NO_TESTS)]
    if failed:
        return failed[0]
    return NO_TESTS if all(code == NO_TESTS for code in codes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
