"""The key-provider seam (blockcrypt/kms/provider.py) and what the local store may not know.

- the local store implements exactly the seam's methods;
- the key management package does not import the disk catalog: a key's dependants
  come from the callable the store is opened with (the CLI wires the catalog);
- the tables a new home gets are byte-for-byte those of the store before the split,
  plus the tables added for providers and imports (kms_providers, kms_key_provider,
  kms_imported);
- a home made by the code before providers existed (3a70a03) opens, gains the
  provider tables, and its keys and wrapped data keys keep working as local keys.
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
# The same for the entries the key providers added after them.
PROVIDER_SCHEMA_SHA256 = "f00c68527463f6503b6123535e7164f687267738474853468064ebf9f82160cb"


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
    assert len(rows) == 17
    assert hashlib.sha256(repr(rows[:11]).encode()).hexdigest() == KMS_SCHEMA_SHA256
    assert [r[1] for r in rows[11:]] == ["kms_providers", "sqlite_autoindex_kms_providers_1",
                                         "kms_key_provider", "sqlite_autoindex_kms_key_provider_1",
                                         "kms_imported", "sqlite_autoindex_kms_imported_1"]
    assert hashlib.sha256(repr(rows[11:]).encode()).hexdigest() == PROVIDER_SCHEMA_SHA256


OLD_HOME_SCRIPT = """
import json, sys
from pathlib import Path
import blockcrypt
from blockcrypt.secret import Secret
from blockcrypt.kms.store import KeyStore
from blockcrypt.home import Home
assert blockcrypt.__file__.startswith(sys.argv[2]), blockcrypt.__file__
h = Home(Path(sys.argv[1]))
KeyStore.init(h, Secret(b"old home passphrase"))
with KeyStore.open(h, lambda: Secret(b"old home passphrase")) as ks:
    k = ks.create_key(alias="old-key")
    ks.rotate("old-key")
    dk, blob = ks.generate_data_key("old-key", {"disk": "d1"})
    print(json.dumps({"id": k["id"], "dk": dk.view().hex(), "blob": blob.hex()}))
"""


def test_a_home_made_before_providers_opens_and_works_after_migration(tmp_path):
    import json

    from support.cli import REPO
    old = tmp_path / "old-code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "3a70a03", "blockcrypt"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    home = tmp_path / "home"
    made = json.loads(subprocess.run(
        [sys.executable, "-c", OLD_HOME_SCRIPT, str(home), str(old)], check=True,
        capture_output=True, text=True, cwd=old, env={"PYTHONPATH": str(old),
                                            "BLOCKCRYPT_TESTONLY_WEAK_KDF": "1"}).stdout)
    conn = sqlite3.connect(Home(home).db_path)
    assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'kms_providers'"
                        ).fetchone() is None        # really the old schema
    conn.close()
    with KeyStore.open(Home(home), lambda: Secret(b"old home passphrase")) as ks:
        key = ks.get_key("old-key")
        assert (key["id"], key["provider"], key["current_version"]) == (made["id"], "local", 2)
        with ks.decrypt_data_key(bytes.fromhex(made["blob"]), {"disk": "d1"}) as dk:
            assert dk.view().hex() == made["dk"]
        assert [p["name"] for p in ks.list_providers()] == ["local"]
        assert ks.rotate("old-key")["current_version"] == 3
        ks.create_key(alias="new-key")
        assert ks.verify_audit()["records"] >= 4


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
