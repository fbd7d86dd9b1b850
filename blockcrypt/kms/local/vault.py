"""The key-encryption key (KEK) of an open store and the CMK material sealed under it.

Owns: deriving the KEK from the store passphrase (once per open store, checked
against the verifier), noticing a passphrase change made by another process
(``kek_generation``), sealing and unsealing under the KEK with associated data
naming what is sealed, reading a CMK version's material, and adding new random
material as a key's newest version.  The KEK and material exist only as
:class:`~blockcrypt.crypto.secret.Secret` objects, wiped when done.

Must not: decide whether a key may be used (its state is :mod:`.lifecycle`'s and
the callers' business), write audit records, or open transactions: every write
here runs inside the caller's (see :mod:`.journal`).
"""
from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Callable

from cryptography.exceptions import InvalidTag

from ... import errors
from ...crypto.secret import Secret
from ...storage.home import Home
from .. import kdf
from .rules import iso

VERIFIER = b"blockcrypt key store passphrase verifier v1"
"""The constant sealed under the KEK in ``kms_store.verifier``: tells a wrong passphrase."""


def verifier_ad(store_id: str) -> bytes:
    return f"blockcrypt-kms/passphrase-verifier/v1\0{store_id}".encode()


class Vault:
    """The KEK of one open store (derived on first need) and the material it seals.

    ``passphrase_source`` is called at most once, only when the KEK is needed; the
    Secret it returns is wiped once the KEK is derived.
    """

    def __init__(self, home: Home, conn: sqlite3.Connection, store_id: str,
                 passphrase_source: Callable[[], Secret] | None):
        self.home = home
        self.conn = conn
        self.store_id = store_id
        self._passphrase_source = passphrase_source
        self._kek: Secret | None = None
        self._kek_generation: int | None = None

    # -- the KEK ---------------------------------------------------------------
    def unlock(self) -> None:
        """Derive the KEK from the passphrase (once) and check it against the verifier."""
        if self._kek is not None:
            return
        row = self.conn.execute("SELECT kdf, verifier, kek_generation FROM kms_store "
                                "WHERE id = 1").fetchone()
        params = kdf.KdfParams.from_json(row["kdf"])
        if self._passphrase_source is None:
            raise errors.PassphraseRequired()
        passphrase = self._passphrase_source()
        try:
            kek = kdf.derive_kek(passphrase, params)
        finally:
            passphrase.wipe()
        try:
            kdf.unseal(kek, row["verifier"], verifier_ad(self.store_id)).wipe()
        except InvalidTag:
            kek.wipe()
            raise errors.WrongPassphrase(home=str(self.home.path)) from None
        self._kek, self._kek_generation = kek, row["kek_generation"]

    def check_current(self) -> None:
        """Inside a write transaction: refuse if another process changed the passphrase
        since this KEK was derived (its material is sealed under another KEK now)."""
        gen = self.conn.execute("SELECT kek_generation FROM kms_store WHERE id = 1").fetchone()[0]
        if gen != self._kek_generation:
            self._kek.wipe()
            self._kek = None
            raise errors.PassphraseError(
                detail="the store passphrase was changed by another command while this one "
                       "ran; nothing was changed; run it again with the new passphrase")

    def adopt(self, new_kek: Secret) -> None:
        """After a committed passphrase change: use ``new_kek`` from now on."""
        old, self._kek = self._kek, new_kek
        old.wipe()
        self._kek_generation = self.conn.execute(
            "SELECT kek_generation FROM kms_store WHERE id = 1").fetchone()[0]

    def wipe(self) -> None:
        if self._kek is not None:
            self._kek.wipe()
            self._kek = None

    # -- sealing -------------------------------------------------------------------
    def seal(self, plaintext, ad: bytes) -> bytes:
        return kdf.seal(self._kek, plaintext, ad)

    def unseal(self, sealed: bytes, ad: bytes, what: str) -> Secret:
        try:
            return kdf.unseal(self._kek, sealed, ad)
        except InvalidTag:
            raise errors.CryptoError(
                detail=f"{what} failed authentication under the store passphrase; the key "
                       f"store database {self.home.db_path} was altered or damaged") from None

    def material_ad(self, key_id: str, version: int) -> bytes:
        return f"blockcrypt-kms/cmk-material/v1\0{self.store_id}\0{key_id}\0{version}".encode()

    def import_ad(self, key_id: str) -> bytes:
        return f"blockcrypt-kms/import-wrapping-key/v1\0{self.store_id}\0{key_id}".encode()

    # -- CMK versions ----------------------------------------------------------------
    def material(self, key_id: str, version: int) -> Secret:
        """The plaintext material of one key version (the caller wipes it)."""
        row = self.conn.execute("SELECT material FROM kms_key_versions WHERE key_id = ? AND "
                                "version = ?", (key_id, version)).fetchone()
        if row is None or row["material"] is None:
            raise errors.CryptoError(detail=f"key {key_id} version {version} has no material")
        return self.unseal(row["material"], self.material_ad(key_id, version),
                           f"the material of key {key_id} version {version}")

    def add_version(self, key_id: str, now: datetime,
                    new_material: Callable[[str, int], bytes]) -> int:
        """New material from ``new_material(key_id, version)`` (a provider backend's:
        sealed material, or a token object's id) as the key's newest version, which
        also becomes its ``last_rotated_at`` (inside a write transaction)."""
        version = self.conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM "
                                    "kms_key_versions WHERE key_id = ?", (key_id,)).fetchone()[0]
        t = iso(now)
        sealed = new_material(key_id, version)
        self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, material)"
                          " VALUES (?, ?, ?, ?)", (key_id, version, t, sealed))
        self.conn.execute("UPDATE kms_keys SET last_rotated_at = ? WHERE id = ?", (t, key_id))
        return version

    def current_version(self, key_id: str) -> int | None:
        """The newest version that still has material (None: none yet, or destroyed)."""
        return self.conn.execute("SELECT MAX(version) FROM kms_key_versions WHERE key_id = ? "
                                 "AND material IS NOT NULL", (key_id,)).fetchone()[0]
