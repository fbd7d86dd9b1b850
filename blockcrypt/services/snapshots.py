"""Snapshots, disks from snapshots, reset and re-initialise: a disk's lifecycle.

Owns the snapshot rows and the operations that build a container from another
(snapshot create, disk create --from-snapshot, disk reset/reinit).  It must not
touch attachments itself (it asks :class:`~blockcrypt.services.disks.DiskService`
to clean stale ones and to name a disk in use) nor reach containers except
through the store.

The rules (the cloud disk-encryption model blockcrypt follows):

- A snapshot holds the disk's data exactly as stored (ciphertext for an
  encrypted disk) and the same data key (DK).  Snapshots, and disks created
  from them, never decrypt or re-encrypt data: they are thin file copies
  (:mod:`blockcrypt.storage.fastcopy`) whose header gets a new uid and the DK
  re-wrapped for the new container's key context
  (``KeyProvider.reencrypt_data_key(wrapped, key_context(old), key_context(new))``:
  the context binds uid and size, so the same DK has a different wrapped form
  in every container).  The CMK never changes
  (:class:`~blockcrypt.errors.CmkChangeRefused`), and neither does the
  encryption: an encrypted disk never becomes unencrypted in place
  (:class:`~blockcrypt.errors.ConversionRefused`), nor the reverse
  (:class:`~blockcrypt.errors.EncryptionRefused`).  Files move between the two
  kinds only with ``blockcrypt disk copy``.
- Lineage.  Encrypted containers carry a lineage id in their header (random,
  born with the DK, inherited by every snapshot and disk that shares the DK;
  docs/FORMAT.md F-18).  Unencrypted containers have no key and no header
  lineage; their lineage is the id of the disk the data descends from: the
  catalog stores NULL for a disk created blank (meaning "its own id"), and
  that disk's id in its snapshots and in disks created from them
  (:func:`disk_lineage`).  ``disk reset`` accepts only a snapshot of the
  disk's own lineage (:class:`~blockcrypt.errors.LineageMismatch`).
- Snapshot while attached: I/O is paused through nbdkit's pause filter
  (:mod:`blockcrypt.system.quiesce`), which answers only once every in-flight
  request has completed, just long enough to fix the instant: a reflink, or
  the start of the plugin's copy-before-write (:mod:`.snapshot_copy`); the
  data is copied after I/O resumed.  The image is crash-consistent: a mounted
  journalling file system on it recovers as after a power cut, and everything
  the writer had fsynced is in it (``--freeze``: clean, see
  :mod:`blockcrypt.system.fsfreeze`).  One snapshot of a disk at a time
  (:mod:`.snapshot_progress`).  A detached disk is copied under a shared
  ``flock`` of its container, so a concurrent attach fails instead of writing
  into the copy.
- Export: only an unencrypted snapshot can be exported, as a raw (sparse)
  image of its data area; exporting an encrypted one is refused
  (:class:`~blockcrypt.errors.ExportRefused`).

Containers are reached only through the disk service's store
(:class:`~blockcrypt.storage.store.Store`): copies are ``Store.clone``, header
updates ``Store.write_header``, locks ``Store.locked``.

Crash safety (same scheme as disk create/delete in :mod:`blockcrypt.services.disks`,
the steps of :mod:`blockcrypt.storage.publish`):
a new container is written as ``<id>.bcd.tmp-<pid>-<start>`` (copied,
header rewritten, fsynced), then its catalog row is committed, then it is
renamed to ``<id>.bcd``.  Delete renames the file to ``<id>.bcd.deleted`` and
deletes the row in one transaction, then unlinks.  Every snapshot command
first finishes or undoes what a killed process left (:meth:`recover_files`):
a temp file whose creator is gone is renamed if its row committed and removed
otherwise.  Reset and re-initialise replace an existing disk's file: the new
file is built under the temp name and renamed over the old one inside a
write transaction that checks the disk is not attached, so a concurrent
attach either comes first (and the reset is refused) or serves the new file.
"""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from .. import errors, names
from ..constants import utc_timestamp
from ..storage import catalog, db
from ..storage.file_store import allocated_bytes
from ..storage.header import ID_BYTES, Header, Kind, key_context, new_header
from ..testing.crashpoints import crashpoint
from . import rbd_snapshots, snapshot_copy, snapshot_progress
from .boundary import about, audited
from .disks import DiskService, publishing
from .snapshot_copy import SETTLE_TIMEOUT_S


