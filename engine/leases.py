"""Lease holders: who runs an execution, and whether that holder is still alive.

Every process that runs an execution holds its lease (owner, expiry, fencing token; see
``EventStore.acquire``). An owner id names its process::

    <host>:<pid>:<start>:<boot>:<random>

``start`` is the process start time in clock ticks (``/proc/<pid>/stat``) and ``boot`` a
prefix of the kernel's boot id, so a process on this machine can tell that a holder died
(SIGKILL, reboot) without waiting for its lease to expire, and never mistakes a reused pid
for it. Holders elsewhere, or with ids of another shape (``flow worker --id NAME``), are
only known dead once their lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid

from .runtimes._supervisor import boot_id, proc_stat

__all__ = ["DEFAULT_LEASE_SECONDS", "holder_is_dead", "lease_seconds_from_env", "make_owner_id",
           "seconds_from_env"]

#: how long a lease lasts without renewal; renewed every third of it
DEFAULT_LEASE_SECONDS = 30.0
_ENV = "FLOW_LEASE_SECONDS"


def seconds_from_env(name: str, default: float) -> float:
    """``$name`` as a positive, finite number of seconds if set (for tests and tuning), else
    ``default``; a value that is not one raises ``ValueError`` naming the variable."""
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def lease_seconds_from_env() -> float:
    """``$FLOW_LEASE_SECONDS`` if set, else the default."""
    return seconds_from_env(_ENV, DEFAULT_LEASE_SECONDS)


def _host() -> str:
    return socket.gethostname().replace(":", "_") or "localhost"


def _me() -> tuple[str, str]:
    stat = proc_stat(os.getpid())
    return (stat[1] if stat else "0"), boot_id()[:8]


def make_owner_id(name: str | None = None) -> str:
    """A lease owner id for this process (``name`` replaces the random part)."""
    start, boot = _me()
    suffix = (name or uuid.uuid4().hex[:8]).replace(":", "_")
    return f"{_host()}:{os.getpid()}:{start}:{boot or '-'}:{suffix}"


def holder_is_dead(owner: str) -> bool:
    """Whether ``owner`` is a process of this machine that no longer runs.

    ``False`` when unsure (another machine, an id of another shape): the lease's expiry
    decides then.
    """
    parts = owner.split(":")
    if len(parts) != 5 or parts[0] != _host():
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    start, boot = parts[2], parts[3]
    my_start, my_boot = _me()
    if boot != "-" and my_boot and boot != my_boot:
        return True  # the machine rebooted since
    if pid == os.getpid():
        return start != my_start
    stat = proc_stat(pid)
    if stat is None:
        return os.path.isdir("/proc/self")  # no such process (where /proc can tell)
    state, started = stat
    return state in ("Z", "X", "x") or started != start
