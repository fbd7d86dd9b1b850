"""State changes nobody asks for: what the clock makes due, done when the store is used.

- Keys whose deletion window has passed are destroyed (material erased, alias
  freed) every time the store is opened; that needs no passphrase.
- Keys whose rotation period has passed get a new version as soon as the KEK is
  unlocked (creating material needs it), before any data key is wrapped.

Each change is its own write transaction with an ``automatic`` audit record, and
is re-checked inside it, so two processes never do it twice.  After erasing
material the WAL is checkpointed so the old sealed material does not linger in
the ``-wal`` file.

Must not: make a state change a user asked for (that is :mod:`.lifecycle`).
"""
from __future__ import annotations

import sqlite3
from datetime import timedelta

from ... import errors
from ...storage.db import write_txn
from . import shred
from .adopt import ORIGIN_SHARED
from .journal import Facts, Operations
from .rules import (
    DESTROYED,
    DISABLED,
    ENABLED,
    ORIGIN_BLOCKCRYPT,
    PENDING_DELETION,
    iso,
    parse_iso,
)


class Maintenance(Operations):
    """Automatic destruction and rotation (see the module doc)."""

    def rotation_due(self, row) -> bool:
        return (row["state"] == ENABLED and row["origin"] == ORIGIN_BLOCKCRYPT
                and row["rotation_period_days"] is not None and row["last_rotated_at"] is not None
                and self._now() >= parse_iso(row["last_rotated_at"])
                + timedelta(days=row["rotation_period_days"]))

    def rotate_due(self, unlocked: bool = True) -> None:
        """Automatic rotation of keys whose period has passed: local keys once the KEK
        is unlocked, keys of other providers (no KEK needed) also when ``unlocked`` is
        False; a provider that cannot be reached is tried again next time."""
        rows = self.conn.execute("SELECT * FROM kms_keys WHERE rotation_period_days IS NOT NULL"
                                 " AND state = ?", (ENABLED,)).fetchall()
        for row in rows:
            if not self.rotation_due(row):
                continue
            try:
                backend = self._backends.for_key(row["id"])
            except errors.BlockcryptError:
                continue
            if backend.needs_kek and not unlocked:
                continue
            try:
                self._rotate_one(row, backend.needs_kek)
            except errors.BlockcryptError:
                if backend.needs_kek:
                    raise
                # token unreachable: the key keeps its current version until next time

    def _rotate_one(self, row, needs_kek: bool) -> None:
        with write_txn(self.conn):
            if needs_kek:
                self._vault.check_current()
            row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?",
                                    (row["id"],)).fetchone()
            if not self.rotation_due(row):
                return  # another process rotated it meanwhile
            version = self._backends.add_version(row["id"], self._now())
            self._journal.append("rotate", Facts(row["id"], version, {
                "automatic": True, "new_version": version,
                "rotation_period_days": row["rotation_period_days"]}), None)

    def expire_imported(self) -> None:
        """Imported material whose ``--expires-at`` has passed goes; the key becomes
        PendingImport (no KEK needed).  A provider that cannot be reached is tried again
        next time; the key is unusable meanwhile only if its state already says so."""
        from .imports import remove_material
        rows = self.conn.execute(
            "SELECT i.key_id, i.material_expires_at FROM kms_imported i JOIN kms_keys k ON "
            "k.id = i.key_id WHERE i.material_expires_at IS NOT NULL AND k.state IN (?, ?)",
            (ENABLED, DISABLED)).fetchall()
        for r in rows:
            if self._now() < parse_iso(r["material_expires_at"]):
                continue
            try:
                with write_txn(self.conn):
                    row = self.conn.execute(
                        "SELECT k.state, i.material_expires_at FROM kms_keys k JOIN "
                        "kms_imported i ON i.key_id = k.id WHERE k.id = ?",
                        (r["key_id"],)).fetchone()
                    if (row["state"] not in (ENABLED, DISABLED) or row["material_expires_at"]
                            is None or self._now() < parse_iso(row["material_expires_at"])):
                        continue
                    remove_material(self, r["key_id"])
                    self._journal.append("expire-material", Facts(r["key_id"], None, {
                        "automatic": True, "material_expires_at": row["material_expires_at"],
                        "previous_state": row["state"]}), None)
            except errors.BlockcryptError:
                pass  # provider unreachable: retried next open

    def destroy_expired(self) -> None:
        """Erase the material of keys whose deletion window has passed (no KEK needed)."""
        rows = self.conn.execute("SELECT id, deletion_date FROM kms_keys WHERE state = ?",
                                 (PENDING_DELETION,)).fetchall()
        due = [r["id"] for r in rows if self._now() >= parse_iso(r["deletion_date"])]
        for key_id in due:
            try:
                self._destroy_one(key_id)
            except errors.BlockcryptError:
                pass  # provider unreachable: the key stays unusable; retried next open
        if due:
            checkpoint(self.conn)

    def _destroy_one(self, key_id: str) -> None:
        with write_txn(self.conn):
            row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?", (key_id,)).fetchone()
            if row["state"] != PENDING_DELETION or self._now() < parse_iso(row["deletion_date"]):
                return
            versions = [r["version"] for r in self.conn.execute(
                "SELECT version FROM kms_key_versions WHERE key_id = ? AND material IS NOT "
                "NULL ORDER BY version", (key_id,))]
            shredded = shred.details(self.conn, row, versions, self._backends.provider_of(key_id),
                                     self._rows.inventory, self._rows.dependants(key_id))
            # The provider's material first (token objects; idempotent), then the catalog's.
            self._backends.destroy(key_id)
            for imp in self.conn.execute("SELECT private_key FROM kms_import WHERE key_id = ?",
                                         (key_id,)).fetchall():
                self._backends.for_key(key_id).destroy_import_key(imp["private_key"])
            self.conn.execute("UPDATE kms_key_versions SET material = NULL WHERE key_id = ?",
                              (key_id,))
            self.conn.execute("DELETE FROM kms_import WHERE key_id = ?", (key_id,))
            # The alias is freed with the key (as in KMS); the audit record keeps it.
            self.conn.execute("UPDATE kms_keys SET state = ?, destroyed_at = ?, alias = NULL"
                              " WHERE id = ?", (DESTROYED, iso(self._now()), key_id))
            self._journal.append("destroy", Facts(key_id, None, {
                "automatic": True, "deletion_date": row["deletion_date"],
                "alias": row["alias"]}), None)
            if row["origin"] != ORIGIN_SHARED:     # a shared key's material lives on
                self._journal.append(shred.SHRED, Facts(key_id, None, shredded), None)


def checkpoint(conn: sqlite3.Connection) -> None:
    """Fold the WAL into the database and truncate it, so replaced sealed material
    does not linger in the -wal file (best effort: readers may hold it)."""
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass
