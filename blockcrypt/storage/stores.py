"""The disk stores of a home: the ``stores`` table and the registry the services
use to reach the store of any catalog row.

Files under the home are the default store (no row).  Every other store is a row
of ``stores`` (today only ``type = 'rbd'``: a Ceph pool reached through a
ceph.conf and a cephx user whose keyring file stays where the administrator put
it, 0600; no key is ever recorded).  A disk or snapshot row's ``path`` names its
store: ``disks/<id>.bcd`` is a file, ``rbd:<store>/<image>`` an RBD image.

:class:`Stores` is itself a :class:`~blockcrypt.storage.store.Store`: locations
it returns are a :class:`pathlib.Path` (file) or an
:class:`~blockcrypt.storage.rbd_store.RbdLoc`, and each method goes to the store
that owns the location, so the services keep calling ``self.store.X(loc)``.
:meth:`Stores.named` is the store a new container goes to.

This module owns the ``stores`` table; it must not touch disks or keys.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

from .. import errors, names
from ..constants import utc_timestamp
from . import db
from .ceph import StoreConfig
from .db import register_schema
from .file_store import FileStore
from .header import Header
from .rbd_store import RbdLoc, RbdStore, parse_ref
from .store import ContainerLock, Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS stores (
    name            TEXT PRIMARY KEY,
    type            TEXT NOT NULL,             -- 'rbd'
    conf            TEXT NOT NULL,             -- ceph.conf path
    pool            TEXT NOT NULL,
    client_id       TEXT NOT NULL,             -- cephx user client.<id>
    keyring         TEXT,                      -- keyring file path (0600), NULL: the conf's
    io_timeout_s    INTEGER NOT NULL DEFAULT 30, -- a served disk's OSD operation bound
    created_at      TEXT NOT NULL
)
"""
register_schema("stores", SCHEMA)

FILE_STORE = "file"     # the name of the default store in listings
STORE_TYPES = ("rbd",)


def _config(row: sqlite3.Row) -> StoreConfig:
    return StoreConfig(name=row["name"], conf=row["conf"], pool=row["pool"],
                       client_id=row["client_id"], keyring=row["keyring"],
                       io_timeout_s=row["io_timeout_s"])


