"""What starting ``flow`` imports: every command pays for it, so heavy modules a command
does not use are imported where they are used (measured: ``httpx`` and ``rich`` took about
0.15 s of each start)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import agentainer_flow
after_library = sorted(m for m in ("structlog", "httpx", "rich") if m in sys.modules)
from agentainer_flow._cli import _output
_output.configure_logging(0, 30)
import structlog
print(after_library, sorted(m for m in ("httpx", "rich", "pygments") if m in sys.modules),
      structlog.dev.rich is None)
"""


def test_the_library_and_the_cli_start_without_what_they_do_not_use() -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # importing the library imports no logging or HTTP package; the CLI's logging none of
    # rich (structlog's optional traceback formatter) and no HTTP client
    assert done.stdout.strip() == "[] [] True", done.stdout


def test_logging_still_works_after_a_lazy_structlog_import() -> None:
    probe = ("import logging, sys\n"
             "logging.basicConfig(level='INFO', stream=sys.stdout, format='%(message)s')\n"
             "from agentainer_flow.store._logging import get_logger\n"
             "get_logger('agentainer_flow.engine').info('hello', n=1)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello n=1"
