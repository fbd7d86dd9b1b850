"""Snapshots of disks on Ceph RBD: RBD snapshots, clones and rollbacks.

The rules of :mod:`.snapshots` hold unchanged (same DK and CMK, no encryption
conversion, lineage, no export of encrypted snapshots); only the mechanics differ:

- ``snapshot create`` takes an RBD snapshot of the disk's image (instant and
  thin, no data copied).  An attached disk is not paused through nbdkit's pause
  filter: the server holds the image's exclusive lock, so librbd hands the
  request to the server's librbd, which blocks its own writes only while it
  flushes its cache and records the snapshot.  Every write the client saw
  acknowledged has reached librbd by then, so the snapshot holds it; a write
  still in flight is in it or not, as after a power cut (crash-consistent;
  ``--freeze`` for application consistency).  The snapshot's header is the disk's at that instant (its uid is the
  disk's; the catalog row's ``disk_id`` is checked against it).  Crash-safe like
  every create: staged under a temporary snapshot name, renamed once its row
  committed (:meth:`~blockcrypt.storage.rbd_store.RbdStore.publish`).
- ``disk create --from-snapshot``: the snapshot is protected and cloned
  (``RbdStore.clone``); the clone gets its own uid and the DK re-wrapped for it
  (``LifecycleService._derive``), so it inherits the wrapped DK's key.
- ``disk reset``: an RBD rollback of the disk's own image, detached only.
- A snapshot with clones, and a disk with snapshots, are not deleted
  (listing what depends on them).

Owns nothing beyond these steps; rows and checks are :mod:`.snapshots`'.
"""
from __future__ import annotations

import os
import sqlite3
from typing import TYPE_CHECKING

from .. import errors
from ..constants import utc_timestamp
from ..storage import catalog, db
from ..storage.header import ID_BYTES
from ..storage.rbd_image import held_error
from ..storage.rbd_store import RbdLoc
from ..system import fsfreeze
from ..testing.crashpoints import crashpoint
from .disks import publishing
from .snapshot_copy import _mounts_to_freeze

if TYPE_CHECKING:
    from .snapshots import LifecycleService


def is_rbd(loc) -> bool:
    return isinstance(loc, RbdLoc)


def header_row(row: sqlite3.Row) -> dict:
    """What a container's header must match for ``row``: an RBD snapshot holds its
    disk's header (uid = the row's ``disk_id``)."""
    out = {k: row[k] for k in row.keys()}
    if "disk_name" in out and "@" in out["path"]:
        out["id"] = out["disk_id"]
    return out


def create_snapshot(svc: LifecycleService, disk: sqlite3.Row, snap_name: str,
                    freeze: bool, marker) -> dict:
    loc = svc.path_of(disk)
    header = svc.store.read_header(loc, repair=False)
    catalog.check_header_matches(header, disk, loc)
    if header.encrypted:
        # An RBD snapshot re-wraps nothing (it holds the disk's header), but as for a
        # file a disabled CMK must stop it: it would keep data the key no longer serves.
        svc.keys.check_usable(header.cmk_id)
    store = svc.store.named(loc.store)
    uid = os.urandom(ID_BYTES)
    final = RbdLoc(loc.store, loc.image, uid.hex(), owner=f"snapshot {snap_name!r}")
    quiesced = False
    with marker, publishing(svc.store, final, after_commit="snapshot.after-commit") as tmp:
        att = catalog.get_attachment(svc.conn, disk["id"])
        served = att is not None and not att["read_only"] and att["control_socket"]
        if freeze and not served:
            raise errors.StateError(
                detail=f"--freeze needs disk {disk['name']!r} attached read-write with a "
                       "mounted file system; it is not; snapshot it without --freeze")
        if served:
            mounts = _mounts_to_freeze(disk, att) if freeze else []
            with fsfreeze.frozen(mounts):
                crashpoint("snapshot.rbd-snap")
                store.snapshot(tmp)           # the server's librbd blocks its writes
            quiesced = True
        else:
            store.snapshot(tmp)
        crashpoint("snapshot.before-commit")
        with db.write_txn(svc.conn):
            if svc._snapshot_row(snap_name) is not None:
                raise errors.AlreadyExists(what="snapshot", name=snap_name)
            from .snapshots import disk_lineage
            catalog.insert_snapshot(
                svc.conn, id=uid.hex(), name=snap_name, disk_id=disk["id"],
                disk_name=disk["name"], path=str(final), size_bytes=header.size_bytes,
                sector_size=header.sector_size, encrypted=int(header.encrypted),
                cmk_id=header.cmk_id, lineage_id=disk_lineage(disk), created_at=utc_timestamp())
            row = svc._snapshot_row(snap_name)
    out = svc._describe_snapshot(row)
    out.update(copy_method="rbd-snapshot", quiesced=quiesced, copied_before_write_bytes=0)
    return out


