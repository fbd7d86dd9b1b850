"""The store service: `blockcrypt store add/list/show/remove`.

A store is where disks live besides the home's files: today a Ceph RBD pool
(:mod:`blockcrypt.storage.stores`).  ``add`` reaches the cluster with the given
conf and cephx user and checks the pool before anything is recorded; ``remove``
is refused while a disk or snapshot lives in the store.  Each operation is
audited (:mod:`.boundary`).

Owns no table of its own (the ``stores`` rows are storage's); never reads a key.
"""
from __future__ import annotations

import os
import sqlite3

from .. import errors, names
from ..storage import db, stores
from ..storage.ceph import MAX_IO_TIMEOUT_S, SERVE_OSD_TIMEOUT_S, StoreConfig
from .boundary import audited


class StoreService:
    def __init__(self, home, conn: sqlite3.Connection):
        self.home = home
        self.conn = conn

    @audited("store-add", "store:name")
    def add(self, name: str, *, type_: str, conf: str, pool: str, client_id: str = "admin",
            keyring: str | None = None, io_timeout_s: int = SERVE_OSD_TIMEOUT_S) -> dict:
        names.validate_name(name, "store")
        if type_ not in stores.STORE_TYPES:
            raise errors.InvalidInput(detail=f"unknown store type {type_!r}; "
                                             f"known: {', '.join(stores.STORE_TYPES)}")
        names.validate_name(pool, "pool")
        names.validate_name(client_id, "Ceph client")
        if (not isinstance(io_timeout_s, int) or isinstance(io_timeout_s, bool)
                or not 1 <= io_timeout_s <= MAX_IO_TIMEOUT_S):
            raise errors.InvalidInput(detail=f"--io-timeout must be 1-{MAX_IO_TIMEOUT_S} "
                                             f"seconds, got {io_timeout_s!r}")
        cfg = StoreConfig(name=name, conf=os.path.abspath(conf), pool=pool, client_id=client_id,
                          keyring=os.path.abspath(keyring) if keyring else None,
                          io_timeout_s=io_timeout_s)
        stores.add_store(self.conn, cfg)
        return self.show(name)

    def _describe(self, row: sqlite3.Row) -> dict:
        return {"name": row["name"], "type": row["type"], "conf": row["conf"],
                "pool": row["pool"], "client_id": row["client_id"], "keyring": row["keyring"],
                "io_timeout_s": row["io_timeout_s"],
                "created_at": row["created_at"], "used_by": stores.users(self.conn, row["name"])}

    def list(self) -> list[dict]:
        return [self._describe(r) for r in stores.rows(self.conn)]

    def show(self, name: str) -> dict:
        names.validate_name(name, "store")
        stores.get(self.conn, name)
        return next(d for d in self.list() if d["name"] == name)

    @audited("store-remove", "store:name")
    def remove(self, name: str) -> None:
        names.validate_name(name, "store")
        with db.write_txn(self.conn):
            stores.get(self.conn, name)
            used = stores.users(self.conn, name)
            if used:
                raise errors.StateError(
                    detail=f"store {name!r} still holds {', '.join(used)}; delete them (or "
                           "`blockcrypt disk delete` them on this host) first")
            stores.delete(self.conn, name)
