"""The point-in-time copy of an attached (served, read-write) disk.

Owns the step of ``snapshot create`` that needs the server: I/O is paused
through nbdkit's pause filter (:mod:`blockcrypt.system.quiesce`) only long
enough to fix the point in time, never for the copy of the data:

- reflink (XFS, btrfs): ``FICLONE`` under the pause (milliseconds);
- otherwise copy-before-write: under the pause the snapshot file is handed to
  the serving plugin (:mod:`blockcrypt.system.cowclient`, server side
  :mod:`blockcrypt.nbd.cow`), which from then on copies a range's old
  ciphertext into it before the first write that changes it; I/O resumes and
  the plugin copies the rest in the background while this process waits;
- a server started without the copy-before-write socket (attached by an
  older blockcrypt): the whole sparse copy under the pause, as before.

The caller (:class:`~blockcrypt.services.snapshots.LifecycleService`) owns the
staged file's name, its publication and its removal on failure.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..storage import fastcopy
from ..storage.home import create_private_file
from ..system import fsfreeze, quiesce
from ..system.cowclient import CowSession
from ..testing.crashpoints import crashpoint
from .runtime import COW_SOCKET

COPY_BEFORE_WRITE = "copy-before-write"


def copy_attached(src_fd: int, control_socket: str, dst: Path, what: str,
                  progress: Callable[[int, int], None] | None = None,
                  freeze: list[str] = ()) -> tuple[str, int]:
    """Copy the served container open as src_fd to the new file dst; returns the
    method (reflink, copy-before-write or sparse) and how many bytes writes
    copied into the snapshot before changing them.  ``freeze``: mount points
    frozen (fsfreeze) around the point-in-time step only."""
    session = CowSession.connect(Path(control_socket).with_name(COW_SOCKET), what)
    if session is None:
        with fsfreeze.frozen(list(freeze)), quiesce.paused(control_socket):
            crashpoint("snapshot.paused")
            return fastcopy.copy_to_new(src_fd, dst), 0
    with session:
        dst_fd = create_private_file(dst)
        try:
            with fsfreeze.frozen(list(freeze)), quiesce.paused(control_socket):
                crashpoint("snapshot.paused")
                if fastcopy.try_reflink(src_fd, dst_fd):
                    os.fsync(dst_fd)
                    return fastcopy.REFLINK, 0
                session.start(dst_fd)
            crashpoint("snapshot.copying")
            return COPY_BEFORE_WRITE, session.wait(progress)
        finally:
            os.close(dst_fd)
