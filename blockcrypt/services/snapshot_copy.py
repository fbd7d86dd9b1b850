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

:func:`copy_disk` chooses between that and the detached copy, whose instant
is fixed under a shared lock of the container and whose data is copied after
(:mod:`.snapshot_detached`).  The caller
(:class:`~blockcrypt.services.snapshots.LifecycleService`) owns the staged
file's name, its publication and its removal on failure.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from .. import errors
from ..storage import catalog, fastcopy
from ..storage.chunkcopy import handoff_socket
from ..storage.home import create_private_file
from ..system import fsfreeze, quiesce
from ..system.cowclient import CowSession
from ..testing.crashpoints import crashpoint
from . import snapshot_detached
from .runtime import COW_SOCKET

COPY_BEFORE_WRITE = snapshot_detached.COPY_BEFORE_WRITE
# How long a command waits for a concurrent one to settle: an attach in progress
# (it holds the container before its row says 'attached'), or a snapshot create
# that committed its row but has not yet renamed its file into place.
SETTLE_TIMEOUT_S = 30.0


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


def copy_disk(store, conn: sqlite3.Connection, disk: sqlite3.Row, src: Path, dst: Path,
              marker, freeze: bool) -> tuple[str, bool, int]:
    """Copy a disk's container to dst, consistently; returns (method,
    quiesced, bytes copied before write).

    Detached (or attached read-only): the instant fixed under a shared lock,
    which a read-write server cannot take meanwhile, the data copied after
    (:mod:`.snapshot_detached`).  Attached read-write: with I/O paused
    through the pause filter's control socket.
    """
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        with contextlib.ExitStack() as stack:
            try:
                lock = stack.enter_context(store.locked(src, exclusive=False))
            except errors.NotFound:
                if catalog.get_disk_by_id(conn, disk["id"]) is None:
                    raise errors.DiskNotFound(name=disk["name"]) from None   # deleted
                raise errors.NotFound(what="container file", name=str(src)) from None
            # copy from this handle: the very container that was locked; not
            # held means a read-write server holds it
            att = catalog.get_attachment(conn, disk["id"])
            if lock.held and (att is None or att["state"] == "attached"):
                # detached, or attached read-only: nothing writes meanwhile
                if freeze:
                    raise errors.StateError(
                        detail=f"--freeze needs disk {disk['name']!r} attached "
                               "read-write with a mounted file system; it is not; "
                               "snapshot it without --freeze")
                fixed = snapshot_detached.fix_instant(
                    lock, dst, handoff_socket(str(marker.dir), disk["id"]),
                    f"disk {disk['name']!r}")
                if fixed is None:
                    return store.clone(lock, dst), False, 0
                if not isinstance(fixed, snapshot_detached.BackgroundCopy):
                    return fixed, False, 0
                break           # the instant is fixed: copy with the lock released
            # (an attach that has claimed the disk gets the file first: back off)
            if not lock.held and att is not None and att["state"] == "attached" \
                    and att["control_socket"]:
                mounts = _mounts_to_freeze(disk, att) if freeze else []
                marker.note(frozen=mounts, control_socket=att["control_socket"])
                method, cow_bytes = copy_attached(
                    lock.fd, att["control_socket"], dst, f"disk {disk['name']!r}",
                    _progress(marker), mounts)
                return method, True, cow_bytes
        if time.monotonic() > deadline:
            raise errors.StateError(detail=f"disk {disk['name']!r} is in use but not "
                                    "attached through blockcrypt (or still being "
                                    "attached); retry when `blockcrypt disk show "
                                    f"{disk['name']}` says attached")
        time.sleep(0.2)
    method, cow_bytes = fixed.run(_progress(marker))
    return method, False, cow_bytes


def _progress(marker) -> Callable[[int, int], None]:
    """Progress of a copy to the marker (snapshot show) and the CLI's line, if any."""
    display = fastcopy.progress_fn()

    def progress(done_bytes: int, total_bytes: int) -> None:
        marker.progress(done_bytes, total_bytes)
        display(done_bytes, total_bytes)
    return progress


def _mounts_to_freeze(disk: sqlite3.Row, att: sqlite3.Row) -> list[str]:
    mounts = fsfreeze.mounts_of(att["device"]) if att["device"] else []
    if not mounts:
        raise errors.StateError(detail=f"--freeze: no file system of disk "
                                f"{disk['name']!r} is mounted (device "
                                f"{att['device'] or 'none: served over the network'}); "
                                "snapshot it without --freeze")
    return mounts
