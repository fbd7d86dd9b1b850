"""Reading keys: lookup by id or alias, and how a key (or a refusal about it) is described.

Owns the key description dict that ``key show`` / ``key list`` print and the
services read (:meth:`KeyRows.describe`), the names a key goes by in messages,
and the :class:`~blockcrypt.errors.KeyStateError` that names the next step for
each state.  Which disks and snapshots depend on a key is not known here: the
store is given a :data:`Dependants` callable (the CLI passes
:func:`blockcrypt.storage.catalog.key_dependants`), so the key store never imports
the disk catalog.

Must not: write to the database or touch key material.
"""
from __future__ import annotations

import sqlite3
from datetime import timedelta
from typing import Callable

from ... import errors
from .rules import DESTROYED, DISABLED, ENABLED, PENDING_DELETION, PENDING_IMPORT, iso, parse_iso

Dependants = Callable[[sqlite3.Connection, str], list[str]]
"""``dependants(conn, key_id)``: what uses a key, as ``"disk NAME"`` / ``"snapshot NAME"``
strings, read through the store's own connection (so inside its transaction)."""


def no_dependants(conn: sqlite3.Connection, key_id: str) -> list[str]:
    """The default for a store opened without a catalog: it knows of no dependants."""
    return []


def ref(row) -> str:
    """What to type to name the key: its alias, else its id."""
    return row["alias"] or row["id"]


def label(row) -> str:
    """The key in a message: its id, and its alias if it has one."""
    return f"{row['id']} (alias {row['alias']})" if row["alias"] else row["id"]


def state_error(row, action: str, next_step: str | None = None) -> errors.KeyStateError:
    """The key cannot do ``action`` in its state; say what to run instead."""
    r = ref(row)
    if next_step is None:
        next_step = {
            ENABLED: "it is Enabled already",
            DISABLED: f"run `blockcrypt key enable {r}` first",
            PENDING_DELETION:
                f"it will be destroyed on {row['deletion_date']}; run `blockcrypt key "
                f"cancel-deletion {r}` and `blockcrypt key enable {r}` to use it again",
            PENDING_IMPORT:
                f"it has no key material yet; run `blockcrypt key get-import-params {r} "
                f"--out-dir DIR`, then `blockcrypt key import {r} --material FILE "
                "--token FILE`",
            DESTROYED:
                f"its material was destroyed on {row['destroyed_at']}; data wrapped by it "
                "cannot be recovered",
        }.get(row["state"], "this blockcrypt does not know that state: the key store "
                            "(blockcrypt.db in the home) was edited or written by a newer "
                            "blockcrypt; upgrade blockcrypt or restore blockcrypt.db from "
                            "a backup")
    return errors.KeyStateError(key_id=label(row), state=row["state"],
                                detail=f"it cannot {action}; {next_step}")


class KeyRows:
    """Lookups in ``kms_keys`` and the description of a key."""

    def __init__(self, conn: sqlite3.Connection, dependants: Dependants,
                 inventory: Callable | None = None):
        self.conn = conn
        self._dependants = dependants
        self.inventory = inventory
        """What the shred record lists (:data:`.shred.Inventory`), if the store was given it."""

    def row(self, ref) -> sqlite3.Row:
        """A key by id or alias (KeyNotFound otherwise)."""
        if not isinstance(ref, str) or not ref:
            raise errors.KeyNotFound(name=ref)
        row = self.by_id(ref)
        if row is None:
            row = self.find_alias(ref)
        if row is None:
            raise errors.KeyNotFound(name=ref)
        return row

    def by_id(self, key_id: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM kms_keys WHERE id = ?", (key_id,)).fetchone()

    def find_alias(self, alias: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM kms_keys WHERE alias = ?", (alias,)).fetchone()

    def all(self) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM kms_keys ORDER BY created_at, rowid").fetchall()

    def dependants(self, key_id: str) -> list[str]:
        return self._dependants(self.conn, key_id)

    def describe(self, row) -> dict:
        """The key as ``get_key`` returns it (see :mod:`blockcrypt.kms.provider`)."""
        versions = [{"version": v["version"], "created_at": v["created_at"],
                     "destroyed": v["material"] is None}
                    for v in self.conn.execute(
                        "SELECT version, created_at, material FROM kms_key_versions "
                        "WHERE key_id = ? ORDER BY version", (row["id"],))]
        live = [v["version"] for v in versions if not v["destroyed"]]
        next_rotation = None
        if row["rotation_period_days"] and row["last_rotated_at"]:
            next_rotation = iso(parse_iso(row["last_rotated_at"])
                                + timedelta(days=row["rotation_period_days"]))
        imp = self.conn.execute("SELECT expires_at FROM kms_import WHERE key_id = ?",
                                (row["id"],)).fetchone()
        prov = self.conn.execute("SELECT provider FROM kms_key_provider WHERE key_id = ?",
                                 (row["id"],)).fetchone()
        imported = self.conn.execute("SELECT material_expires_at FROM kms_imported WHERE "
                                     "key_id = ?", (row["id"],)).fetchone()
        return {
            "id": row["id"], "alias": row["alias"], "description": row["description"],
            "state": row["state"], "origin": row["origin"], "service": bool(row["service"]),
            "provider": prov["provider"] if prov else "local",
            "created_at": row["created_at"],
            "rotation_period_days": row["rotation_period_days"],
            "last_rotated_at": row["last_rotated_at"], "next_rotation_at": next_rotation,
            "deletion_date": row["deletion_date"], "destroyed_at": row["destroyed_at"],
            "current_version": max(live) if live else None,
            "versions": versions,
            "dependants": self.dependants(row["id"]),
            "import_expires_at": imp["expires_at"] if imp else None,
            "material_expires_at": imported["material_expires_at"] if imported else None,
        }
