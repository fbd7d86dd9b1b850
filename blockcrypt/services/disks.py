"""The disk service: create, list, show and delete disks; the facade the CLI calls
for attach, detach, serve and copy as well.

A disk is a container file ``<home>/disks/<id>.bcd`` (see docs/FORMAT.md) plus a
row in the catalog.  An encrypted disk's data key (DK) exists in plaintext only
in this process while it is being generated or unwrapped, and in the nbdkit
process serving the disk; it is never written to argv, the environment, a log
or a file.

Owns: the disk rows and the crash safety of create and delete.  It delegates
attachments to :mod:`blockcrypt.services.attach` (claim, attach, detach, stale
cleanup), ``disk serve`` to :mod:`blockcrypt.services.serve` and ``disk copy``
to :mod:`blockcrypt.services.copy`; snapshots, reset and reinit are
:mod:`blockcrypt.services.snapshots`.

Crash safety of create and delete (no orphan rows, no orphan files)
-----------------------------------------------------------------------
create: 1. write the container to ``disks/<id>.bcd.tmp-<pid>-<start>`` (fsynced);
        2. insert the catalog row (a committed transaction);
        3. rename the file to ``disks/<id>.bcd`` and fsync the directory.
delete: 1. in one write transaction: rename ``<id>.bcd`` to ``<id>.bcd.deleted``
           (or, if a create committed but has not renamed yet, its temp file:
           :func:`doom`; the creator's rename then finds nothing, :func:`publish`),
           delete the row, commit;
        2. unlink ``<id>.bcd.deleted``.
Snapshots (blockcrypt.services.snapshots) follow the same scheme under ``snapshots/``.
So a ``<id>.bcd`` file always has a committed row, and recovery
(:meth:`DiskService.recover_files`, run by every disk command, under the
database write lock) only ever acts on the two marker names:
- ``.tmp-<pid>-<start>`` whose creator is gone: with a row, the create committed,
  so finish it (rename); without one, it never committed, so remove the file;
  with a row *and* ``<id>.bcd`` present, it is the replacement an interrupted
  ``disk reset``/``reinit`` was building (they swap by renaming it over the old
  file, see blockcrypt.services.snapshots), so remove it;
- ``.deleted``: with a row, the delete never committed, so rename it back;
  without one, finish it (unlink).
A plain ``<id>.bcd`` is never removed automatically, nor a row whose file is
missing: those are left to the operator.
"""
from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from .. import errors, names
from ..constants import utc_timestamp
from ..crypto.secret import Secret
from ..kms.envelope import parse_wrapped
from ..storage import catalog, container, db
from ..storage.home import fsync_dir, private_umask
from ..system import proc
from ..testing.crashpoints import crashpoint
from . import copy as copy_service
from . import serve as serve_service
from .attach import Attachments

DEFAULT_SECTOR_SIZE = 4096

_TMP_MARK = ".tmp-"
_DELETED_MARK = ".deleted"


