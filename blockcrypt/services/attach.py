"""Attachments: the claim, attach, detach and the cleaning of stale attachments.

Owns the catalog's ``attachments`` rows and the rules around them; the processes
and devices behind a row are started and torn down by
:mod:`blockcrypt.services.runtime`, disks are looked up through the
:class:`~blockcrypt.services.disks.DiskService` this serves.

Attach (``disk attach``)
------------------------
Checks run before anything starts: the disk exists, it is not in use, its CMK
is usable (a disabled, pending-deletion or missing key refuses here).  Then the
attachment is *claimed*: a row in state ``attaching`` inserted inside ``BEGIN
IMMEDIATE`` (the table's primary key makes it one per disk, so of many
concurrent attaches exactly one proceeds, and the others fail before paying for
the passphrase KDF).  Then the DK is unwrapped and:

- nbdkit in the background: ``--foreground`` in its own session under a
  supervisor shell (see :func:`blockcrypt.system.commands.supervised_argv`), so
  it does not fork and the process holding the key is the one that mlocked it,
  with the pause filter (snapshots quiesce I/O through its control socket),
  its socket, control socket, pid file and log in ``<home>/run/<name>/`` (0700);
  the DK goes through a pipe whose read end nbdkit inherits (``keyfd=N``);
- a block device: ``nbd-client -unix SOCK /dev/nbdN`` when the kernel has the
  nbd driver, else nbdfuse exposing the export as ``run/<name>/fuse/disk`` and
  ``losetup --sector-size`` on that file.

The row then moves to ``attached``.  Any failure tears down what was started
and removes the claim.  ``disk serve`` claims the same way (method ``serve``,
:mod:`blockcrypt.services.serve`).

Detach refuses while the device or a partition of it is mounted (naming the
mount point), has holders (dm, md) or is claimed exclusively; otherwise it marks
the row ``detaching``, flushes the device, disconnects it (losetup -d /
nbd-client -d), unmounts the fuse file, stops nbdkit (SIGTERM, then SIGKILL
after 10 s), removes the run directory and deletes the row.

Stale attachments
-----------------
An ``attached`` row is stale when its nbdkit (or its nbdfuse) is gone: no live
process with that pid whose argv names the run directory (a reused pid fails
that test).  An ``attaching``/``detaching`` row is stale when the CLI process
that owns it (pid and start time) is gone.  ``disk list/show/attach/detach``
clean stale rows: under the write lock they stop any leftover processes (found
by the run directory in their argv), detach loop devices backed by the fuse
file, unmount the fuse mount, remove the run directory and delete the row.
A stale row whose device still carries a mounted file system (the server died
under the mount) is kept instead: ``disk attach`` refuses with
:class:`~blockcrypt.errors.StaleMount`, naming the mount point and the ``umount``
to run (a second device serving the same disk under a live mount would let two
file systems write it), unless ``--force``; ``disk detach`` refuses as for any
mounted device.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..constants import utc_timestamp
from ..storage import catalog, db
from ..storage.home import ensure_private_dir
from ..storage.rbd_image import held_error
from ..system import devices, proc, quiesce
from ..testing.crashpoints import crashpoint
from . import runtime
from .boundary import record
from .runtime import ATTACH_LOOP, ATTACH_NBD, CONTROL_SOCKET, NBD_SOCKET, SERVE

if TYPE_CHECKING:
    from .disks import DiskService

LOCK_WAIT_TIMEOUT_S = 120.0   # attach waits this long for a snapshot copy to finish


class Attachments:
    """The attachment rows of one home's disks (see the module doc).

    ``disks`` is the :class:`~blockcrypt.services.disks.DiskService` of the
    home: its catalog connection (read each time: ``disk serve`` replaces it),
    its key provider and its disk lookups.
    """

    def __init__(self, disks: DiskService):
        self.disks = disks
        self._pid = os.getpid()
        self._start = proc.process_start_time(self._pid)

    @property
    def conn(self) -> sqlite3.Connection:
        return self.disks.conn

    # -- state ------------------------------------------------------------------------
    @staticmethod
    def is_stale(att: sqlite3.Row) -> bool:
        if att["state"] in ("attaching", "detaching"):
            return not proc.process_alive(att["owner_pid"], att["owner_start"])
        marker = f"{att['run_dir']}/"
        if not proc.pid_matches(att["nbdkit_pid"], "nbdkit", marker):
            return True
        if att["method"] == ATTACH_LOOP and not proc.pid_matches(att["helper_pid"], "nbdfuse",
                                                                 marker):
            return True
        return False

    @staticmethod
    def in_use_error(name: str, att: sqlite3.Row) -> errors.DiskAttached:
        device = att["device"] or att["socket"]
        if att["state"] == "attaching":
            msg = (f"disk {name!r} is being attached by process {att['owner_pid']}; "
                   "wait for it to finish")
        elif att["state"] == "detaching":
            msg = (f"disk {name!r} is being detached by process {att['owner_pid']}; "
                   "wait for it to finish")
        elif att["method"] == SERVE:
            msg = (f"disk {name!r} is being served on {att['socket']} by `blockcrypt disk "
                   f"serve` (process {att['owner_pid']}); stop that server first")
        else:
            msg = None
        return errors.DiskAttached(msg, name=name, device=device)

    def cleanup_stale(self, disk_id: str | None = None, *, force: bool = False) -> list[str]:
        """Clean stale attachments (all, or one disk's); returns the disk ids cleaned.

        A stale attachment whose device still carries a mounted file system (its
        server died under the mount) is kept, so that attach can refuse and name the
        mount (:class:`~blockcrypt.errors.StaleMount`), unless ``force``.
        Live attachments get a resume nudge instead: it ends an I/O pause left by
        a snapshot killed while it held it, and never disturbs a running one
        (:func:`blockcrypt.system.quiesce.nudge_resume`).
        """
        rows = ([catalog.get_attachment(self.conn, disk_id)] if disk_id
                else catalog.list_attachments(self.conn))
        cleaned = []
        for att in rows:
            if att is None:
                continue
            if not self.is_stale(att):
                if att["state"] == "attached" and att["control_socket"]:
                    quiesce.nudge_resume(att["control_socket"])
                continue
            if not force and runtime.mounts_left(att, Path(att["run_dir"])):
                continue
            with db.write_txn(self.conn):
                again = catalog.get_attachment(self.conn, att["disk_id"])
                if again is None or tuple(again) != tuple(att) or not self.is_stale(again):
                    continue  # changed meanwhile: someone else cleaned or re-attached
                runtime.teardown(again, Path(again["run_dir"]), clean=False)
                catalog.delete_attachment(self.conn, again["disk_id"])
            cleaned.append(att["disk_id"])
        return cleaned

    def stale_after_cleanup(self, disk_id: str | None = None) -> set[str]:
        """For list/show: clean what can be cleaned; return ids still stale (a
        cleanup that failed, or a stale mount kept for attach to report)."""
        try:
            self.cleanup_stale(disk_id)
        except errors.BlockcryptError:
            pass
        rows = ([catalog.get_attachment(self.conn, disk_id)] if disk_id
                else catalog.list_attachments(self.conn))
        return {r["disk_id"] for r in rows if r is not None and self.is_stale(r)}

    def require_free(self, disk: sqlite3.Row, *, force: bool = False) -> None:
        """Clean a stale attachment of disk, then refuse if it is still in use, or if
        a file system is still mounted from its stale device (unless ``force``)."""
        self.cleanup_stale(disk["id"], force=force)
        att = catalog.get_attachment(self.conn, disk["id"])
        if att is None:
            return
        mounts = runtime.mounts_left(att, Path(att["run_dir"])) if self.is_stale(att) else []
        if mounts:
            device, mountpoint = mounts[0]
            raise errors.StaleMount(name=disk["name"], device=device, mountpoint=mountpoint)
        raise self.in_use_error(disk["name"], att)

    def claim(self, disk: sqlite3.Row, *, method: str, read_only: bool, run_dir: Path,
              sock: str | None, control_socket: Path) -> None:
        """Insert the attachment row in state 'attaching' (one winner per disk)."""
        with db.write_txn(self.conn):
            if catalog.get_disk_by_id(self.conn, disk["id"]) is None:  # deleted meanwhile
                raise errors.DiskNotFound(name=disk["name"])
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is not None:
                if not self.is_stale(att):
                    raise self.in_use_error(disk["name"], att)
                runtime.teardown(att, Path(att["run_dir"]), clean=False)
                catalog.delete_attachment(self.conn, disk["id"])
            if run_dir.exists():  # leftovers without a row (e.g. a crash during cleanup)
                runtime.teardown(None, run_dir, clean=False)
            catalog.insert_attachment(
                self.conn, disk_id=disk["id"], state="attaching", owner_pid=self._pid,
                owner_start=self._start, device=None, method=method, read_only=int(read_only),
                nbdkit_pid=None, helper_pid=None, run_dir=str(run_dir), socket=sock,
                control_socket=str(control_socket), attached_at=utc_timestamp())

    def update(self, disk_id: str, **changes) -> None:
        with db.write_txn(self.conn):
            catalog.update_attachment(self.conn, disk_id, **changes)

    def release(self, disk_id: str) -> None:
        with db.write_txn(self.conn):
            catalog.delete_attachment(self.conn, disk_id)

    # -- attach / detach ----------------------------------------------------------------
    def _wait_for_container_lock(self, disk: sqlite3.Row, *, exclusive: bool) -> None:
        """Wait until the server could take the container's whole-file lock.

        ``snapshot create`` of a detached disk holds a shared lock for the
        milliseconds that fix its instant (the copy runs after, and the server
        takes it over: blockcrypt.services.snapshot_detached); the plugin takes
        its lock without waiting and would fail to start.  Called
        after the attachment is claimed: a snapshot that locks the file later sees
        the claim and backs off (blockcrypt.services.snapshots), so the window in
        which both could proceed is the instant between this check and nbdkit's own.
        """
        with self.disks.store.locked(self.disks.path_of(disk), exclusive=exclusive,
                                     timeout_s=LOCK_WAIT_TIMEOUT_S) as lock:
            if not lock.held:
                raise errors.StateError(
                    detail=f"disk {disk['name']!r} is busy (another program holds its "
                           "file); retry `blockcrypt disk "
                           f"attach {disk['name']}` later")

    def attach(self, name: str, *, read_only: bool = False,
               threads: int | None = None, force: bool = False,
               break_lock: bool = False) -> dict:
        """Attach the disk as a local block device; returns the description.

        ``threads``: nbdkit worker threads per connection (default
        :data:`blockcrypt.system.commands.NBDKIT_THREADS`).  ``force``: attach even
        though a file system is still mounted from the device of a server that
        died (:class:`~blockcrypt.errors.StaleMount` otherwise).
        """
        disks = self.disks
        runtime.check_threads(threads)
        runtime.require_root("blockcrypt disk attach")
        disks.recover_files()
        disk = disks.disk_row(name)
        self.require_free(disk, force=force)
        run_dir = disks.run_dir_of(name)
        for sock in (run_dir / NBD_SOCKET, run_dir / CONTROL_SOCKET):
            runtime.check_socket_path(sock)
        header = disks.read_header(disk)
        method = ATTACH_NBD if runtime.nbd_available() else ATTACH_LOOP
        runtime.require_tools("nbdkit", "blockdev",
                              *(("nbd-client",) if method == ATTACH_NBD else
                                ("nbdfuse", "losetup", "fusermount3")))
        if header.encrypted:
            disks.keys.check_usable(header.cmk_id)  # cheap refusal before the claim
        params = disks.volume_params(disk, break_lock=break_lock and not read_only)
        holder = disks.holder(disk) if params is not None and not read_only else None
        if holder is not None and not break_lock:
            raise held_error(name, holder)
        dk = None
        try:
            # Claim first, then unwrap: of many concurrent attaches, the losers
            # fail here without paying for the passphrase KDF.
            self.claim(disk, method=method, read_only=read_only, run_dir=run_dir,
                       sock=str(run_dir / NBD_SOCKET), control_socket=run_dir / CONTROL_SOCKET)
            crashpoint("disk-attach.after-claim")
            try:
                if params is None:      # an RBD image's lock is the server's own
                    self._wait_for_container_lock(disk, exclusive=not read_only)
                dk = disks.unwrap(disk, header)
                disks.keys.forget_secrets()   # the KEK: not needed once the DK is out
                ensure_private_dir(disks.home.run_dir)
                ensure_private_dir(run_dir)
                _, nbdkit_pid = runtime.start_nbdkit(
                    name, disks.path_of(disk), discard=bool(disk["discard"]), dk=dk,
                    run_dir=run_dir, read_only=read_only, unix_socket=run_dir / NBD_SOCKET,
                    threads=threads, volume_params=params)
                if holder is not None:
                    record(disks, "disk-break-lock", [("disk", name)],
                           details={"displaced_holder": holder})
                if dk is not None:
                    dk.wipe()
                crashpoint("disk-attach.after-nbdkit")
                self.update(disk["id"], nbdkit_pid=nbdkit_pid)
                helper_pid = None
                if method == ATTACH_NBD:
                    device = runtime.connect_nbd(name, sector_size=disk["sector_size"],
                                                 run_dir=run_dir, read_only=read_only)
                else:
                    device, helper_pid = runtime.connect_loop(
                        name, sector_size=disk["sector_size"], run_dir=run_dir,
                        read_only=read_only,
                        on_helper_pid=lambda pid: self.update(disk["id"], helper_pid=pid))
                crashpoint("disk-attach.after-device")
                self.update(disk["id"], state="attached", device=device, helper_pid=helper_pid,
                            owner_pid=None, owner_start=None)
            except BaseException:
                att = catalog.get_attachment(self.conn, disk["id"])
                try:
                    runtime.teardown(att, run_dir, clean=False)
                finally:
                    self.release(disk["id"])
                raise
        finally:
            if dk is not None:
                dk.wipe()
        return disks.show(name)

    def detach(self, name: str) -> dict:
        """Detach an attached disk: refuse if mounted, else flush, disconnect, stop.

        Returns {"name", "device", "stale": bool, "catalog_pending": bool}; a stale
        attachment is just cleaned.  On a full home the device is released and the
        server stopped all the same; the catalog row that could not be removed
        (``catalog_pending``) is stale from then on and removed by a later command."""
        runtime.require_root("blockcrypt disk detach")
        disk = self.disks.disk_row(name)
        att = catalog.get_attachment(self.conn, disk["id"])
        if att is not None and self.cleanup_stale(disk["id"]):
            return {"name": name, "device": att["device"], "stale": True,
                    "catalog_pending": False}

        def detachable() -> sqlite3.Row:
            """The attachment, if it may be detached now (refusals as before)."""
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is None:
                raise errors.DiskNotAttached(name=name)
            if att["state"] != "attached" or att["method"] == SERVE:
                raise self.in_use_error(name, att)
            _check_not_busy(name, att["device"])
            return att

        marked = True
        try:
            with db.write_txn(self.conn):
                att = detachable()
                catalog.update_attachment(self.conn, disk["id"], state="detaching",
                                          owner_pid=self._pid, owner_start=self._start)
        except errors.HomeFull:
            # A full home cannot record the mark: detach anyway.  The row stays
            # 'attached'; once its server is stopped it is stale, and the first
            # command that can write again deletes it (cleanup_stale).
            att, marked = detachable(), False
        device = att["device"]
        crashpoint("disk-detach.after-mark")
        try:
            runtime.teardown(att, Path(att["run_dir"]), clean=True)
        except BaseException:
            if marked:
                self.update(disk["id"], state="attached", owner_pid=None, owner_start=None)
            raise
        crashpoint("disk-detach.after-teardown")
        try:
            self.release(disk["id"])
        except errors.HomeFull:
            marked = False
        return {"name": name, "device": device, "stale": False, "catalog_pending": not marked}


def _check_not_busy(name: str, device: str | None) -> None:
    """DeviceBusy if the device is mounted, held by dm/md, or claimed exclusively."""
    if not device:
        return
    mounts = devices.device_mounts(device)
    if mounts:
        dev, mountpoint = mounts[0]
        raise errors.DeviceBusy(name=name, mountpoint=mountpoint)
    holders = devices.device_holders(device)
    if holders:
        raise errors.DeviceBusy(
            f"disk {name!r} ({device}) is in use by /dev/{holders[0]}; remove that "
            f"device first (e.g. `dmsetup remove {holders[0]}`)",
            name=name, mountpoint=f"/dev/{holders[0]}")
    if Path(device).exists() and devices.open_exclusively_busy(device):
        raise errors.DeviceBusy(
            f"disk {name!r} ({device}) is in use (mounted in another mount namespace "
            f"or claimed by another program); release it and retry",
            name=name, mountpoint=device)
