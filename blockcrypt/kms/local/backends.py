"""Which provider holds each key's material, and handing material operations to it.

The catalog tables are :mod:`blockcrypt.kms.providers_schema`; backends are made
once per open store (:func:`blockcrypt.kms.registry.make_backend`).  A key with no
``kms_key_provider`` row is ``local`` (every key of a home made before providers
existed).  Everything here runs after the catalog has checked the key's state.

Must not: check or change key states, or write audit records.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime

from ... import errors
from ..backend import LOCAL, KeyBackend, LocalBackend
from ..registry import make_backend
from .vault import Vault


class Backends:
    """The backends of one open store, by provider name."""

    def __init__(self, conn: sqlite3.Connection, vault: Vault):
        self.conn = conn
        self._vault = vault
        self._open: dict[str, KeyBackend] = {LOCAL: LocalBackend(vault)}

    def provider_of(self, key_id: str) -> str:
        row = self.conn.execute("SELECT provider FROM kms_key_provider WHERE key_id = ?",
                                (key_id,)).fetchone()
        return row["provider"] if row else LOCAL

    def for_provider(self, name: str) -> KeyBackend:
        backend = self._open.get(name)
        if backend is None:
            row = self.conn.execute("SELECT * FROM kms_providers WHERE name = ?",
                                    (name,)).fetchone()
            if row is None:
                raise errors.ProviderNotFound(name=name)
            backend = self._open[name] = make_backend(row["name"], row["type"], row["config"])
        return backend

    def for_key(self, key_id: str) -> KeyBackend:
        return self.for_provider(self.provider_of(key_id))

    def ref(self, key_id: str, version: int) -> bytes:
        row = self.conn.execute("SELECT material FROM kms_key_versions WHERE key_id = ? AND "
                                "version = ?", (key_id, version)).fetchone()
        if row is None or row["material"] is None:
            raise errors.CryptoError(detail=f"key {key_id} version {version} has no material")
        return bytes(row["material"])

    def add_version(self, key_id: str, now: datetime) -> int:
        """New material (in the key's provider) as its newest version (inside a write
        transaction)."""
        return self._vault.add_version(key_id, now, self.for_key(key_id).new_material)

    def destroy(self, key_id: str) -> None:
        """Destroy the material the key's provider holds (the catalog then erases its
        stored values).  Raises the provider's error if it cannot be reached."""
        refs = [(r["version"], bytes(r["material"])) for r in self.conn.execute(
            "SELECT version, material FROM kms_key_versions WHERE key_id = ? AND material "
            "IS NOT NULL", (key_id,))]
        shared = self.conn.execute("SELECT 1 FROM kms_keys WHERE id = ? AND origin = "
                                   "'shared'", (key_id,)).fetchone()
        if refs and not shared:     # a shared key's objects belong to the host that made it
            self.for_key(key_id).destroy(key_id, refs)

    def close(self) -> None:
        for b in self._open.values():
            b.close()
