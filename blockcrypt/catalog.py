"""The disk catalog: disks, snapshots and attachments, in the shared SQLite database.

The container file header is the source of truth for a disk's geometry and its
wrapped data key; the catalog indexes containers by name and records state
(attachments) and the CMK each container depends on, which the key store
queries before it disables or deletes a key (:func:`key_dependants`).
"""
from __future__ import annotations

import sqlite3

from .db import register_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS disks (
    id              TEXT PRIMARY KEY,          -- container uid, hex
    name            TEXT NOT NULL UNIQUE,
    path            TEXT NOT NULL,
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
    device          TEXT,                      -- /dev/nbdN or /dev/loopN
    method          TEXT NOT NULL,             -- 'nbd-client' | 'nbdfuse-loop' | 'serve'
    read_only       INTEGER NOT NULL,
    nbdkit_pid      INTEGER,
    helper_pid      INTEGER,                   -- nbdfuse pid, if any
    run_dir         TEXT NOT NULL,
    socket          TEXT,
    attached_at     TEXT NOT NULL
)
"""
register_schema("catalog", SCHEMA)


def key_dependants(conn: sqlite3.Connection, key_id: str) -> list[str]:
    """Disks and snapshots whose data key is wrapped by key_id, as 'disk NAME' / 'snapshot NAME'."""
    rows = conn.execute(
        "SELECT 'disk ' || name AS d FROM disks WHERE cmk_id = ? "
        "UNION ALL SELECT 'snapshot ' || name FROM snapshots WHERE cmk_id = ? ORDER BY 1",
        (key_id, key_id)).fetchall()
    return [r[0] for r in rows]