class DiskService:
    """Disk operations on one home.

    ``conn`` is the catalog's SQLite connection; ``keys`` is the
    :class:`~blockcrypt.kms.provider.KeyProvider` that wraps and unwraps data
    keys (the services never read key tables themselves).  ``attachments``
    (:class:`~blockcrypt.services.attach.Attachments`) holds the attachment
    rules and reads ``conn`` from here, so the one connection ``serve``
    replaces is seen by both.
    """

    def __init__(self, home, conn: sqlite3.Connection, keys):
        self.home = home
        self.keys = keys
        self.conn: sqlite3.Connection = conn
        self._pid = os.getpid()
        self._start = proc.process_start_time(self._pid)
        self.attachments = Attachments(self)

    # -- lookups --------------------------------------------------------------------
    def disk_row(self, name: str) -> sqlite3.Row:
        """The catalog row of disk ``name``; DiskNotFound if there is none."""
        names.validate_name(name)
        row = catalog.get_disk(self.conn, name)
        if row is None:
            raise errors.DiskNotFound(name=name)
        return row

    def path_of(self, disk: sqlite3.Row) -> Path:
        return self.home.path / disk["path"]

    def run_dir_of(self, name: str) -> Path:
        return self.home.run_dir / name

    def read_header(self, disk: sqlite3.Row) -> container.Header:
        """The disk's container header, checked against its catalog row."""
        path = self.path_of(disk)
        if not path.exists():
            raise errors.StorageError(path=str(path),
                                      reason=f"the container of disk {disk['name']!r} is missing")
        header = container.read_header(path)
        check_header_matches(header, disk, path)
        return header

    def unwrap(self, disk: sqlite3.Row, header: container.Header) -> Secret | None:
        """The plaintext DK of an encrypted disk (caller wipes), None if unencrypted.
        Key state is checked first so a disabled key fails before any work."""
        if not header.encrypted:
            return None
        self.keys.check_usable(header.cmk_id)
        return self.keys.decrypt_data_key(header.wrapped_dk, container.key_context(header))

    # -- crash recovery of create/delete ---------------------------------------------
    def recover_files(self) -> list[str]:
        """Finish or undo interrupted creates/deletes (see module doc); returns actions."""
        return recover_dir(self.conn, self.home.disks_dir, "disks")

    # -- create / list / show / delete ---------------------------------------------------
    def create(self, name: str, size_bytes: int, *, encrypted: bool = True,
               key_ref: str | None = None, sector_size: int = DEFAULT_SECTOR_SIZE,
               discard: bool = False) -> dict:
        """Create a disk; returns its description (as :meth:`show`).

        Every argument is validated before anything is written.  An encrypted
        disk gets a fresh DK from the key store, wrapped by key_ref (default:
        the service key) under a context binding this container's identity.
        """
        names.validate_name(name)
        names.check_sector_size(sector_size)
        names.check_size(size_bytes, sector_size)
        # The container's own limit (data offset + size < 2^63), checked before the
        # key store is touched (the service key is created on first use).
        container.new_header(container.Kind.DISK, size_bytes, sector_size, encrypted=False)
        if key_ref is not None and not encrypted:
            raise errors.InvalidInput(detail="--key names the CMK of an encrypted disk; "
                                             "it cannot be used with --no-encrypted")
        self.recover_files()
        if catalog.get_disk(self.conn, name) is not None:
            raise errors.AlreadyExists(what="disk", name=name)
        self.home.create_dirs()

        uid = os.urandom(16)
        if encrypted:
            lineage = os.urandom(16)  # a data key's lineage; unencrypted disks have none
            key = self.keys.get_key(key_ref) if key_ref else self.keys.default_key()
            header = container.new_header(container.Kind.DISK, size_bytes, sector_size,
                                          encrypted=True, uid=uid, cmk_id=key["id"],
                                          lineage_id=lineage)
            dk, wrapped = self.keys.generate_data_key(key["id"], container.key_context(header))
            dk.wipe()  # create needs only the wrapped form
            header = header.replace(wrapped_dk=wrapped,
                                    cmk_version=parse_wrapped(wrapped).key_version)
        else:
            header = container.new_header(container.Kind.DISK, size_bytes, sector_size,
                                          encrypted=False, uid=uid)

        rel_path = f"disks/{header.uid_hex}.bcd"
        final = self.home.path / rel_path
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{self._pid}-{self._start}")
        with private_umask():
            container.create_container(tmp, header)
        crashpoint("disk-create.after-file")
        try:
            with db.write_txn(self.conn):
                if catalog.get_disk(self.conn, name) is not None:
                    raise errors.AlreadyExists(what="disk", name=name)
                catalog.insert_disk(
                    self.conn, id=header.uid_hex, name=name, path=rel_path,
                    size_bytes=size_bytes, sector_size=sector_size, encrypted=int(encrypted),
                    cmk_id=header.cmk_id, lineage_id=header.lineage_hex,
                    discard=int(discard), source_snapshot_id=None, created_at=utc_timestamp())
                row = catalog.get_disk_by_id(self.conn, header.uid_hex)
                crashpoint("disk-create.in-txn")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        crashpoint("disk-create.after-row")
        publish(tmp, final)
        return self.describe(row, None)   # as created (a delete may already follow)

    def describe(self, disk: sqlite3.Row, att: sqlite3.Row | None, stale: bool = False) -> dict:
        out = {
            "name": disk["name"], "id": disk["id"], "path": str(self.path_of(disk)),
            "size_bytes": disk["size_bytes"], "sector_size": disk["sector_size"],
            "encrypted": bool(disk["encrypted"]), "cmk_id": disk["cmk_id"],
            "lineage_id": disk["lineage_id"], "discard": bool(disk["discard"]),
            "source_snapshot_id": disk["source_snapshot_id"], "created_at": disk["created_at"],
            "state": "available", "device": None, "method": None, "read_only": None,
            "socket": None, "control_socket": None, "nbdkit_pid": None,
        }
        if att is not None:
            out.update(state="stale" if stale else att["state"], device=att["device"],
                       method=att["method"], read_only=bool(att["read_only"]),
                       socket=att["socket"], control_socket=att["control_socket"],
                       nbdkit_pid=att["nbdkit_pid"])
        return out

    def list(self) -> list[dict]:
        self.recover_files()
        stale = self.attachments.stale_after_cleanup()
        return [self.describe(d, catalog.get_attachment(self.conn, d["id"]), d["id"] in stale)
                for d in catalog.list_disks(self.conn)]

    def show(self, name: str) -> dict:
        self.recover_files()
        disk = self.disk_row(name)
        stale = self.attachments.stale_after_cleanup(disk["id"])
        return self.describe(disk, catalog.get_attachment(self.conn, disk["id"]),
                              disk["id"] in stale)

    def delete(self, name: str) -> None:
        """Delete a disk (refused while attached or served): file and row."""
        self.recover_files()
        disk = self.disk_row(name)
        self.cleanup_stale(disk["id"])
        d = self.home.disks_dir
        with db.write_txn(self.conn):
            disk = self.disk_row(name)
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is not None:
                raise self.in_use_error(disk["name"], att)
            doomed = doom(self.path_of(disk))
            catalog.delete_disk(self.conn, disk["id"])
            crashpoint("disk-delete.in-txn")
        crashpoint("disk-delete.after-row")
        doomed.unlink(missing_ok=True)
        fsync_dir(d)

    # -- attachments, serve and copy (delegated) ------------------------------------------
    def in_use_error(self, name: str, att: sqlite3.Row) -> errors.DiskAttached:
        return self.attachments.in_use_error(name, att)

    def cleanup_stale(self, disk_id: str | None = None) -> list[str]:
        """Clean stale attachments (all, or one disk's); returns the disk ids cleaned."""
        return self.attachments.cleanup_stale(disk_id)

    def attach(self, name: str, *, read_only: bool = False,
               threads: int | None = None) -> dict:
        """Attach the disk as a local block device; returns the description."""
        return self.attachments.attach(name, read_only=read_only, threads=threads)

    def detach(self, name: str) -> dict:
        """Detach an attached disk; returns {"name", "device", "stale": bool}."""
        return self.attachments.detach(name)

    def serve(self, name: str, *, unix_path: Path | None = None, tcp: str | None = None,
              read_only: bool = False, tls_psk: Path | None = None,
              tls_certificates: Path | None = None, no_tls: bool = False,
              on_ready: Callable[[dict], None] | None = None,
              threads: int | None = None) -> int:
        """Serve the disk in the foreground until a signal (:func:`.serve.serve`)."""
        return serve_service.serve(self, name, unix_path=unix_path, tcp=tcp,
                                   read_only=read_only, tls_psk=tls_psk,
                                   tls_certificates=tls_certificates, no_tls=no_tls,
                                   on_ready=on_ready, threads=threads)

    def copy(self, src_name: str, dst_name: str, *, progress: bool = False) -> dict:
        """Copy SRC's files onto DST, both detached (:func:`.copy.copy_files`)."""
        return copy_service.copy_files(self, src_name, dst_name, progress=progress)


