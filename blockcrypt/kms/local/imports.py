"""Bring your own key, the catalog's half: import parameters, importing material, its
expiry and its deletion.

The cryptography is the key's provider backend's (:mod:`blockcrypt.kms.backend`:
``local`` makes an RSA-4096 wrapping key and seals it under the KEK, ``pkcs11``
generates an RSA key pair in the token; :mod:`blockcrypt.kms.byok` has the token
and OAEP helpers).  This module keeps the pending import in ``kms_import`` (one
per key, replaced by each new request, the older wrapping key destroyed), checks
the import token and its 24-hour validity, and turns a PendingImport key into an
Enabled one with version 1 of the imported material.

Imported material may expire (``key import --expires-at``) or be deleted
(``key delete-imported-material``): the material goes (sealed value erased, or
token object destroyed), the key becomes PendingImport and unwraps nothing, and
disks already attached keep running (their DK is in nbdkit).  Importing the
*same* material again (its key check value, kept in ``kms_imported``, must match)
brings the key back as version 1, so its disks attach again.

Must not: accept material for a key that is not an external-origin key waiting
for it (the service key and blockcrypt-made keys never take imported material),
or material other than the key's original material once it had some.
"""
from __future__ import annotations

import hmac
from datetime import datetime

from ... import errors
from .. import byok
from ..backend import check_value
from .journal import Facts, Operations
from .rows import label, ref, state_error
from .rules import DISABLED, ENABLED, ORIGIN_EXTERNAL, PENDING_IMPORT, iso, parse_iso


