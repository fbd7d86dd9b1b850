"""Freeze and thaw the file systems mounted from a block device (fsfreeze(8)).

Owns finding where a device is mounted (``/proc/self/mountinfo``, matched by
device number) and the freeze/thaw pair used by ``snapshot create --freeze``
for an application-consistent point in time: the file system flushes its
dirty data and journal and blocks new writes until thawed.

:func:`frozen` thaws in ``finally`` and turns SIGTERM, SIGHUP and SIGINT into
an exception while frozen, so every error and every catchable signal thaws.
SIGKILL cannot be caught: the caller records what it froze so the next
command can thaw it (:func:`thaw`, which ignores a file system that is not
frozen).
"""
from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

from .. import errors
from . import proc


def mounts_of(device: str) -> list[str]:
    """Mount points of the block device (by device number), outermost first."""
    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return []
    want = f"{os.major(rdev)}:{os.minor(rdev)}"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[2] == want:
                out.append(fields[4].replace("\\040", " "))
    return out


def thaw(mountpoint: str) -> None:
    """Thaw; a file system that is not frozen (EINVAL) is left as it is."""
    proc.run(["fsfreeze", "-u", mountpoint], check=False)


def _raise(signum, _frame):
    raise errors.StateError(detail=f"interrupted by signal {signum} while the file system "
                            "was frozen; it has been thawed")


@contextlib.contextmanager
def frozen(mountpoints: list[str]) -> Iterator[None]:
    """Freeze every mount point for the block; always thawed after."""
    handlers = {s: signal.signal(s, _raise) for s in (signal.SIGTERM, signal.SIGHUP)}
    done: list[str] = []
    try:
        for mp in mountpoints:
            proc.run(["fsfreeze", "-f", mp])
            done.append(mp)
        yield
    finally:
        for mp in reversed(done):
            thaw(mp)
        for s, h in handlers.items():
            signal.signal(s, h)