def publish(tmp: Path, final: Path) -> bool:
    """Rename a committed container from its temp name to its final name and
    fsync the directory; False if a concurrent delete took it first (see doom)."""
    try:
        os.rename(tmp, final)
    except FileNotFoundError:
        return False
    fsync_dir(final.parent)
    return True


def doom(final: Path) -> Path:
    """Move a container out of the way of its delete (inside the delete's write
    transaction): ``<id>.bcd`` -> ``<id>.bcd.deleted``.  A create commits its row
    before it renames its temp file into place, so if ``<id>.bcd`` is not there
    yet, its committed temp file is taken instead (the creator's rename then
    finds nothing and leaves it).  Returns the ``.deleted`` path to unlink
    after the commit."""
    doomed = final.with_name(final.name + _DELETED_MARK)
    for _ in range(100):
        try:
            os.rename(final, doomed)
            return doomed
        except FileNotFoundError:
            pass
        temps = sorted(final.parent.glob(final.name + _TMP_MARK + "*"))
        if not temps:
            return doomed       # no file at all (left to the operator): drop the row
        try:
            os.rename(temps[0], doomed)
            return doomed
        except FileNotFoundError:
            continue            # the creator renamed it just now: take <id>.bcd
    raise errors.StateError(detail=f"{final.name} keeps changing; retry the delete")


