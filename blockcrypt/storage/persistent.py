"""Which disks attach whenever the host runs (``disk attach --persistent``), in the catalog.

One row per persistent disk in ``persistent_disks``; the row goes with the disk
(``ON DELETE CASCADE``).  Registered with :mod:`blockcrypt.storage.db` like the
catalog's tables, so a home made before this table existed gains it (empty) the
first time it is opened.  What attaching them at boot means is
:mod:`blockcrypt.services.boot`'s business.
"""
from __future__ import annotations

import sqlite3

from .db import register_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS persistent_disks (
    disk_id     TEXT PRIMARY KEY REFERENCES disks(id) ON DELETE CASCADE,
    read_only   INTEGER NOT NULL DEFAULT 0,
    since       TEXT NOT NULL
)
"""
register_schema("persistent", SCHEMA)


def is_persistent(conn: sqlite3.Connection, disk_id: str) -> bool:
    return conn.execute("SELECT 1 FROM persistent_disks WHERE disk_id = ?",
                        (disk_id,)).fetchone() is not None


def set_persistent(conn: sqlite3.Connection, disk_id: str, persistent: bool, *,
                   read_only: bool = False, since: str = "") -> None:
    """Record (or forget) that a disk is persistent (inside the caller's write txn)."""
    if persistent:
        conn.execute("INSERT INTO persistent_disks (disk_id, read_only, since) VALUES (?, ?, ?)"
                     " ON CONFLICT(disk_id) DO UPDATE SET read_only = excluded.read_only",
                     (disk_id, int(read_only), since))
    else:
        conn.execute("DELETE FROM persistent_disks WHERE disk_id = ?", (disk_id,))


def persistent_disks(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """The persistent disks (disk row columns plus ``persistent_read_only``), by name."""
    return conn.execute("SELECT d.*, p.read_only AS persistent_read_only FROM disks d JOIN "
                        "persistent_disks p ON p.disk_id = d.id ORDER BY d.name").fetchall()
