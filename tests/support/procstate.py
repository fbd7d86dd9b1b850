"""A process's scheduler state, for tests that stop (SIGSTOP) or kill processes
at chosen points and wait for that to have happened."""
from __future__ import annotations


def state(pid: int) -> str:
    """The state letter of /proc/PID/stat (``R``, ``S``, ``T`` stopped, ``Z`` zombie),
    or ``"gone"`` once the process no longer exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        # gone before the open, or between the open and the read (ESRCH)
        return "gone"


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (it reached a SIGSTOP)."""
    return state(pid) == "T"


def dead(pid: int) -> bool:
    """Whether the process has exited (a zombie not yet reaped counts)."""
    return state(pid) in ("Z", "gone")
