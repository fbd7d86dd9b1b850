"""Bring your own key, the store's half: import parameters and importing material.

The cryptography (RSA-4096 wrapping key, token, RSAES-OAEP unwrap) is
:mod:`blockcrypt.kms.byok`; this module keeps the wrapping private key sealed in
``kms_import`` (one pending import per key, replaced by each new request), checks
the token and its 24-hour validity, and turns a PendingImport key into an Enabled
one with version 1 of the imported material.

Must not: accept material for a key that is not an external-origin key waiting
for it (the service key and blockcrypt-made keys never take imported material).
"""
from __future__ import annotations

import hmac

from ... import errors
from .. import byok
from .journal import Facts, Operations
from .rows import label, ref, state_error
from .rules import DISABLED, ENABLED, ORIGIN_EXTERNAL, PENDING_IMPORT, iso, parse_iso


class Imports(Operations):
    """The store side of BYOK (see the module doc)."""

    def get_import_params(self, ref_: str) -> dict:
        """A fresh RSA-4096 wrapping key and a 24-hour import token (replacing older ones)."""
        made: dict = {}

        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            self._check_importable(row)
            if dry:
                if "private" not in made:
                    made["private"], made["pem"] = byok.new_wrapping_key()
                return None
            token = byok.new_token()
            expires_at = iso(self._now() + byok.TOKEN_VALIDITY)
            sealed = self._vault.seal(made["private"].view(), self._vault.import_ad(row["id"]))
            self.conn.execute(
                "INSERT INTO kms_import (key_id, token_sha256, expires_at, public_key_pem,"
                " private_key) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET"
                " token_sha256 = excluded.token_sha256, expires_at = excluded.expires_at,"
                " public_key_pem = excluded.public_key_pem, private_key = excluded.private_key",
                (row["id"], byok.token_digest(token), expires_at, made["pem"], sealed))
            f.details.update(expires_at=expires_at,
                             wrapping_algorithm=byok.WRAPPING_ALGORITHM,
                             wrapping_key_spec=byok.WRAPPING_KEY_SPEC)
            return {"key_id": row["id"], "public_key_pem": made["pem"], "import_token": token,
                    "expires_at": expires_at, "wrapping_algorithm": byok.WRAPPING_ALGORITHM,
                    "wrapping_key_spec": byok.WRAPPING_KEY_SPEC}

        try:
            return self._journal.run("get-import-params", work, needs_kek=True)
        finally:
            if "private" in made:
                made["private"].wipe()

    def import_material(self, ref_: str, wrapped_material: bytes, import_token: str) -> dict:
        """Unwrap RSAES-OAEP-SHA-256-wrapped 32-byte material and enable the key."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            self._check_importable(row)
            imp = self.conn.execute("SELECT * FROM kms_import WHERE key_id = ?",
                                    (row["id"],)).fetchone()
            r = ref(row)
            if imp is None:
                raise errors.ImportTokenError(
                    key_id=label(row),
                    detail=f"it has no import parameters; run `blockcrypt key get-import-params "
                           f"{r} --out-dir DIR` first")
            if (not isinstance(import_token, str) or not hmac.compare_digest(
                    byok.token_digest(import_token), imp["token_sha256"])):
                raise errors.ImportTokenError(
                    key_id=label(row),
                    detail="the import token does not match this key's latest import "
                           f"parameters; use the token from the latest `blockcrypt key "
                           f"get-import-params {r}`")
            if self._now() >= parse_iso(imp["expires_at"]):
                raise errors.ImportTokenError(
                    key_id=label(row),
                    detail=f"the import token expired at {imp['expires_at']}; run `blockcrypt "
                           f"key get-import-params {r} --out-dir DIR` again and wrap the "
                           "material under the new public key")
            if dry:
                return
            private = self._vault.unseal(imp["private_key"], self._vault.import_ad(row["id"]),
                                         f"the import wrapping key of key {row['id']}")
            try:
                material = byok.unwrap_material(private, wrapped_material)
            finally:
                private.wipe()
            with material:
                sealed = self._vault.seal(material.view(), self._vault.material_ad(row["id"], 1))
            t = iso(self._now())
            self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, "
                              "material) VALUES (?, 1, ?, ?)", (row["id"], t, sealed))
            self.conn.execute("UPDATE kms_keys SET state = ?, last_rotated_at = ? WHERE id = ?",
                              (ENABLED, t, row["id"]))
            self.conn.execute("DELETE FROM kms_import WHERE key_id = ?", (row["id"],))
            f.key_version = 1

        self._journal.run("import", work, needs_kek=True)
        return self._rows.describe(self._rows.row(ref_))

    @staticmethod
    def _check_importable(row) -> None:
        if row["service"]:
            raise errors.ServiceKeyProtected(key_id=f"key {row['id']}", action="imported into")
        if row["origin"] != ORIGIN_EXTERNAL:
            raise errors.KeyStateError(
                key_id=label(row), state="a blockcrypt-generated key (origin blockcrypt)",
                detail="only keys made with `blockcrypt key create --origin external` take "
                       "imported material")
        if row["state"] == ENABLED or row["state"] == DISABLED:
            raise state_error(row, "take imported material",
                              "its material was imported already and cannot be replaced")
        if row["state"] != PENDING_IMPORT:
            raise state_error(row, "take imported material")