def recover_dir(conn: sqlite3.Connection, d: Path, table: str) -> list[str]:
    """Finish or undo interrupted creates/deletes of the containers in d whose
    rows live in table (``disks`` or ``snapshots``); see the module doc.
    Runs under the database write lock; returns what it did."""
    assert table in ("disks", "snapshots")   # interpolated into SQL below
    try:
        pending = [n for n in os.listdir(d) if _TMP_MARK in n or n.endswith(_DELETED_MARK)]
    except FileNotFoundError:
        return []
    if not pending:
        return []
    actions = []
    with db.write_txn(conn):
        for fname in pending:
            path = d / fname
            if not path.exists():
                continue  # someone else recovered it meanwhile
            obj_id = fname.split(".", 1)[0]
            final = d / f"{obj_id}.bcd"
            has_row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ?",
                                   (obj_id,)).fetchone() is not None
            if _TMP_MARK in fname:
                owner = fname.split(_TMP_MARK, 1)[1].split("-")
                try:
                    pid, start = int(owner[0]), int(owner[1])
                except (IndexError, ValueError):
                    continue  # not ours: leave it
                if proc.process_alive(pid, start):
                    continue  # a create in progress
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"completed creation of {final.name}")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed unfinished {fname}")
                else:  # row and file both exist: a reset/reinit that never swapped
                    path.unlink()
                    actions.append(f"removed unfinished replacement {fname}")
            else:
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"restored {final.name} (delete did not commit)")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed deleted {fname}")
        fsync_dir(d)
    return actions


def check_header_matches(header: container.Header, row: sqlite3.Row, path: Path) -> None:
    """Refuse a container whose identity or encryption contradicts its catalog row.

    The header checksum is not a MAC (docs/FORMAT.md): someone with write access
    could rewrite an encrypted disk's header as unencrypted, and a server would
    then store every later write in plaintext.  The fields of an encrypted
    header that matter to the key (lineage, CMK, geometry) are bound by the
    key context, so tampering with them makes unwrapping fail; the id and the
    encrypted flag are checked here, against the catalog.
    """
    if header.uid_hex != row["id"]:
        raise errors.FormatError(path=str(path), reason=f"its id {header.uid_hex} is not the "
                                 f"catalog's {row['id']} for {row['name']!r}")
    if header.encrypted != bool(row["encrypted"]):
        raise errors.FormatError(
            path=str(path), reason=f"its header says {'en' if header.encrypted else 'un'}"
            f"crypted but the catalog records {row['name']!r} as "
            f"{'en' if row['encrypted'] else 'un'}crypted; the header was tampered with, so "
            "the file is not used")
