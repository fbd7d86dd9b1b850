"""The key-provider seam (blockcrypt/kms/provider.py) and what the local store may not know.

- the local store implements exactly the seam's methods;
- the key management package does not import the disk catalog: a key's dependants
  come from the callable the store is opened with (the CLI wires the catalog);
- the tables a new home gets are byte-for-byte those of the store before the split.
"""
from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys

from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import KeyProvider
from blockcrypt.kms.local import KeyStore, no_dependants
from blockcrypt.storage.home import Home

PASS = b"seam test passphrase"

SEAM = {"generate_data_key", "decrypt_data_key", "reencrypt_data_key", "get_key",
        "default_key", "check_usable", "enable", "disable", "schedule_deletion",
        "cancel_deletion", "rotate", "key_version_of", "close"}

# SHA-256 of repr([(type, name, sql), ...]) of the audit_* and kms_* entries of
# sqlite_master in a new home, as created by the store before it was split
# (commit 9db9e21): existing homes were made with exactly this DDL.
KMS_SCHEMA_SHA256 = "2310231f4fac2f74f07fe0006c52f564690780ffe6e292426803d8d8b7357557"


def test_the_local_store_is_a_key_provider_with_exactly_the_seams_methods():
    assert KeyProvider.__abstractmethods__ == SEAM
    assert issubclass(KeyStore, KeyProvider) and not KeyStore.__abstractmethods__
    assert KeyStore.name == "local"


def test_key_management_does_not_import_the_disk_catalog():
    probe = ("import sys, blockcrypt.kms, blockcrypt.kms.local, blockcrypt.kms.provider\n"
             "print('blockcrypt.storage.catalog' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "False"


def test_without_a_dependants_callable_the_store_knows_of_none(tmp_path):
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        key = ks.create_key(alias="k")
        ks.conn.execute("INSERT INTO disks (id, name, path, size_bytes, sector_size, encrypted,"
                        " cmk_id, created_at) VALUES ('d1', 'db', '/x', 4096, 4096, 1, ?, 'now')",
                        (key["id"],))
        assert ks.get_key("k")["dependants"] == []
        assert no_dependants(ks.conn, key["id"]) == []
    seen = []

    def dependants(conn: sqlite3.Connection, key_id: str) -> list[str]:
        seen.append(key_id)
        return ["disk from-the-callable"]

    with KeyStore.open(h, lambda: Secret(PASS), dependants=dependants) as ks:
        assert ks.get_key("k")["dependants"] == ["disk from-the-callable"]
    assert seen == [key["id"]]


def test_a_new_home_gets_the_same_key_tables_as_before(tmp_path):
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    conn = sqlite3.connect(h.db_path)
    try:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'kms%' OR name LIKE "
            "'audit%' OR tbl_name LIKE 'kms%' OR tbl_name LIKE 'audit%' ORDER BY rowid"
        ).fetchall()
    finally:
        conn.close()
    assert len(rows) == 11
    assert hashlib.sha256(repr(rows).encode()).hexdigest() == KMS_SCHEMA_SHA256


def test_key_version_of_names_the_version_that_wrapped(tmp_path):
    """What the services record in a header as cmk_version comes from the provider."""
    import pytest

    from blockcrypt import errors
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    ctx = {"disk": "d1"}
    with KeyStore.open(h, lambda: Secret(PASS)) as ks:
        key = ks.create_key(alias="k")
        dk, wrapped = ks.generate_data_key("k", ctx)
        dk.wipe()
        assert ks.key_version_of(wrapped) == key["current_version"] == 1
        ks.rotate("k")
        rewrapped = ks.reencrypt_data_key(wrapped, ctx, ctx)
        assert ks.key_version_of(rewrapped) == 2
        assert ks.key_version_of(wrapped) == 1
        with pytest.raises(errors.BlobFormatError):
            ks.key_version_of(b"not a wrapped key")
