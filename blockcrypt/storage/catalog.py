"""The disk catalog: disks, snapshots and attachments, in the shared SQLite database.

The container file header is the source of truth for a disk's geometry and its
wrapped data key; the catalog indexes containers by name and records state
(attachments) and the CMK each container depends on, which the key store
queries before it disables or deletes a key (:func:`key_dependants`).

Paths of containers are stored relative to the blockcrypt home
(``disks/<id>.bcd``), so a home can be moved as a whole.

An attachment row exists while a disk is in use by an nbdkit server (``disk
attach`` or ``disk serve``).  Its ``state`` moves ``attaching`` -> ``attached``
-> ``detaching`` -> (row deleted); ``owner_pid`` is the CLI process changing it
(or, for ``serve``, running the server).  A row whose processes are gone is
stale and is cleaned by the next disk command (see blockcrypt.services.disks).

This module owns these tables and their queries, and the check that a
header agrees with its row (:func:`check_header_matches`); it must not open
containers, nor know of keys beyond a CMK id.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from .db import register_schema
from .home import resolve_inside

if TYPE_CHECKING:
    from .header import Header

SCHEMA = """
CREATE TABLE IF NOT EXISTS disks (
    id              TEXT PRIMARY KEY,          -- container uid, hex
    name            TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL,             -- relative to the home: disks/<id>.bcd
    size_bytes      INTEGER NOT NULL,
    sector_size     INTEGER NOT NULL,
    encrypted       INTEGER NOT NULL,
    cmk_id          TEXT,                      -- NULL for unencrypted disks
    lineage_id      TEXT,
    discard         INTEGER NOT NULL DEFAULT 0,
    source_snapshot_id TEXT,                   -- snapshot it was created from, if any
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    disk_id         TEXT,                      -- source disk (may since be deleted)
    disk_name       TEXT NOT NULL,
    path            TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    sector_size     INTEGER NOT NULL,
    encrypted       INTEGER NOT NULL,
    cmk_id          TEXT,
    lineage_id      TEXT,
    created_at      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attachments (
    disk_id         TEXT PRIMARY KEY REFERENCES disks(id),
    state           TEXT NOT NULL,             -- 'attaching' | 'attached' | 'detaching'
    owner_pid       INTEGER,                   -- CLI process changing the row / running serve
    owner_start     INTEGER,                   -- its start time (ticks since boot): pid reuse guard
    device          TEXT,                      -- /dev/nbdN or /dev/loopN (NULL for serve)
    method          TEXT NOT NULL,             -- 'nbd-client' | 'nbdfuse-loop' | 'serve'
    read_only       INTEGER NOT NULL,
    nbdkit_pid      INTEGER,
    helper_pid      INTEGER,                   -- nbdfuse pid, if any
    run_dir         TEXT NOT NULL,
    socket          TEXT,                      -- NBD socket (unix path) or tcp HOST:PORT
    control_socket  TEXT,                      -- nbdkit pause filter control socket
    attached_at     TEXT NOT NULL
)
"""
register_schema("catalog", SCHEMA)

DISK_COLUMNS = ("id", "name", "path", "size_bytes", "sector_size", "encrypted", "cmk_id",
                "lineage_id", "discard", "source_snapshot_id", "created_at")
SNAPSHOT_COLUMNS = ("id", "name", "disk_id", "disk_name", "path", "size_bytes", "sector_size",
                    "encrypted", "cmk_id", "lineage_id", "created_at")
ATTACHMENT_COLUMNS = ("disk_id", "state", "owner_pid", "owner_start", "device", "method",
                      "read_only", "nbdkit_pid", "helper_pid", "run_dir", "socket",
                      "control_socket", "attached_at")


def key_dependants(conn: sqlite3.Connection, key_id: str) -> list[str]:
    """Disks and snapshots whose data key is wrapped by key_id, as 'disk NAME' / 'snapshot NAME'."""
    rows = conn.execute(
        "SELECT 'disk ' || name AS d FROM disks WHERE cmk_id = ? "
        "UNION ALL SELECT 'snapshot ' || name FROM snapshots WHERE cmk_id = ? ORDER BY 1",
        (key_id, key_id)).fetchall()
    return [r[0] for r in rows]


def key_inventory(conn: sqlite3.Connection, key_id: str) -> list[dict]:
    """The disks and snapshots whose data key is wrapped by key_id, with their container
    uid and lineage (what a crypto-shred record lists)."""
    rows = conn.execute(
        "SELECT 'disk' AS kind, name, id, lineage_id, created_at FROM disks WHERE cmk_id = ? "
        "UNION ALL SELECT 'snapshot', name, id, lineage_id, created_at FROM snapshots "
        "WHERE cmk_id = ? ORDER BY 1, 2", (key_id, key_id)).fetchall()
    return [{"kind": r[0], "name": r[1], "uid": r[2], "lineage_id": r[3],
             "created_at": r[4]} for r in rows]


def check_header_matches(header: Header, row: sqlite3.Row, path: Path) -> None:
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


def check_backup_matches(header: Header, row: sqlite3.Row, file: Path) -> None:
    """Refuse a header backup (`disk header-restore`) that is not of the disk in ``row``:
    its id, lineage, encryption, CMK and geometry must be the catalog's."""
    mine = {"id": row["id"], "lineage": row["lineage_id"], "encrypted": bool(row["encrypted"]),
            "CMK": row["cmk_id"], "size": row["size_bytes"], "sector size": row["sector_size"]}
    theirs = {"id": header.uid_hex, "lineage": header.lineage_hex,
              "encrypted": header.encrypted, "CMK": header.cmk_id, "size": header.size_bytes,
              "sector size": header.sector_size}
    wrong = [f"its {k} is {theirs[k]}, the disk's is {v}" for k, v in mine.items()
             if theirs[k] != v]
    if wrong:
        raise errors.HeaderBackupMismatch(file=str(file), name=row["name"],
                                          reason="; ".join(wrong))


# -- disks ----------------------------------------------------------------------

def get_disk(conn: sqlite3.Connection, name: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM disks WHERE name = ?", (name,)).fetchone()


def get_disk_by_id(conn: sqlite3.Connection, disk_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM disks WHERE id = ?", (disk_id,)).fetchone()


def list_disks(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT * FROM disks ORDER BY name").fetchall()


def _insert(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], what: str,
            row: dict) -> None:
    """INSERT row into table; ValueError names any key that is not one of columns
    (the keys are interpolated into the SQL, so only known column names pass)."""
    unknown = set(row) - set(columns)
    if unknown:
        raise ValueError(f"unknown {what} columns {sorted(unknown)}")
    cols = ", ".join(row)
    marks = ", ".join("?" for _ in row)
    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))


def insert_disk(conn: sqlite3.Connection, **row) -> None:
    """Insert a disk row (call inside db.write_txn); keys are DISK_COLUMNS."""
    _insert(conn, "disks", DISK_COLUMNS, "disk", row)


def set_disk_size(conn: sqlite3.Connection, disk_id: str, size_bytes: int) -> None:
    """Record a disk's new size after a resize (call inside db.write_txn)."""
    conn.execute("UPDATE disks SET size_bytes = ? WHERE id = ?", (size_bytes, disk_id))


def delete_disk(conn: sqlite3.Connection, disk_id: str) -> None:
    conn.execute("DELETE FROM disks WHERE id = ?", (disk_id,))


# -- snapshots --------------------------------------------------------------------

def insert_snapshot(conn: sqlite3.Connection, **row) -> None:
    """Insert a snapshot row (call inside db.write_txn); keys are SNAPSHOT_COLUMNS."""
    _insert(conn, "snapshots", SNAPSHOT_COLUMNS, "snapshot", row)


# -- attachments --------------------------------------------------------------

def home_of(conn: sqlite3.Connection) -> Path:
    """The blockcrypt home: the folder of the database file ``conn`` opened."""
    return Path(conn.execute("PRAGMA database_list").fetchone()[2]).parent


def _checked(conn: sqlite3.Connection, att: sqlite3.Row | None) -> sqlite3.Row | None:
    """An attachment row whose run directory (removed by teardown) and control socket
    lie in ``<home>/run/``; CatalogTampered otherwise.  (A serve socket may be anywhere
    the user chose; teardown removes it only if it is a socket.)"""
    if att is not None:
        home = home_of(conn)
        what = f"the run directory of disk id {att['disk_id']}"
        run_dir = resolve_inside(home, att["run_dir"], ("run",), what)
        if att["control_socket"]:
            resolve_inside(home, att["control_socket"], (str(run_dir.relative_to(
                home.resolve())),), f"the control socket of disk id {att['disk_id']}")
    return att


def get_attachment(conn: sqlite3.Connection, disk_id: str) -> sqlite3.Row | None:
    return _checked(conn, conn.execute("SELECT * FROM attachments WHERE disk_id = ?",
                                       (disk_id,)).fetchone())


def list_attachments(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return [_checked(conn, a) for a in conn.execute("SELECT * FROM attachments").fetchall()]


def insert_attachment(conn: sqlite3.Connection, **row) -> None:
    """Insert an attachment row (inside db.write_txn); keys are ATTACHMENT_COLUMNS.

    The PRIMARY KEY on disk_id makes a second claim on the same disk fail with
    sqlite3.IntegrityError: at most one attachment per disk, whatever races.
    """
    _insert(conn, "attachments", ATTACHMENT_COLUMNS, "attachment", row)


def update_attachment(conn: sqlite3.Connection, disk_id: str, **changes) -> None:
    unknown = set(changes) - set(ATTACHMENT_COLUMNS)
    if unknown or not changes:
        raise ValueError(f"bad attachment columns {sorted(unknown) or '(none)'}")
    sets = ", ".join(f"{c} = ?" for c in changes)
    conn.execute(f"UPDATE attachments SET {sets} WHERE disk_id = ?",
                 (*changes.values(), disk_id))


def delete_attachment(conn: sqlite3.Connection, disk_id: str) -> None:
    conn.execute("DELETE FROM attachments WHERE disk_id = ?", (disk_id,))