class Imports(Operations):
    """The catalog side of BYOK (see the module doc)."""

    def get_import_params(self, ref_: str, oaep_hash: str = "sha256") -> dict:
        """A fresh RSA wrapping key (in the key's provider) and a 24-hour import token,
        replacing older ones."""
        made: dict = {}

        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            self._check_importable(row)
            backend = self._backends.for_key(row["id"])
            f.needs_kek = backend.needs_kek
            if dry:
                if "prepared" not in made:
                    made["prepared"] = backend.prepare_import_key(oaep_hash)
                return None
            old = self.conn.execute("SELECT private_key FROM kms_import WHERE key_id = ?",
                                    (row["id"],)).fetchone()
            key = backend.new_import_key(row["id"], oaep_hash, made.get("prepared"))
            if old is not None:
                backend.destroy_import_key(old["private_key"])
            token = byok.new_token()
            expires_at = iso(self._now() + byok.TOKEN_VALIDITY)
            self.conn.execute(
                "INSERT INTO kms_import (key_id, token_sha256, expires_at, public_key_pem,"
                " private_key) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET"
                " token_sha256 = excluded.token_sha256, expires_at = excluded.expires_at,"
                " public_key_pem = excluded.public_key_pem, private_key = excluded.private_key",
                (row["id"], byok.token_digest(token), expires_at, key["pem"], key["ref"]))
            f.details.update(expires_at=expires_at, wrapping_algorithm=key["algorithm"],
                             wrapping_key_spec=key["spec"])
            return {"key_id": row["id"], "public_key_pem": key["pem"], "import_token": token,
                    "expires_at": expires_at, "wrapping_algorithm": key["algorithm"],
                    "wrapping_key_spec": key["spec"]}

        try:
            return self._journal.run("get-import-params", work, needs_kek=True)
        finally:
            if "prepared" in made:
                self._backends.for_key(self._rows.row(ref_)["id"]).discard_prepared(
                    made["prepared"])

    def import_material(self, ref_: str, wrapped_material: bytes, import_token: str,
                        material_expires_at: datetime | None = None) -> dict:
        """Unwrap RSA-OAEP-wrapped 32-byte material into the key's provider and enable the
        key; the same material only, if the key had material before."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            self._check_importable(row)
            backend = self._backends.for_key(row["id"])
            f.needs_kek = backend.needs_kek
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
            expires = None
            if material_expires_at is not None:
                if material_expires_at <= self._now():
                    raise errors.InvalidInput(
                        detail=f"--expires-at {iso(material_expires_at)} is not in the future")
                expires = iso(material_expires_at)
            if dry:
                return
            prior = self.conn.execute("SELECT check_value FROM kms_imported WHERE key_id = ?",
                                      (row["id"],)).fetchone()
            stored, kcv = backend.import_material(row["id"], 1, imp["private_key"],
                                                  wrapped_material)
            if prior is not None and not hmac.compare_digest(kcv, prior["check_value"]):
                backend.destroy(row["id"], [(1, stored)])
                raise errors.InvalidKeyMaterial(
                    reason=f"this is not the material key {label(row)} had (its check value "
                           "differs); a key takes back only its own material: import the same "
                           "32 bytes, or create a new key for new material")
            t = iso(self._now())
            if self.conn.execute("SELECT 1 FROM kms_key_versions WHERE key_id = ? AND "
                                 "version = 1", (row["id"],)).fetchone():
                self.conn.execute("UPDATE kms_key_versions SET material = ? WHERE key_id = ? "
                                  "AND version = 1", (stored, row["id"]))
            else:
                self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, "
                                  "material) VALUES (?, 1, ?, ?)", (row["id"], t, stored))
            self.conn.execute("UPDATE kms_keys SET state = ?, last_rotated_at = ? WHERE id = ?",
                              (ENABLED, t, row["id"]))
            self.conn.execute(
                "INSERT INTO kms_imported (key_id, check_value, material_expires_at) VALUES "
                "(?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET material_expires_at = "
                "excluded.material_expires_at", (row["id"], kcv, expires))
            self.conn.execute("DELETE FROM kms_import WHERE key_id = ?", (row["id"],))
            backend.destroy_import_key(imp["private_key"])
            f.key_version = 1
            f.details.update(reimport=prior is not None, material_expires_at=expires)

        self._journal.run("import", work, needs_kek=True)
        return self._rows.describe(self._rows.row(ref_))

    def delete_material(self, ref_: str) -> dict:
        """Enabled / Disabled imported key -> PendingImport, its material gone now."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            if row["origin"] != ORIGIN_EXTERNAL:
                raise errors.KeyStateError(
                    key_id=label(row), state="a blockcrypt-generated key (origin blockcrypt)",
                    detail="only imported material can be deleted; to retire the key, "
                           f"`blockcrypt key schedule-deletion {ref(row)}`")
            if row["state"] not in (ENABLED, DISABLED):
                raise state_error(row, "have its imported material deleted",
                                  "it has no material now" if row["state"] == PENDING_IMPORT
                                  else None)
            backend = self._backends.for_key(row["id"])
            f.needs_kek = backend.needs_kek   # local: the check value may need computing
            if dry:
                return
            f.details["previous_state"] = row["state"]
            remove_material(self, row["id"])

        self._journal.run("delete-imported-material", work, needs_kek=True)
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


def remove_material(ops: Operations, key_id: str) -> None:
    """The imported material of a key goes (inside the caller's write transaction): its
    check value is kept first (computed from the sealed material of a local key imported
    before check values existed), the provider's material destroyed, the key
    PendingImport.  Used by ``delete-imported-material`` and by expiry."""
    conn, backends = ops.conn, ops._backends
    versions = conn.execute("SELECT version, material FROM kms_key_versions WHERE key_id = ? "
                            "AND material IS NOT NULL", (key_id,)).fetchall()
    if conn.execute("SELECT 1 FROM kms_imported WHERE key_id = ?", (key_id,)).fetchone() is None:
        with ops._vault.material(key_id, 1) as m:
            conn.execute("INSERT INTO kms_imported (key_id, check_value) VALUES (?, ?)",
                         (key_id, check_value(m)))
    backends.for_key(key_id).destroy(key_id, [(v["version"], bytes(v["material"]))
                                              for v in versions])
    conn.execute("UPDATE kms_key_versions SET material = NULL WHERE key_id = ?", (key_id,))
    conn.execute("UPDATE kms_imported SET material_expires_at = NULL WHERE key_id = ?",
                 (key_id,))
    conn.execute("UPDATE kms_keys SET state = ? WHERE id = ?", (PENDING_IMPORT, key_id))