def get(conn: sqlite3.Connection, name: str) -> StoreConfig:
    """The store ``name``; DiskStoreNotFound if there is none."""
    row = conn.execute("SELECT * FROM stores WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise errors.DiskStoreNotFound(name=name)
    return _config(row)


def rows(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM stores ORDER BY name").fetchall()


def insert(conn: sqlite3.Connection, cfg: StoreConfig, type_: str = "rbd") -> None:
    """Record a store (call inside db.write_txn); AlreadyExists if the name is taken."""
    if conn.execute("SELECT 1 FROM stores WHERE name = ?", (cfg.name,)).fetchone():
        raise errors.AlreadyExists(what="store", name=cfg.name)
    conn.execute("INSERT INTO stores (name, type, conf, pool, client_id, keyring, "
                 "io_timeout_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (cfg.name, type_, cfg.conf, cfg.pool, cfg.client_id, cfg.keyring,
                  cfg.io_timeout_s, utc_timestamp()))


def delete(conn: sqlite3.Connection, name: str) -> None:
    conn.execute("DELETE FROM stores WHERE name = ?", (name,))


def users(conn: sqlite3.Connection, name: str) -> list[str]:
    """The disks and snapshots kept in store ``name``, as 'disk NAME' / 'snapshot NAME'."""
    like = f"rbd:{name}/%"
    return [r[0] for r in conn.execute(
        "SELECT 'disk ' || name FROM disks WHERE path LIKE ? "
        "UNION ALL SELECT 'snapshot ' || name FROM snapshots WHERE path LIKE ? ORDER BY 1",
        (like, like)).fetchall()]


def store_name_of(ref: str) -> str:
    """The store a catalog reference is in (``file`` for the home's files)."""
    parsed = parse_ref(ref)
    return parsed[0] if parsed else FILE_STORE


class Stores(Store):
    """Every store of a home, behind one :class:`Store` (see the module doc)."""

    def __init__(self, root: Path | str, conn_source: Callable[[], sqlite3.Connection]):
        self.files = FileStore(root)
        self._conn_source = conn_source   # the services' current connection (serve swaps it)
        self._rbd: dict[str, RbdStore] = {}

    def __repr__(self) -> str:
        return f"Stores({str(self.files.root)!r}, rbd={sorted(self._rbd)})"

    # -- the registry ------------------------------------------------------------------
    def named(self, name: str | None) -> Store:
        """The store called ``name`` (None or ``file``: the home's files)."""
        if name is None or name == FILE_STORE:
            return self.files
        names.validate_name(name, what="store")
        if name not in self._rbd:
            self._rbd[name] = RbdStore(get(self._conn_source(), name))
        return self._rbd[name]

    def for_ref(self, ref: str) -> Store:
        return self.named(store_name_of(ref))

    def _of(self, loc) -> Store:
        if isinstance(loc, RbdLoc):
            return self.named(loc.store)
        if isinstance(loc, ContainerLock) and hasattr(loc, "loc"):
            return self.named(loc.loc.store)
        return self.files

    def close(self) -> None:
        for store in self._rbd.values():
            store.close()
        self._rbd.clear()

    # -- the Store contract, dispatched -----------------------------------------------
    def new_ref(self, table: str, obj_id: str) -> str:
        return self.files.new_ref(table, obj_id)

    def locate(self, ref: str, *, owner: str = "a container"):
        return self.for_ref(ref).locate(ref, owner=owner)

    def staging(self, final):
        return self._of(final).staging(final)

    def exists(self, loc) -> bool:
        return self._of(loc).exists(loc)

    def allocated_bytes(self, loc) -> int:
        return self._of(loc).allocated_bytes(loc)

    def read_header(self, loc, *, repair: bool = True) -> Header:
        return self._of(loc).read_header(loc, repair=repair)

    def write_header(self, loc, header: Header) -> Header:
        return self._of(loc).write_header(loc, header)

    def restore_header(self, loc, header: Header) -> Header:
        return self._of(loc).restore_header(loc, header)

    def reserve(self, loc, header: Header) -> None:
        self._of(loc).reserve(loc, header)

    def grow(self, loc, header: Header) -> Header:
        return self._of(loc).grow(loc, header)

    def create(self, staged, header: Header) -> Header:
        return self._of(staged).create(staged, header)

    def clone(self, src, dst) -> str:
        store = self._of(dst)
        if self._of(src) is not store:
            raise errors.InvalidInput(detail=f"copying a container from {src} to {dst} "
                                             "(another store) is not supported yet")
        return store.clone(src, dst)

    def export(self, loc, dest: Path, *, offset: int, length: int) -> str:
        return self._of(loc).export(loc, dest, offset=offset, length=length)

    def publish(self, staged, final) -> bool:
        return self._of(final).publish(staged, final)

    def swap(self, staged, final) -> None:
        self._of(final).swap(staged, final)

    def discard(self, staged) -> None:
        self._of(staged).discard(staged)

    def pending(self, final) -> bool:
        return self._of(final).pending(final)

    def doom(self, final):
        return self._of(final).doom(final)

    def remove(self, doomed) -> None:
        self._of(doomed).remove(doomed)

    def recover(self, conn: sqlite3.Connection, table: str) -> list[str]:
        """The files' recovery, then that of every RBD store this command uses
        (:meth:`named` already called: ``disk list`` never waits for a cluster); for
        ``snapshots`` (snapshot commands), of every store holding a disk, whose image
        may carry a killed ``snapshot create``'s staged snapshot (best effort for those:
        a cluster that cannot be reached fails only the commands that use it)."""
        actions = self.files.recover(conn, table)
        used = set(self._rbd)
        if table == "snapshots":
            for (ref,) in conn.execute("SELECT path FROM disks WHERE path LIKE 'rbd:%'"):
                try:
                    self.for_ref(ref)
                except errors.BlockcryptError:
                    pass            # the disk's own commands say what is wrong
        for name in sorted(self._rbd):
            try:
                actions += self._rbd[name].recover(conn, table)
            except errors.StorageError:
                if name in used:
                    raise
        return actions

    def locked(self, loc, *, exclusive: bool, timeout_s: float = 0.0):
        return self._of(loc).locked(loc, exclusive=exclusive, timeout_s=timeout_s)


def add_store(conn: sqlite3.Connection, cfg: StoreConfig) -> None:
    """Check that ``cfg`` reaches an RBD pool this user may use, then record it."""
    names.validate_name(cfg.name, what="store")
    if cfg.name == FILE_STORE:
        raise errors.InvalidName(what="store", name=cfg.name,
                                 reason=f"{FILE_STORE!r} is the home's file store")
    with db.write_txn(conn):
        if conn.execute("SELECT 1 FROM stores WHERE name = ?", (cfg.name,)).fetchone():
            raise errors.AlreadyExists(what="store", name=cfg.name)
    store = RbdStore(cfg)
    try:
        store.check()
    finally:
        store.close()
    with db.write_txn(conn):
        insert(conn, cfg)