def dependants(svc, disk: sqlite3.Row) -> list[str]:
    """What keeps an RBD disk from being deleted: its snapshots, by catalog name where
    this host knows them (snapshots of other hosts by their RBD name)."""
    loc = svc.path_of(disk)
    if not is_rbd(loc):
        return []
    store = svc.store.named(loc.store)
    try:
        snaps = store.snapshots_of(loc)
    except errors.ImageMissing:
        return []
    known = {r["path"]: r["name"] for r in svc.conn.execute(
        "SELECT name, path FROM snapshots WHERE path LIKE ?", (f"{loc}@%",)).fetchall()}
    return [f"snapshot {known[str(RbdLoc(loc.store, loc.image, s))]}"
            if str(RbdLoc(loc.store, loc.image, s)) in known else f"RBD snapshot {loc}@{s}"
            for s in snaps]


def clone_users(svc, snap: sqlite3.Row) -> list[str]:
    """The disks cloned from an RBD snapshot (by name where this host knows them)."""
    loc = svc.path_of(snap)
    if not is_rbd(loc):
        return []
    children = svc.store.named(loc.store).children_of(loc)
    out = []
    for image in children:
        row = svc.conn.execute("SELECT name FROM disks WHERE path = ?",
                               (f"rbd:{loc.store}/{image}",)).fetchone()
        out.append(f"disk {row['name']}" if row else f"RBD image {image}")
    return out


def keep_flattened(svc: LifecycleService, current, staged) -> None:
    """A disk created with ``--flatten`` stays independent of its snapshot when
    ``disk reinit`` swaps in a new clone of it: flatten the staged clone too."""
    if is_rbd(staged):
        store = svc.store.named(staged.store)
        if not store.has_parent(current):
            store.flatten(staged)


def reset(svc: LifecycleService, disk: sqlite3.Row, snap: sqlite3.Row) -> dict:
    """Roll the disk's image back to its own snapshot ``snap`` (detached only)."""
    path, snap_loc = svc.path_of(disk), svc.path_of(snap)
    if not is_rbd(snap_loc) or snap_loc.image != path.image:
        raise errors.InvalidInput(detail=f"disk {disk['name']!r} is on Ceph: it is reset to "
                                  "one of its own RBD snapshots only; create a new disk from "
                                  f"snapshot {snap['name']!r} with `blockcrypt disk create "
                                  f"NAME --from-snapshot {snap['name']}`")
    if snap["size_bytes"] != disk["size_bytes"]:
        raise errors.InvalidSize(size=snap["size_bytes"], reason=f"disk {disk['name']!r} "
                                 "grew after the snapshot; an RBD rollback would shrink it")
    svc.recover_files()
    svc.disks.cleanup_stale(disk["id"])
    with db.write_txn(svc.conn):
        att = catalog.get_attachment(svc.conn, disk["id"])
        if att is not None:
            raise svc.disks.in_use_error(disk["name"], att)
        holder = svc.disks.holder(disk)
        if holder is not None:
            raise held_error(disk["name"], holder)
        crashpoint("reset.before-swap")
        svc.store.named(path.store).rollback(snap_loc)
    header = svc.store.read_header(path, repair=False)
    catalog.check_header_matches(header, disk, path)
    out = svc.disks.show(disk["name"])
    out.update(action="reset", from_snapshot=snap["name"], copy_method="rbd-rollback")
    return out