def disk_lineage(disk: sqlite3.Row) -> str:
    """A disk's lineage id (hex): the header's for encrypted disks; for
    unencrypted ones the id of the disk its data descends from."""
    return disk["lineage_id"] or disk["id"]


def _what(row: sqlite3.Row) -> str:
    """'disk' or 'snapshot': which table a catalog row comes from."""
    return "snapshot" if "disk_name" in row.keys() else "disk"


def get_snapshot(conn: sqlite3.Connection, name: str) -> sqlite3.Row:
    names.validate_name(name, "snapshot")
    row = conn.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise errors.SnapshotNotFound(name=name)
    return row


class LifecycleService:
    """Snapshots and the disk operations built on them, for one home.

    ``conn`` is the catalog's connection and ``keys`` the
    :class:`~blockcrypt.kms.provider.KeyProvider` for data keys.  ``disks`` is the
    :class:`~blockcrypt.services.disks.DiskService` of the same home (stale
    attachments, crash recovery of disk files); its ``store`` keeps the
    snapshots' containers too.
    """

    def __init__(self, home, conn: sqlite3.Connection, keys, disks: DiskService | None = None):
        if disks is None:
            disks = DiskService(home, conn, keys)
        self.home = home
        self.keys = keys
        self.disks = disks
        self.store = disks.store
        self.conn: sqlite3.Connection = conn

    # -- paths ------------------------------------------------------------------
    def path_of(self, row: sqlite3.Row) -> Path:
        """Where the store keeps the container of a disk or snapshot row."""
        return self.store.locate(row["path"], owner=f"{_what(row)} {row['name']!r}")

    # -- crash recovery -----------------------------------------------------------
    def recover_files(self) -> list[str]:
        """Finish or undo interrupted snapshot creates/deletes and disk resets.

        Snapshots: a temp file whose creator is gone is renamed into place if
        its row committed, else removed; a ``.deleted`` file is restored if its
        row is still there, else unlinked.  Disk files (creates, deletes,
        interrupted reset/reinit): :meth:`DiskService.recover_files`.
        """
        snapshot_progress.in_progress(self.home.run_dir)   # clears a killed create's marker
        actions = self.disks.recover_files()
        actions += self.store.recover(self.conn, "snapshots")
        return actions

    # -- building containers ----------------------------------------------------
    def _derive(self, tmp: Path, source: sqlite3.Row, *, kind: Kind, uid: bytes,
                size_bytes: int | None = None) -> Header:
        """Turn tmp, a copy of source's container (a disk or snapshot row), into a
        container of its own: kind, new uid, size (growth only), and the same DK
        re-wrapped for the new key context."""
        with about(_what(source), source["name"], self.home.path, self.path_of(source)):
            old = self.store.read_header(tmp)   # the copy: errors name the source
        catalog.check_header_matches(old, rbd_snapshots.header_row(source),
                                     self.path_of(source))
        new = old.replace(kind=kind, uid=uid,
                          size_bytes=old.size_bytes if size_bytes is None else size_bytes)
        if new.size_bytes < old.size_bytes:
            raise errors.InvalidSize(size=new.size_bytes,
                                     reason=f"a disk only grows; the source has "
                                            f"{old.size_bytes} bytes")
        names.check_size(new.size_bytes, new.sector_size)
        if new.size_bytes > old.size_bytes:
            self.store.reserve(tmp, new)
        if old.encrypted:
            wrapped = self.keys.reencrypt_data_key(old.wrapped_dk, key_context(old),
                                                    key_context(new))
            new = new.replace(wrapped_dk=wrapped, cmk_version=self.keys.key_version_of(wrapped))
        crashpoint("lifecycle.after-rewrap")
        return self.store.write_header(tmp, new)

    def _copy_snapshot(self, snap: sqlite3.Row, dst: Path) -> str:
        """Copy a snapshot's container (immutable: no lock needed) to dst."""
        path = self.path_of(snap)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            try:
                with about("snapshot", snap["name"], self.home.path, path):
                    return self.store.clone(path, dst)
            except errors.NotFound:
                if self._snapshot_row(snap["name"]) is None:
                    raise errors.SnapshotNotFound(name=snap["name"]) from None  # deleted
                # committed, and its creator is about to rename it into place
                if not self.store.pending(path) or time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    # -- snapshots ----------------------------------------------------------------
    @audited("snapshot-create", "disk:disk_name", "snapshot:snap_name")
    def create_snapshot(self, disk_name: str, snap_name: str, freeze: bool = False) -> dict:
        """Snapshot a disk, attached or not (see the module doc); ``freeze``:
        fsfreeze the attached disk's mounted file systems around the instant."""
        names.validate_name(disk_name)
        names.validate_name(snap_name, "snapshot")
        self.recover_files()
        disk = self.disks.disk_row(disk_name)
        self.disks.cleanup_stale(disk["id"])
        if self._snapshot_row(snap_name) is not None:
            raise errors.AlreadyExists(what="snapshot", name=snap_name)
        self.home.create_dirs()

        marker = snapshot_progress.SnapshotMarker(self.home.run_dir, disk["id"], disk["name"],
                                                  snap_name)
        if rbd_snapshots.is_rbd(self.path_of(disk)):
            return rbd_snapshots.create_snapshot(self, disk, snap_name, freeze, marker)
        uid = os.urandom(ID_BYTES)
        rel_path = self.store.new_ref("snapshots", uid.hex())
        with marker, publishing(self.store, self.store.locate(rel_path),
                                after_commit="snapshot.after-commit") as tmp:
            method, quiesced, cow_bytes = snapshot_copy.copy_disk(
                self.store, self.conn, disk, self.path_of(disk), tmp, marker, freeze)
            crashpoint("snapshot.after-copy")
            header = self._derive(tmp, disk, kind=Kind.SNAPSHOT, uid=uid)
            crashpoint("snapshot.before-commit")
            with db.write_txn(self.conn):
                if self._snapshot_row(snap_name) is not None:
                    raise errors.AlreadyExists(what="snapshot", name=snap_name)
                catalog.insert_snapshot(
                    self.conn, id=header.uid_hex, name=snap_name, disk_id=disk["id"],
                    disk_name=disk["name"], path=rel_path, size_bytes=header.size_bytes,
                    sector_size=header.sector_size, encrypted=int(header.encrypted),
                    cmk_id=header.cmk_id, lineage_id=disk_lineage(disk), created_at=utc_timestamp())
                row = self._snapshot_row(snap_name)
        out = self._describe_snapshot(row)      # as created (a delete may already follow)
        out.update(copy_method=method, quiesced=quiesced, copied_before_write_bytes=cow_bytes)
        return out

    def _snapshot_row(self, name: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()

    def _describe_snapshot(self, row: sqlite3.Row) -> dict:
        path = self.path_of(row)
        return {
            "name": row["name"], "id": row["id"], "disk_name": row["disk_name"],
            "disk_id": row["disk_id"],
            "disk_exists": catalog.get_disk_by_id(self.conn, row["disk_id"]) is not None,
            "path": str(path), "size_bytes": row["size_bytes"],
            "sector_size": row["sector_size"], "encrypted": bool(row["encrypted"]),
            "cmk_id": row["cmk_id"], "lineage_id": row["lineage_id"],
            "allocated_bytes": self.store.allocated_bytes(path),
            "created_at": row["created_at"], "state": "complete", "percent": 100,
        }

    def list_snapshots(self, disk_name: str | None = None) -> list[dict]:
        self.recover_files()
        if disk_name is not None:
            names.validate_name(disk_name)
            rows = self.conn.execute("SELECT * FROM snapshots WHERE disk_name = ? "
                                     "ORDER BY created_at, name", (disk_name,)).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM snapshots "
                                     "ORDER BY created_at, name").fetchall()
        done = [self._describe_snapshot(r) for r in rows]
        return done + [p for p in snapshot_progress.in_progress(self.home.run_dir)
                       if disk_name is None or p["disk_name"] == disk_name]

    def show_snapshot(self, name: str) -> dict:
        """A snapshot; one still being copied shows as state 'copying' with a percent."""
        try:
            return self._describe_snapshot(get_snapshot(self.conn, name))
        except errors.SnapshotNotFound:
            for p in snapshot_progress.in_progress(self.home.run_dir):
                if p["name"] == name:
                    return p
            raise

    @audited("snapshot-delete", "snapshot:name")
    def delete_snapshot(self, name: str) -> dict:
        """Delete a snapshot.  Disks created from it are independent copies and
        are not affected (only `disk reinit` of such a disk needs it)."""
        self.recover_files()
        with db.write_txn(self.conn):
            row = get_snapshot(self.conn, name)
            path = self.path_of(row)
            clones = rbd_snapshots.clone_users(self, row)
            if clones:
                raise errors.StateError(detail=f"snapshot {name!r} has clones: "
                                        f"{', '.join(clones)}; delete them first")
            doomed = self.store.doom(path)
            self.conn.execute("DELETE FROM snapshots WHERE id = ?", (row["id"],))
            crashpoint("snapshot-delete.in-txn")
        crashpoint("snapshot-delete.after-commit")
        self.store.remove(doomed)
        return {"name": row["name"], "id": row["id"], "deleted": True}

    @audited("snapshot-export", "snapshot:name")
    def export_snapshot(self, name: str, dest: Path) -> dict:
        """Write an unencrypted snapshot's data area to dest as a raw sparse image.

        Encrypted snapshots are never exported (ExportRefused): their data is
        only ever served through blockcrypt under the key store's control.
        """
        row = get_snapshot(self.conn, name)
        if row["encrypted"]:
            raise errors.ExportRefused(name=name)
        src = self.path_of(row)
        header = self.store.read_header(src, repair=False)
        if header.encrypted:   # the catalog and the header disagree: trust the stricter
            raise errors.ExportRefused(name=name)
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            raise errors.AlreadyExists(what="file", name=str(dest))
        if not dest.parent.is_dir():    # else the error would name the export's temp file
            raise errors.InvalidInput(detail=f"cannot export snapshot {name!r} to {dest}: "
                                             f"no such directory {dest.parent}")
        method = self.store.export(src, dest, offset=header.data_offset,
                                   length=header.size_bytes)
        return {"name": name, "file": str(dest), "size_bytes": header.size_bytes,
                "allocated_bytes": allocated_bytes(dest), "copy_method": method}

    # -- disks from snapshots ------------------------------------------------------
    @audited("disk-create-from-snapshot", "disk:name", "snapshot:snap_name")
    def create_disk_from_snapshot(self, name: str, snap_name: str, *,
                                  size_bytes: int | None = None, encrypted: bool | None = None,
                                  key_ref: str | None = None, sector_size: int | None = None,
                                  discard: bool = False, flatten: bool = False) -> dict:
        """A new disk with a snapshot's contents, encryption, CMK, sector size and DK.

        encrypted / key_ref / sector_size may only confirm the snapshot's
        (ConversionRefused, EncryptionRefused, CmkChangeRefused, InvalidInput otherwise);
        size_bytes may only grow it.  On Ceph the disk is an RBD clone that depends on
        the snapshot; ``flatten`` copies the snapshot's data into it before it is
        published, so it does not (a disk in the home never depends on its snapshot).
        """
        names.validate_name(name)
        snap = get_snapshot(self.conn, snap_name)
        self._check_no_conversion(snap, encrypted, key_ref, f"disk {name!r}")
        if sector_size is not None and sector_size != snap["sector_size"]:
            raise errors.InvalidInput(detail=f"snapshot {snap_name!r} has {snap['sector_size']}"
                                      f"-byte sectors and so has a disk created from it (the "
                                      "sector size never changes); drop --sector-size, or "
                                      "create a new disk and use `blockcrypt disk copy SRC DST`")
        if size_bytes is not None:
            names.check_size(size_bytes, snap["sector_size"])
            # the container's own limit, before anything is copied or re-wrapped
            new_header(Kind.DISK, size_bytes, snap["sector_size"], encrypted=False)
            if size_bytes < snap["size_bytes"]:
                raise errors.InvalidSize(size=size_bytes, reason=f"a disk created from "
                                         f"snapshot {snap_name!r} needs at least its "
                                         f"{snap['size_bytes']} bytes (growth only)")
        self.recover_files()
        if catalog.get_disk(self.conn, name) is not None:
            raise errors.AlreadyExists(what="disk", name=name)
        self.home.create_dirs()

        uid = os.urandom(ID_BYTES)
        rel_path = self.store.for_ref(snap["path"]).new_ref("disks", uid.hex())
        with publishing(self.store, self.store.locate(rel_path),
                        after_commit="from-snapshot.after-commit") as tmp:
            method = self._copy_snapshot(snap, tmp)
            crashpoint("from-snapshot.after-copy")
            header = self._derive(tmp, snap, kind=Kind.DISK, uid=uid, size_bytes=size_bytes)
            clone = rbd_snapshots.is_rbd(tmp)
            if clone and flatten:
                self.store.named(tmp.store).flatten(tmp)
            crashpoint("from-snapshot.before-commit")
            with db.write_txn(self.conn):
                if catalog.get_disk(self.conn, name) is not None:
                    raise errors.AlreadyExists(what="disk", name=name)
                catalog.insert_disk(
                    self.conn, id=header.uid_hex, name=name, path=rel_path,
                    size_bytes=header.size_bytes, sector_size=header.sector_size,
                    encrypted=int(header.encrypted), cmk_id=header.cmk_id,
                    lineage_id=header.lineage_hex if header.encrypted else snap["lineage_id"],
                    discard=int(discard), source_snapshot_id=snap["id"], created_at=utc_timestamp())
                row = catalog.get_disk_by_id(self.conn, header.uid_hex)
        out = self.disks.describe(row, None)    # as created (a delete may already follow)
        out["copy_method"] = method
        out["depends_on_snapshot"] = clone and not flatten
        return out

    def _check_no_conversion(self, snap: sqlite3.Row, encrypted: bool | None,
                             key_ref: str | None, target: str) -> None:
        snap_enc = bool(snap["encrypted"])
        if encrypted is not None and encrypted != snap_enc:
            if snap_enc:
                detail = (f"snapshot {snap['name']!r} is encrypted, so {target} created from "
                          "it is encrypted with the same key; --no-encrypted contradicts it")
            else:
                raise errors.EncryptionRefused(
                    detail=f"snapshot {snap['name']!r} is not encrypted, so {target} created "
                           "from it is not encrypted; --encrypted contradicts it")
            raise errors.ConversionRefused(detail=detail)
        if key_ref is not None:
            if not snap_enc:
                raise errors.EncryptionRefused(
                    detail=f"snapshot {snap['name']!r} is not encrypted; --key would make "
                           f"{target} encrypted")
            key = self.keys.get_key(key_ref)
            if key["id"] != snap["cmk_id"]:
                raise errors.CmkChangeRefused(
                    detail=f"snapshot {snap['name']!r} is under key {snap['cmk_id']}, and "
                           f"{target} inherits it; --key {key_ref} names another key")

    # -- reset and re-initialise ---------------------------------------------------
    @audited("disk-reset", "disk:name", "snapshot:snap_name")
    def reset_disk(self, name: str, snap_name: str) -> dict:
        """Restore a detached disk to a snapshot of its own lineage (ResetDisk).

        The disk keeps its id, name, size and key; its contents become the
        snapshot's.  The snapshot must not be larger than the disk.
        """
        disk = self.disks.disk_row(name)
        snap = get_snapshot(self.conn, snap_name)
        if snap["lineage_id"] != disk_lineage(disk) or bool(snap["encrypted"]) != \
                bool(disk["encrypted"]):
            raise _lineage_mismatch(snap_name, name)
        if snap["cmk_id"] != disk["cmk_id"]:   # a lineage shares one CMK; never mix
            raise errors.CmkChangeRefused(detail=f"snapshot {snap_name!r} is under key "
                                          f"{snap['cmk_id']}, disk {name!r} under "
                                          f"{disk['cmk_id']}")
        if rbd_snapshots.is_rbd(self.path_of(disk)):
            return rbd_snapshots.reset(self, disk, snap)
        return self._replace_from_snapshot(disk, snap, "reset")

    @audited("disk-reinit", "disk:name")
    def reinit_disk(self, name: str) -> dict:
        """Return a detached disk to its initial state, keeping its key (ReInitDisk):
        blank, or the snapshot it was created from."""
        disk = self.disks.disk_row(name)
        if disk["source_snapshot_id"]:
            snap = self.conn.execute("SELECT * FROM snapshots WHERE id = ?",
                                     (disk["source_snapshot_id"],)).fetchone()
            if snap is None:
                raise errors.SnapshotNotFound(
                    f"disk {name!r} was created from snapshot {disk['source_snapshot_id']}, "
                    "which has been deleted, so its initial state is gone; to start over, "
                    f"create a new disk (`blockcrypt disk create`) and copy files with "
                    "`blockcrypt disk copy SRC DST`", name=disk["source_snapshot_id"])
            return self._replace_from_snapshot(disk, snap, "reinit")
        return self._replace(disk, None, "reinit")

    def _replace_from_snapshot(self, disk: sqlite3.Row, snap: sqlite3.Row, action: str) -> dict:
        if snap["size_bytes"] > disk["size_bytes"]:
            raise errors.InvalidSize(size=snap["size_bytes"], reason=f"snapshot "
                                     f"{snap['name']!r} is larger than disk {disk['name']!r} "
                                     f"({disk['size_bytes']} bytes); create a new disk from "
                                     "it with `blockcrypt disk create NAME --from-snapshot "
                                     f"{snap['name']}`")
        return self._replace(disk, snap, action)

    def _replace(self, disk: sqlite3.Row, snap: sqlite3.Row | None, action: str) -> dict:
        """Build the disk's new container (a copy of snap, or blank) and swap it in."""
        self.recover_files()
        self.disks.cleanup_stale(disk["id"])
        att = catalog.get_attachment(self.conn, disk["id"])
        if att is not None:
            raise self.disks.in_use_error(disk["name"], att)
        path = self.path_of(disk)
        tmp = self.store.staging(path)
        uid = bytes.fromhex(disk["id"])
        try:
            if snap is not None:
                method = self._copy_snapshot(snap, tmp)
                header = self._derive(tmp, snap, kind=Kind.DISK, uid=uid,
                                      size_bytes=disk["size_bytes"])
                rbd_snapshots.keep_flattened(self, path, tmp)
            else:
                method = "blank"
                current = self.store.read_header(path, repair=False)
                catalog.check_header_matches(current, disk, path)
                header = self.store.create(tmp, current.replace(seq=0))
            if header.encrypted and header.lineage_hex != disk["lineage_id"]:
                raise _lineage_mismatch(snap["name"] if snap else "(blank)", disk["name"])
            crashpoint(f"{action}.before-swap")
            with db.write_txn(self.conn):
                if catalog.get_disk_by_id(self.conn, disk["id"]) is None:
                    raise errors.DiskNotFound(name=disk["name"])     # deleted meanwhile
                att = catalog.get_attachment(self.conn, disk["id"])
                if att is not None:
                    raise self.disks.in_use_error(disk["name"], att)
                self._check_unlocked(path, disk["name"])
                self.store.swap(tmp, path)
        except BaseException:
            self.store.discard(tmp)
            raise
        out = self.disks.show(disk["name"])
        out.update(action=action, from_snapshot=snap["name"] if snap else None,
                   copy_method=method)
        return out

    def _check_unlocked(self, path: Path, name: str) -> None:
        """Refuse if any server holds the container (belt and braces for the catalog
        check): its whole-file lock must be free."""
        try:
            with self.store.locked(path, exclusive=True) as lock:
                if not lock.held:
                    raise errors.DiskAttached(f"disk {name!r} is in use by a server that "
                                              "blockcrypt did not record; stop it first",
                                              name=name, device="(unknown)")
        except errors.NotFound:
            return


def _lineage_mismatch(snapshot: str, disk: str) -> errors.LineageMismatch:
    return errors.LineageMismatch(
        f"refused: snapshot {snapshot!r} does not belong to disk {disk!r} (different data "
        f"key lineage); create a new disk from it with `blockcrypt disk create NAME "
        f"--from-snapshot {snapshot}`, and to move files into {disk!r} use `blockcrypt disk "
        f"copy NAME {disk}`", snapshot=snapshot, disk=disk)
