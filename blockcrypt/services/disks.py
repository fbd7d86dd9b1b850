"""The disk service: create, list, show and delete disks; the facade the CLI calls
for attach, detach, serve and copy as well.

A disk is a container file ``<home>/disks/<id>.bcd`` (see docs/FORMAT.md) plus a
row in the catalog.  An encrypted disk's data key (DK) exists in plaintext only
in this process while it is being generated or unwrapped, and in the nbdkit
process serving the disk; it is never written to argv, the environment, a log
or a file.

Owns: the disk rows and the crash safety of create and delete.  Containers are
reached only through ``self.store``, a :class:`~blockcrypt.storage.store.Store`
(today :class:`~blockcrypt.storage.file_store.FileStore`), so another store can
be added without touching the services.  It delegates attachments to
:mod:`blockcrypt.services.attach` (claim, attach, detach, stale cleanup),
``disk serve`` to :mod:`blockcrypt.services.serve` and ``disk copy`` to
:mod:`blockcrypt.services.copy`; snapshots, reset and reinit are
:mod:`blockcrypt.services.snapshots`.

Crash safety of create and delete (no orphan rows, no orphan files)
-----------------------------------------------------------------------
create: 1. write the container to ``disks/<id>.bcd.tmp-<pid>-<start>`` (fsynced);
        2. insert the catalog row (a committed transaction);
        3. rename the file to ``disks/<id>.bcd`` and fsync the directory.
delete: 1. in one write transaction: rename ``<id>.bcd`` to ``<id>.bcd.deleted``
           (or, if a create committed but has not renamed yet, its temp file:
           ``Store.doom``; the creator's rename then finds nothing, ``Store.publish``),
           delete the row, commit;
        2. unlink ``<id>.bcd.deleted``.
Snapshots (blockcrypt.services.snapshots) follow the same scheme under ``snapshots/``.
So a ``<id>.bcd`` file always has a committed row, and recovery
(:meth:`DiskService.recover_files`, run by every disk command, under the
database write lock; implemented by :mod:`blockcrypt.storage.publish`) only ever
acts on the two marker names:
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

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import errors, names
from ..constants import DEFAULT_SECTOR_SIZE, utc_timestamp
from ..crypto.secret import Secret
from ..storage import catalog, db, header_backup, stores
from ..storage.header import ID_BYTES, Header, Kind, key_context, new_header
from ..storage.rbd_store import RbdLoc
from ..storage.store import Store
from ..storage.stores import Stores
from ..testing.crashpoints import crashpoint
from . import copy as copy_service
from . import resize as resize_service
from . import serve as serve_service
from .attach import Attachments
from .boundary import audited, record


@contextlib.contextmanager
def publishing(store: Store, final: Path, *, after_commit: str) -> Iterator[Path]:
    """The crash-safe create of a new container (see the module doc).

    The block gets the staging location, builds the container there and commits
    its catalog row.  If the block fails, the staged container is discarded; once
    it succeeds: crash point ``after_commit``, then the container is published
    under ``final`` (a delete that came in meanwhile has already taken it).
    """
    staged = store.staging(final)
    try:
        yield staged
    except BaseException:
        store.discard(staged)
        raise
    crashpoint(after_commit)
    store.publish(staged, final)


class DiskService:
    """Disk operations on one home.

    ``conn`` is the catalog's SQLite connection; ``keys`` is the
    :class:`~blockcrypt.kms.provider.KeyProvider` that wraps and unwraps data
    keys (the services never read key tables themselves).  ``store`` keeps the
    containers (:class:`~blockcrypt.storage.stores.Stores`: files under the home,
    RBD pools).  ``attachments`` (:class:`~blockcrypt.services.attach.Attachments`)
    holds the attachment rules and reads ``conn`` from here, so the one
    connection ``serve`` replaces is seen by both.
    """

    def __init__(self, home, conn: sqlite3.Connection, keys):
        self.home = home
        self.keys = keys
        self.conn: sqlite3.Connection = conn
        self.store: Stores = Stores(home.path, lambda: self.conn)
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
        """Where the store keeps the disk's container."""
        return self.store.locate(disk["path"], owner=f"disk {disk['name']!r}")

    def volume_params(self, disk: sqlite3.Row, *, break_lock: bool = False) -> list[str] | None:
        """The plugin parameters serving a disk that is not a file (an RBD image: the
        store's conf, pool, client and keyring paths, never a key); None for a file."""
        loc = self.path_of(disk)
        if not isinstance(loc, RbdLoc):
            return None
        cfg = stores.get(self.conn, loc.store)
        params = [f"rbd-store={cfg.name}", f"rbd-conf={cfg.conf}", f"rbd-pool={cfg.pool}",
                  f"rbd-client={cfg.client_id}", f"rbd-image={loc.image}",
                  f"rbd-io-timeout={cfg.io_timeout_s}", f"disk={disk['name']}",
                  f"home={self.home.path}"]
        if cfg.keyring is not None:
            params.append(f"rbd-keyring={cfg.keyring}")
        if break_lock:
            params.append("break-lock=true")
        return params

    def holder(self, disk: sqlite3.Row) -> str | None:
        """Who serves the disk from another host (an RBD image's lock holder), or None."""
        loc = self.path_of(disk)
        if not isinstance(loc, RbdLoc):
            return None
        return self.store.named(loc.store).holder(loc)

    def run_dir_of(self, name: str) -> Path:
        return self.home.run_dir / name

    def read_header(self, disk: sqlite3.Row) -> Header:
        """The disk's container header, checked against its catalog row."""
        path = self.path_of(disk)
        if isinstance(path, RbdLoc) and not self.store.exists(path):
            self.recover_files()    # now that its store is open: a killed create's image
        if not self.store.exists(path):
            if catalog.get_disk_by_id(self.conn, disk["id"]) is None:
                raise errors.DiskNotFound(name=disk["name"])    # deleted meanwhile
            if isinstance(path, RbdLoc):
                raise errors.ImageMissing(image=path.image, owner=f"disk {disk['name']!r}",
                                          store=path.store)
            raise errors.NotFound(what="container file", name=str(path))
        header = self.store.read_header(path)
        catalog.check_header_matches(header, disk, path)
        return header

    def unwrap(self, disk: sqlite3.Row, header: Header) -> Secret | None:
        """The plaintext DK of an encrypted disk (caller wipes), None if unencrypted.
        Key state is checked first so a disabled key fails before any work."""
        if not header.encrypted:
            return None
        self.keys.check_usable(header.cmk_id)
        return self.keys.decrypt_data_key(header.wrapped_dk, key_context(header))

    # -- crash recovery of create/delete ---------------------------------------------
    def recover_files(self) -> list[str]:
        """Finish or undo interrupted creates/deletes (see module doc) and resizes
        (:func:`blockcrypt.services.resize.recover`); returns actions."""
        return self.store.recover(self.conn, "disks") + resize_service.recover(self)

    # -- create / list / show / delete ---------------------------------------------------
    @audited("disk-create", "disk:name")
    def create(self, name: str, size_bytes: int, *, encrypted: bool = True,
               key_ref: str | None = None, sector_size: int = DEFAULT_SECTOR_SIZE,
               discard: bool = False, store: str | None = None) -> dict:
        """Create a disk; returns its description (as :meth:`show`).

        ``store``: the store it goes to (default: files under the home); the store is
        reached and checked before a data key is made.
        Every argument is validated before anything is written.  An encrypted
        disk gets a fresh DK from the key store, wrapped by key_ref (default:
        the service key) under a context binding this container's identity.
        """
        names.validate_name(name)
        names.check_sector_size(sector_size)
        names.check_size(size_bytes, sector_size)
        # The container's own limit (data offset + size < 2^63), checked before the
        # key store is touched (the service key is created on first use).
        new_header(Kind.DISK, size_bytes, sector_size, encrypted=False)
        if key_ref is not None and not encrypted:
            raise errors.InvalidInput(detail="--key names the CMK of an encrypted disk; "
                                             "it cannot be used with --no-encrypted")
        target = self.store.named(store)
        self.recover_files()
        if catalog.get_disk(self.conn, name) is not None:
            raise errors.AlreadyExists(what="disk", name=name)
        target.check()
        self.home.create_dirs()

        uid = os.urandom(ID_BYTES)
        if encrypted:
            lineage = os.urandom(ID_BYTES)  # a data key's lineage; unencrypted disks have none
            key = self.keys.get_key(key_ref) if key_ref else self.keys.default_key()
            header = new_header(Kind.DISK, size_bytes, sector_size, encrypted=True, uid=uid,
                                cmk_id=key["id"], lineage_id=lineage)
            dk, wrapped = self.keys.generate_data_key(key["id"], key_context(header))
            dk.wipe()  # create needs only the wrapped form
            header = header.replace(wrapped_dk=wrapped,
                                    cmk_version=self.keys.key_version_of(wrapped))
        else:
            header = new_header(Kind.DISK, size_bytes, sector_size, encrypted=False, uid=uid)

        rel_path = target.new_ref("disks", header.uid_hex)
        with publishing(self.store, self.store.locate(rel_path, owner=f"disk {name!r}"),
                        after_commit="disk-create.after-row") as tmp:
            self.store.create(tmp, header)
            crashpoint("disk-create.after-file")
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
        return self.describe(row, None)   # as created (a delete may already follow)

    def describe(self, disk: sqlite3.Row, att: sqlite3.Row | None, stale: bool = False) -> dict:
        out = {
            "name": disk["name"], "id": disk["id"], "path": str(self.path_of(disk)),
            "store": stores.store_name_of(disk["path"]),
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

    @audited("disk-delete", "disk:name")
    def delete(self, name: str) -> None:
        """Delete a disk (refused while attached or served): file and row."""
        self.recover_files()
        disk = self.disk_row(name)
        self.cleanup_stale(disk["id"])
        if isinstance(self.path_of(disk), RbdLoc):
            self.store.recover(self.conn, "snapshots")   # a killed snapshot's staged snap
        with db.write_txn(self.conn):
            disk = self.disk_row(name)
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is not None:
                raise self.in_use_error(disk["name"], att)
            from .rbd_snapshots import dependants
            deps = dependants(self, disk)
            if deps:
                raise errors.StateError(detail=f"disk {name!r} has {', '.join(deps)}; "
                                               "delete them first")
            doomed = self.store.doom(self.path_of(disk))
            catalog.delete_disk(self.conn, disk["id"])
            crashpoint("disk-delete.in-txn")
        crashpoint("disk-delete.after-row")
        self.store.remove(doomed)

    @audited("disk-resize", "disk:name")
    def resize(self, name: str, size_bytes: int) -> dict:
        """Grow a disk, detached or attached (:func:`.resize.resize`)."""
        return resize_service.resize(self, name, size_bytes)

    # -- header backup and restore ----------------------------------------------------------
    @audited("disk-header-backup", "disk:name")
    def header_backup(self, name: str, dest: Path) -> dict:
        """Save the disk's header (public fields and the wrapped DK) to a new file dest."""
        disk = self.disk_row(name)
        header = self.read_header(disk)
        header_backup.write(dest, header)
        return {"name": name, "id": header.uid_hex, "file": str(dest), "seq": header.seq}

    @audited("disk-header-restore", "disk:name")
    def header_restore(self, name: str, src: Path) -> dict:
        """Put a header backup of this disk back into its container (detached only).
        Refused, with nothing written, if the backup is of another disk."""
        self.recover_files()
        disk = self.disk_row(name)
        self.attachments.require_free(disk)
        backup = header_backup.read(src)
        catalog.check_backup_matches(backup, disk, src)
        path = self.path_of(disk)
        with self.store.locked(path, exclusive=True) as lock:
            if not lock.held:
                raise errors.StateError(detail=f"disk {name!r} is in use by a program other "
                                               "than blockcrypt; stop it and retry")
            stored = self.store.restore_header(path, backup)
        return {"name": name, "id": stored.uid_hex, "file": str(src), "seq": stored.seq}

    # -- attachments, serve and copy (delegated) ------------------------------------------
    def in_use_error(self, name: str, att: sqlite3.Row) -> errors.DiskAttached:
        return self.attachments.in_use_error(name, att)

    def cleanup_stale(self, disk_id: str | None = None) -> list[str]:
        """Clean stale attachments (all, or one disk's); returns the disk ids cleaned."""
        return self.attachments.cleanup_stale(disk_id)

    @audited("disk-attach", "disk:name")
    def attach(self, name: str, *, read_only: bool = False,
               threads: int | None = None, force: bool = False,
               break_lock: bool = False) -> dict:
        """Attach the disk as a local block device; returns the description.
        ``break_lock``: take an RBD disk over from a dead server of another host
        (audited as ``disk-break-lock``, naming the displaced holder)."""
        return self.attachments.attach(name, read_only=read_only, threads=threads, force=force,
                                       break_lock=break_lock)

    @audited("disk-detach", "disk:name")
    def detach(self, name: str) -> dict:
        """Detach an attached disk; returns {"name", "device", "stale": bool}."""
        return self.attachments.detach(name)

    @audited("disk-serve", "disk:name")
    def serve(self, name: str, *, unix_path: Path | None = None, tcp: str | None = None,
              read_only: bool = False, tls_psk: Path | None = None,
              tls_certificates: Path | None = None,
              insecure_plaintext_tcp: bool = False,
              on_ready: Callable[[dict], None] | None = None,
              threads: int | None = None) -> int:
        """Serve the disk in the foreground until a signal (:func:`.serve.serve`).
        Audited twice: ``disk-serve-started`` once it serves, ``disk-serve`` when it ends."""
        def ready(info: dict) -> None:
            record(self, "disk-serve-started", [("disk", name)],
                   details={k: info[k] for k in ("endpoint", "read_only", "tls", "nbdkit_pid")})
            if on_ready is not None:
                on_ready(info)
        return serve_service.serve(self, name, unix_path=unix_path, tcp=tcp,
                                   read_only=read_only, tls_psk=tls_psk,
                                   tls_certificates=tls_certificates,
                                   insecure_plaintext_tcp=insecure_plaintext_tcp,
                                   on_ready=ready, threads=threads)

    @audited("disk-copy", "disk:src_name", "disk:dst_name")
    def copy(self, src_name: str, dst_name: str, *, progress: bool = False) -> dict:
        """Copy SRC's files onto DST, both detached (:func:`.copy.copy_files`)."""
        return copy_service.copy_files(self, src_name, dst_name, progress=progress)
