"""``disk resize``: grow a disk in place (ECS ResizeDisk), detached or attached.

Owns the rules of a resize: growth only (a smaller disk is made by copying the files,
``disk create`` + ``disk copy``), the new size checked before anything is written,
and the order of the two writes:

1. the container grows (:meth:`Store.grow`, docs/FORMAT.md F-29): the file is
   extended, then both header copies take the new size and, for an encrypted disk,
   the same DK re-wrapped for the new key context (F-20, F-25);
2. the catalog row takes the new size.

Both happen inside one catalog write transaction, so no attach can claim the disk
in between (the DK is re-wrapped just before it, from a header that must still be the
current one inside it).  A crash after step 1 leaves a header larger than the row: the
header is the truth for the size.  Before step 1 a marker
``run/.resizes/<disk id>.json`` (the resizer's pid and start time) is written and
synced; it is removed once the row committed.  The next command that looks at disks
(every one that runs :meth:`DiskService.recover_files`) finds the marker of a process
that is gone and finishes step 2 from the header (:func:`recover`); running the same
``disk resize`` again also does (``finished_catalog``).

An attached disk keeps being served meanwhile: its server and block device were set
up with the old size and keep it (nbdkit 1.32 cannot tell a connected NBD client
that the size changed, and nbdfuse fixes its file's size at connect, so the loop
device cannot see more either).  The result says ``reattach_required``; detaching
and attaching again shows the new size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors, names
from ..storage import catalog, db
from ..storage.header import Kind, key_context, new_header
from ..storage.home import create_private_file, ensure_private_dir, fsync_dir
from ..system import proc
from ..testing.crashpoints import crashpoint

if TYPE_CHECKING:
    from .disks import DiskService


def _shrink_refused(name: str, size_bytes: int, current_bytes: int) -> errors.InvalidSize:
    return errors.InvalidSize(
        size=size_bytes,
        reason=f"disk {name!r} has {current_bytes} bytes and a disk only grows; to get a "
               f"smaller disk, create one and copy the files onto it: `blockcrypt disk "
               f"create NEW --size {size_bytes}` then `blockcrypt disk copy {name} NEW`")


def resize(disks: DiskService, name: str, size_bytes: int) -> dict:
    """Grow disk ``name`` to ``size_bytes``; returns its description plus
    ``old_size_bytes``, ``changed``, ``reattach_required`` and ``finished_catalog``."""
    names.validate_name(name)
    disks.recover_files()
    disk = disks.disk_row(name)
    disks.cleanup_stale(disk["id"])
    names.check_size(size_bytes, disk["sector_size"])
    new_header(Kind.DISK, size_bytes, disk["sector_size"], encrypted=False)  # F-13 limit
    if size_bytes < disk["size_bytes"]:
        raise _shrink_refused(name, size_bytes, disk["size_bytes"])
    path = disks.path_of(disk)
    header = disks.read_header(disk)
    if size_bytes < header.size_bytes:
        raise _shrink_refused(name, size_bytes, header.size_bytes)
    new = header.replace(size_bytes=size_bytes)
    if header.encrypted and size_bytes > header.size_bytes:
        # before the write transaction: the key provider records its own audit entry
        disks.keys.check_usable(header.cmk_id)
        wrapped = disks.keys.reencrypt_data_key(header.wrapped_dk, key_context(header),
                                                key_context(new))
        new = new.replace(wrapped_dk=wrapped, cmk_version=disks.keys.key_version_of(wrapped))
    with db.write_txn(disks.conn):
        disk = disks.disk_row(name)
        att = catalog.get_attachment(disks.conn, disk["id"])
        if att is not None and att["state"] != "attached":
            raise errors.StateError(detail=f"disk {name!r} is being {att['state']}; retry "
                                           "when `blockcrypt disk show "
                                           f"{name}` says attached or available")
        with disks.store.locked(path, exclusive=True) as lock:
            if att is None and not lock.held:
                raise errors.StateError(detail=f"disk {name!r} is in use by a program other "
                                               "than blockcrypt; stop it and retry")
            if disks.read_header(disk) != header:
                raise errors.StateError(detail=f"disk {name!r} changed while it was being "
                                               "resized; run the resize again")
            old_bytes = disk["size_bytes"]
            marker = None
            if size_bytes > header.size_bytes:
                marker = _write_marker(disks.home.run_dir, disk["id"])
                crashpoint("disk-resize.before-header")
                disks.store.grow(path, new)
                crashpoint("disk-resize.after-header")
            finished = size_bytes == header.size_bytes and header.size_bytes != old_bytes
            if size_bytes != old_bytes:
                catalog.set_disk_size(disks.conn, disk["id"], size_bytes)
        row = catalog.get_disk_by_id(disks.conn, disk["id"])
        _remove_marker(marker)
    out = disks.describe(row, att)
    out.update(old_size_bytes=old_bytes, changed=size_bytes != old_bytes,
               reattach_required=att is not None and size_bytes != old_bytes,
               finished_catalog=finished)
    return out


# -- the marker of a resize in progress, and the recovery of a killed one -------------

MARKERS_DIR = ".resizes"      # beside the run directories (a name no disk has)


def _write_marker(run_dir: Path, disk_id: str) -> Path:
    """Record, durably, that this process is about to grow disk_id's header."""
    d = run_dir / MARKERS_DIR
    ensure_private_dir(d)
    path = d / f"{disk_id}.json"
    pid = os.getpid()
    tmp = d / f"{disk_id}.{pid}.tmp"
    tmp.unlink(missing_ok=True)                        # a killed process's, same pid
    fd = create_private_file(tmp, "resize marker")
    try:
        try:
            os.write(fd, json.dumps({"pid": pid,
                                     "start_time": proc.process_start_time(pid)}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)         # whole: recovery never reads a marker half-written
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise errors.storage_error(path, exc, "resize marker") from None
    fsync_dir(d)
    return path


def _remove_marker(path: Path | None) -> None:
    if path is None:
        return
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()           # the folder goes with its last marker
    except OSError:
        pass


def recover(disks: DiskService) -> list[str]:
    """Finish the resizes whose process died after growing the header: the row
    takes the header's size.  Returns one line per disk, for the user."""
    d = disks.home.run_dir / MARKERS_DIR
    try:
        markers = sorted(d.glob("*.json"))
        for tmp in d.glob("*.tmp"):   # <disk id>.<pid>.tmp of a process killed writing it
            if proc.process_start_time(int(tmp.suffixes[0][1:])) is None:
                tmp.unlink(missing_ok=True)
    except (OSError, ValueError):
        return []
    actions = []
    for path in markers:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = {}
        if proc.process_alive(info.get("pid"), info.get("start_time")):
            continue                  # still running
        try:
            line = _finish(disks, path.stem)
        except errors.BlockcryptError:
            continue                  # unreadable header: left for `disk header-restore`
        if line:
            actions.append(line)
        _remove_marker(path)
    return actions


def _finish(disks: DiskService, disk_id: str) -> str | None:
    with db.write_txn(disks.conn):
        row = catalog.get_disk_by_id(disks.conn, disk_id)
        if row is None:
            return None               # deleted since
        header = disks.store.read_header(disks.path_of(row), repair=False)
        catalog.check_header_matches(header, row, disks.path_of(row))
        if header.size_bytes <= row["size_bytes"]:
            return None               # killed before the header changed
        catalog.set_disk_size(disks.conn, disk_id, header.size_bytes)
    return (f"disk {row['name']!r}: finished an interrupted resize to "
            f"{header.size_bytes} bytes")
