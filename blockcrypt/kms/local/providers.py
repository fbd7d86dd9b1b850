"""The provider registry of a home: adding, listing, showing and removing key providers.

A provider is a row of ``kms_providers`` (:mod:`blockcrypt.kms.providers_schema`):
a name, a type and its configuration (never a secret).  Adding one first checks
that it works (for ``pkcs11``: the module loads, the token is there and the PIN
file's PIN logs in), so a typo is refused with nothing changed.  Removing one is
refused while keys that are not Destroyed use it, naming them.  Both are audited.
``local`` is built in: always listed, never added or removed.

Must not: touch key states or key material.
"""
from __future__ import annotations

import json

from ... import errors
from ..backend import LOCAL
from ..registry import make_backend, validate_name, validated_config
from .journal import Facts, Operations
from .rows import label
from .rules import DESTROYED, iso


class Providers(Operations):
    """Provider rows and their audit records (see the module doc)."""

    def add(self, name: str, type_: str, options: dict) -> dict:
        def work(f: Facts, dry: bool):
            validate_name(name)
            if self.conn.execute("SELECT 1 FROM kms_providers WHERE name = ?",
                                 (name,)).fetchone():
                raise errors.AlreadyExists(what="key provider", name=name)
            config = validated_config(name, type_, options)
            f.details = {"provider": name, "type": type_, "config": json.loads(config)}
            f.needs_kek = False     # a dry run first (the check below), no passphrase
            if dry:
                make_backend(name, type_, config).check()
                return None
            self.conn.execute("INSERT INTO kms_providers (name, type, config, created_at) "
                              "VALUES (?, ?, ?, ?)", (name, type_, config, iso(self._now())))
            return None

        self._journal.run("provider-add", work, needs_kek=True)
        return self.get(name)

    def _keys_of(self, name: str) -> list:
        return self.conn.execute(
            "SELECT k.* FROM kms_keys k JOIN kms_key_provider p ON p.key_id = k.id "
            "WHERE p.provider = ? ORDER BY k.created_at, k.rowid", (name,)).fetchall()

    def _describe(self, row) -> dict:
        keys = self._keys_of(row["name"])
        return {"name": row["name"], "type": row["type"], "builtin": False,
                "config": json.loads(row["config"]), "created_at": row["created_at"],
                "keys": [{"id": k["id"], "alias": k["alias"], "state": k["state"]}
                         for k in keys]}

    def _local(self) -> dict:
        keys = self.conn.execute(
            "SELECT id, alias, state FROM kms_keys WHERE id NOT IN "
            "(SELECT key_id FROM kms_key_provider) ORDER BY created_at, rowid").fetchall()
        return {"name": LOCAL, "type": LOCAL, "builtin": True, "config": {},
                "created_at": None,
                "keys": [{"id": k["id"], "alias": k["alias"], "state": k["state"]}
                         for k in keys]}

    def get(self, name: str) -> dict:
        if name == LOCAL:
            return self._local()
        row = self.conn.execute("SELECT * FROM kms_providers WHERE name = ?",
                                (name,)).fetchone()
        if row is None:
            raise errors.ProviderNotFound(name=name)
        return self._describe(row)

    def list(self) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM kms_providers ORDER BY created_at, name")
        return [self._local()] + [self._describe(r) for r in rows.fetchall()]

    def remove(self, name: str) -> dict:
        def work(f: Facts, dry: bool):
            f.details = {"provider": name}
            if name == LOCAL:
                raise errors.InvalidInput(detail="the built-in provider 'local' cannot be "
                                                 "removed")
            row = self.conn.execute("SELECT * FROM kms_providers WHERE name = ?",
                                    (name,)).fetchone()
            if row is None:
                raise errors.ProviderNotFound(name=name)
            live = [k for k in self._keys_of(name) if k["state"] != DESTROYED]
            if live:
                raise errors.StateError(
                    detail=f"key provider {name!r} holds the material of "
                           + ", ".join(f"key {label(k)} ({k['state']})" for k in live)
                           + "; schedule their deletion (`blockcrypt key schedule-deletion "
                             "KEY`) and wait until they are Destroyed; nothing was changed")
            self.conn.execute("DELETE FROM kms_providers WHERE name = ?", (name,))
            return self._describe(row)

        return self._journal.run("provider-remove", work)
