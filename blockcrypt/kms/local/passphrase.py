"""The store passphrase: creating a store under one, and changing it.

Creating a store picks fresh Argon2id parameters (:mod:`blockcrypt.kms.kdf`),
derives the KEK and stores only the parameters and a sealed verifier.  Changing
the passphrase re-seals every CMK version and pending import key under a KEK
from the new passphrase in one transaction: a crash at any point leaves either
the old passphrase or the new one working, never a mix (crash points
``passphrase-change:after-first-key`` and ``passphrase-change:before-commit``).
Both Argon2id derivations run before the write lock is taken.

Must not: keep a passphrase or KEK beyond the call (the open store's KEK is the
:class:`.vault.Vault`'s).
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Callable

from ...crypto.secret import Secret
from ...storage import db
from ...storage.db import write_txn
from ...storage.home import Home
from ...testing.crashpoints import crashpoint
from .. import audit, kdf
from .journal import Facts, Journal
from .maintenance import checkpoint
from .rules import iso, iso_us
from .schema import STORE_FORMAT_VERSION
from .vault import VERIFIER, Vault, verifier_ad


def init_store(home: Home, passphrase: Secret, now: Callable[[], datetime]) -> bool:
    """Create the store; False (and nothing changed) if it already exists."""
    home.create_dirs()
    conn = db.connect(home.db_path, create=True)
    try:
        if conn.execute("SELECT 1 FROM kms_store WHERE id = 1").fetchone():
            return False
        params = kdf.new_params()
        store_id = str(uuid.uuid4())
        with kdf.derive_kek(passphrase, params) as kek:
            verifier = kdf.seal(kek, VERIFIER, verifier_ad(store_id))
        with write_txn(conn):
            if conn.execute("SELECT 1 FROM kms_store WHERE id = 1").fetchone():
                return False  # another process won the race
            t = now()
            conn.execute("INSERT INTO kms_store (id, store_id, format_version, created_at,"
                         " kdf, verifier, kek_generation) VALUES (1, ?, ?, ?, ?, ?, 1)",
                         (store_id, STORE_FORMAT_VERSION, iso(t), params.to_json(),
                          verifier))
            audit.append(conn, time=iso_us(t), operation="init", key_id=None,
                         key_version=None, context=None, result="success",
                         details={"store_id": store_id, "kdf": params.public()})
        return True
    finally:
        conn.close()


def change_passphrase(vault: Vault, journal: Journal, new: Secret) -> None:
    """Re-seal all CMK material (and import keys) under a KEK from the new passphrase.

    One transaction: a crash at any point leaves either the old passphrase or
    the new one working, never a mix.  The caller still owns ``new``.
    """
    conn = vault.conn
    made: dict = {}

    def work(f: Facts, dry: bool):
        if dry:
            vault.unlock()  # a wrong current passphrase fails before the slow new KDF
            if "kek" not in made:
                made["params"] = kdf.new_params()
                made["kek"] = kdf.derive_kek(new, made["params"])
            return
        new_kek, count = made["kek"], 0
        rows = conn.execute("SELECT key_id, version, material FROM kms_key_versions "
                            "WHERE material IS NOT NULL AND key_id NOT IN "
                            "(SELECT key_id FROM kms_key_provider)").fetchall()
        for r in rows:
            ad = vault.material_ad(r["key_id"], r["version"])
            with vault.unseal(r["material"], ad,
                              f"the material of key {r['key_id']} version {r['version']}") as m:
                sealed = kdf.seal(new_kek, m.view(), ad)
            conn.execute("UPDATE kms_key_versions SET material = ? "
                         "WHERE key_id = ? AND version = ?",
                         (sealed, r["key_id"], r["version"]))
            count += 1
            crashpoint("passphrase-change:after-first-key")
        for r in conn.execute("SELECT key_id, private_key FROM kms_import WHERE key_id NOT IN "
                              "(SELECT key_id FROM kms_key_provider)").fetchall():
            ad = vault.import_ad(r["key_id"])
            with vault.unseal(r["private_key"], ad,
                              f"the import wrapping key of key {r['key_id']}") as m:
                sealed = kdf.seal(new_kek, m.view(), ad)
            conn.execute("UPDATE kms_import SET private_key = ? WHERE key_id = ?",
                         (sealed, r["key_id"]))
        conn.execute(
            "UPDATE kms_store SET kdf = ?, verifier = ?, kek_generation = kek_generation + 1"
            " WHERE id = 1",
            (made["params"].to_json(),
             kdf.seal(new_kek, VERIFIER, verifier_ad(vault.store_id))))
        f.details = {"reencrypted_versions": count, "kdf": made["params"].public()}
        crashpoint("passphrase-change:before-commit")

    try:
        journal.run("change-passphrase", work, needs_kek=True)
    except BaseException:
        if "kek" in made:
            made["kek"].wipe()
        raise
    vault.adopt(made["kek"])
    checkpoint(conn)
