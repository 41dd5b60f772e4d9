"""Crash points for tests: ``reach(point)`` SIGKILLs this process when ``$FLOW_TEST_KILL_AT``
names ``point``, so a test can kill an engine between two exact steps of a protocol.

The variable is read once, at import; otherwise ``reach`` costs one comparison.
"""

from __future__ import annotations

import os
import signal

__all__ = ["reach"]

_KILL_AT = os.environ.get("FLOW_TEST_KILL_AT") or None


def reach(point: str) -> None:
    """Die here, like a crash (SIGKILL: no cleanup runs), if the test asked for ``point``."""
    if _KILL_AT is not None and point == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
