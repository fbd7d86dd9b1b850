"""`blockcrypt init`, `passphrase change`, `key ...` and `audit ...`, run as a user would."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import parse_wrapped
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage.home import Home
from blockcrypt.testing.crashpoints import ENV_CRASH_AT as CRASH_ENV

from support.cli import run_cli
from support.prereq import require_tools

CTX = {"uid": "ab" * 16, "cipher": "aes-xts-plain64"}


@pytest.fixture
def store(home, passphrase_file):
    """An initialised home; returns a runner bound to it."""
    run_cli("init", home=home, passphrase_file=passphrase_file)

    def cli(*args, check=True, passphrase=passphrase_file, **kw):
        kw.setdefault("input", b"")   # never a terminal: a prompt would hang the test
        return run_cli(*args, home=home, passphrase_file=passphrase, check=check, **kw)
    return cli


def out_json(cp) -> object:
    return json.loads(cp.stdout)


def assert_fails(cp, error: type[errors.BlockcryptError], *fragments: str) -> None:
    assert cp.returncode == error.exit_code, (cp.returncode, cp.stderr.decode())
    msg = cp.stderr.decode()
    for f in fragments:
        assert f in msg, msg


def passphrase_of(path) -> Secret:
    return Secret(path.read_bytes().rstrip(b"\n"))


def key_rows(home) -> list:
    conn = sqlite3.connect(home / "blockcrypt.db")
    try:
        return conn.execute("SELECT * FROM kms_keys ORDER BY id").fetchall() + \
            conn.execute("SELECT * FROM kms_key_versions ORDER BY 1, 2").fetchall() + \
            conn.execute("SELECT * FROM kms_store").fetchall()
    finally:
        conn.close()


# -- store ---------------------------------------------------------------------

def test_commands_before_init_say_to_run_it(home, passphrase_file):
    for args in (["key", "list"], ["key", "create"], ["audit"], ["audit", "verify"],
                 ["passphrase", "change"]):
        cp = run_cli(*args, home=home, passphrase_file=passphrase_file, check=False,
                     input=b"")
        assert_fails(cp, errors.StoreNotFound, "run `blockcrypt init` first")
    assert not home.exists()


def test_init_then_init_again(home, passphrase_file, tmp_path):
    cp = run_cli("init", home=home, passphrase_file=passphrase_file)
    assert b"key store created" in cp.stdout
    before = key_rows(home)
    # Again, without any passphrase source: it must not ask, and must change nothing.
    cp = run_cli("init", "--json", home=home, env={"BLOCKCRYPT_PASSPHRASE_FILE": ""},
                 input=b"")
    assert out_json(cp) == {"home": str(home), "created": False}
    cp = run_cli("init", home=home, passphrase_file=tmp_path / "missing")
    assert b"already exists" in cp.stdout and b"nothing was changed" in cp.stdout
    assert key_rows(home) == before


def test_file_modes(store, home, tmp_path):
    old_umask = os.umask(0o022)    # the usual umask: blockcrypt must not depend on it
    try:
        # Hold a connection open so SQLite keeps its -wal and -shm files to inspect.
        with KeyStore.open(Home(home)) as held:
            held.list_keys()
            store("key", "create", "--alias", "k")
            store("key", "create", "--origin", "external", "--alias", "ext")
            store("key", "get-import-params", "ext", "--out-dir", tmp_path / "imp")
            names = {p.name for p in home.iterdir() if p.is_file()}
            assert names == {"blockcrypt.db", "blockcrypt.db-wal", "blockcrypt.db-shm"}
            files = [p for p in home.iterdir() if p.is_file()] + list((tmp_path / "imp").iterdir())
            for f in files:
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old_umask)
    for d in (home, home / "disks", home / "snapshots", home / "run", tmp_path / "imp"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_missing_passphrase_and_wrong_passphrase(store, home, tmp_path):
    store("key", "create", "--alias", "k")
    before = key_rows(home)
    cp = store("key", "create", passphrase=None, check=False,
               env={"BLOCKCRYPT_PASSPHRASE_FILE": ""})
    assert_fails(cp, errors.PassphraseRequired, "--passphrase-file")
    cp = store("key", "rotate", "k", passphrase=tmp_path / "nope", check=False)
    assert_fails(cp, errors.PassphraseFileError, "nope")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    wrong.chmod(0o600)
    cp = store("key", "rotate", "k", passphrase=wrong, check=False)
    assert_fails(cp, errors.WrongPassphrase, "nothing was changed")
    assert key_rows(home) == before
    # Commands that need no key material never ask for the passphrase.
    for args in (["key", "list"], ["key", "show", "k"], ["key", "disable", "k"],
                 ["key", "enable", "k"], ["audit"], ["audit", "verify"]):
        store(*args, passphrase=None, env={"BLOCKCRYPT_PASSPHRASE_FILE": ""})


# -- keys --------------------------------------------------------------------------

def test_create_list_show(store):
    cp = store("key", "create", "--alias", "db", "--description", "database disks",
               "--rotation-period-days", "365")
    key_id = cp.stdout.decode().strip()
    assert len(key_id) == 36 and cp.stdout.decode().count("\n") == 1
    created = out_json(store("key", "create", "--origin", "external", "--json"))
    assert created["state"] == "PendingImport"
    listed = out_json(store("key", "list", "--json"))
    assert [k["id"] for k in listed] == [key_id, created["id"]]
    shown = out_json(store("key", "show", "db", "--json"))
    assert shown == out_json(store("key", "show", key_id, "--json")) == listed[0]
    assert (shown["description"], shown["rotation_period_days"]) == ("database disks", 365)
    table = store("key", "list").stdout.decode().splitlines()
    assert table[0].split() == ["ID", "ALIAS", "STATE", "PROVIDER", "ORIGIN", "VERSION",
                                "ROTATION", "USED", "BY", "CREATED"]
    assert table[1].split()[:4] == [key_id, "db", "Enabled", "local"]
    # Columns line up: every row starts its STATE column at the same offset.
    assert len({line.index(s) for line, s in zip(table, ["STATE", "Enabled",
                                                         "PendingImport"])}) == 1
    text = store("key", "show", "db").stdout.decode()
    assert "every 365 days" in text and "current (new wraps)" in text and "nothing" in text


def test_state_commands_and_refusals(store, home, provider_args):
    store("key", "create", "--alias", "k", *provider_args(store))
    assert out_json(store("key", "disable", "k", "--json"))["state"] == "Disabled"
    assert out_json(store("key", "enable", "k", "--json"))["state"] == "Enabled"
    assert_fails(store("key", "schedule-deletion", "k", "--pending-days", "6", check=False),
                 errors.InvalidInput, "7..30")
    cp = store("key", "schedule-deletion", "k", "--pending-days", "7")
    assert b"PendingDeletion" in cp.stdout and b"cancel-deletion k" in cp.stdout
    assert_fails(store("key", "enable", "k", check=False), errors.KeyStateError,
                 "PendingDeletion", "blockcrypt key cancel-deletion k")
    assert b"Disabled" in store("key", "cancel-deletion", "k").stdout
    assert_fails(store("key", "cancel-deletion", "k", check=False), errors.KeyStateError,
                 "not scheduled")
    assert_fails(store("key", "rotate", "k", check=False), errors.KeyStateError,
                 "Disabled", "blockcrypt key enable k")
    store("key", "enable", "k")
    assert out_json(store("key", "rotate", "k", "--json"))["current_version"] == 2
    assert_fails(store("key", "show", "missing", check=False), errors.KeyNotFound, "missing")
    assert_fails(store("key", "create", "--alias", "k", check=False), errors.AlreadyExists)
    assert_fails(store("key", "create", "--alias", "bad alias", check=False),
                 errors.InvalidInput)

    # Dependants (rows a disk command would write) block disable and deletion.
    with KeyStore.open(Home(home)) as ks:
        ks.conn.execute("INSERT INTO disks (id, name, path, size_bytes, sector_size, encrypted,"
                        " cmk_id, created_at) VALUES ('x', 'vol1', '/p', 4096, 4096, 1, ?, 't')",
                        (ks.get_key("k")["id"],))
    assert_fails(store("key", "disable", "k", check=False), errors.KeyInUse, "disk vol1",
                 "--force")
    assert_fails(store("key", "schedule-deletion", "k", check=False), errors.KeyInUse,
                 "disk vol1")
    assert "disk vol1" in store("key", "show", "k").stdout.decode()
    store("key", "disable", "k", "--force")

    # The service key cannot be disabled or deleted.
    with KeyStore.open(Home(home), lambda: Secret(b"correct horse battery staple")) as ks:
        ks.default_key()
    assert_fails(store("key", "disable", "blockcrypt/default", "--force", check=False),
                 errors.ServiceKeyProtected, "service key")
    assert_fails(store("key", "schedule-deletion", "blockcrypt/default", check=False),
                 errors.ServiceKeyProtected)
    cp = store("key", "disable", "k", "--json", check=False)
    assert cp.returncode == 0
    cp = store("key", "enable", "nope", "--json", check=False)
    assert json.loads(cp.stderr)["error"] == "KeyNotFound"


def test_byok_end_to_end(store, home, passphrase_file, tmp_path):
    key_id = store("key", "create", "--origin", "external", "--alias", "mine").stdout.strip()
    key_id = key_id.decode()
    out = tmp_path / "params"
    info = out_json(store("key", "get-import-params", "mine", "--out-dir", out, "--json"))
    assert info["wrapping_algorithm"] == "RSAES_OAEP_SHA_256"
    # The user's own tooling: pyca loads the PEM and wraps 32 bytes with RSA-OAEP-SHA-256.
    material = os.urandom(32)
    public = serialization.load_pem_public_key((out / f"{key_id}.wrapping-key.pem").read_bytes())
    assert public.key_size == 4096
    wrapped = tmp_path / "material.wrapped"
    wrapped.write_bytes(public.encrypt(material, padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)))
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("forged\n")
    assert_fails(store("key", "import", "mine", "--material", wrapped, "--token", bad_token,
                       check=False), errors.ImportTokenError, "does not match")
    assert_fails(store("key", "rotate", "mine", check=False), errors.KeyStateError,
                 "cannot be rotated")
    assert_fails(store("key", "enable", "mine", check=False), errors.KeyStateError,
                 "PendingImport", "blockcrypt key import mine")
    token_file = out / f"{key_id}.import-token"
    imported = out_json(store("key", "import", "mine", "--material", wrapped,
                              "--token", token_file, "--json"))
    assert (imported["state"], imported["current_version"]) == ("Enabled", 1)
    assert_fails(store("key", "rotate", "mine", check=False), errors.KeyStateError,
                 "imported keys cannot be rotated")
    assert_fails(store("key", "import", "mine", "--material", wrapped, "--token", token_file,
                       check=False), errors.KeyStateError, "imported already")
    # Data keys are now wrapped with exactly the user's material.
    with KeyStore.open(Home(home), lambda: passphrase_of(passphrase_file)) as ks:
        dk, blob = ks.generate_data_key("mine", CTX)
    p = parse_wrapped(blob)
    aad = p.header + json.dumps(CTX, sort_keys=True, separators=(",", ":")).encode()
    assert AESGCM(material).decrypt(p.nonce, p.ciphertext, aad) == dk
    assert [r["operation"] for r in out_json(store("audit", "--key", "mine", "--json"))] == [
        "create", "get-import-params", "import", "rotate", "enable", "import", "rotate",
        "import", "generate"]


def test_byok_with_the_documented_openssl_command(store, tmp_path):
    require_tools("openssl")
    key_id = store("key", "create", "--origin", "external").stdout.decode().strip()
    cp = store("key", "get-import-params", key_id, "--out-dir", tmp_path)
    assert b"openssl pkeyutl" in cp.stdout
    (tmp_path / "material.bin").write_bytes(os.urandom(32))
    subprocess.run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey",
                    tmp_path / f"{key_id}.wrapping-key.pem", "-in", tmp_path / "material.bin",
                    "-out", tmp_path / "material.wrapped", "-pkeyopt", "rsa_padding_mode:oaep",
                    "-pkeyopt", "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256"],
                   check=True, capture_output=True)
    token = (tmp_path / f"{key_id}.import-token").read_text().strip()
    cp = store("key", "import", key_id, "--material", tmp_path / "material.wrapped",
               "--token", token)
    assert b"is Enabled" in cp.stdout


# -- concurrency and crashes -----------------------------------------------------------

def test_twenty_concurrent_key_creates(store, home):
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(lambda i: store("key", "create", "--alias", f"c{i}",
                                                check=False), range(20)))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results]
    ids = {r.stdout.decode().strip() for r in results}
    assert len(ids) == 20
    keys = out_json(store("key", "list", "--json"))
    assert {k["id"] for k in keys} == ids
    assert {k["alias"] for k in keys} == {f"c{i}" for i in range(20)}
    report = out_json(store("audit", "verify", "--json"))
    assert report["ok"] and report["records"] == 21
    creates = [r for r in out_json(store("audit", "--json")) if r["operation"] == "create"]
    assert {r["key_id"] for r in creates} == ids
    assert len({r["caller"]["pid"] for r in creates}) == 20


@pytest.mark.parametrize("point", ["passphrase-change:after-first-key",
                                   "passphrase-change:before-commit"])
def test_kill_during_passphrase_change_leaves_the_old_passphrase(store, home, passphrase_file,
                                                                tmp_path, point):
    for alias in ("a", "b"):
        store("key", "create", "--alias", alias)
    with KeyStore.open(Home(home), lambda: passphrase_of(passphrase_file)) as ks:
        blobs = [ks.generate_data_key(a, CTX) for a in ("a", "b")]
    new = tmp_path / "new-passphrase"
    new.write_text("a brand new passphrase\n")
    new.chmod(0o600)
    cp = store("passphrase", "change", "--new-passphrase-file", new, check=False,
               env={CRASH_ENV: point})
    assert cp.returncode == -signal.SIGKILL
    conn = sqlite3.connect(home / "blockcrypt.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    assert_fails(store("key", "rotate", "a", passphrase=new, check=False),
                 errors.WrongPassphrase)
    with KeyStore.open(Home(home), lambda: passphrase_of(passphrase_file)) as ks:
        for dk, blob in blobs:
            with ks.decrypt_data_key(blob, CTX) as got:
                assert got == dk
    # Completing the change afterwards works, and then only the new passphrase does.
    store("passphrase", "change", "--new-passphrase-file", new)
    assert_fails(store("key", "rotate", "a", check=False), errors.WrongPassphrase)
    with KeyStore.open(Home(home), lambda: passphrase_of(new)) as ks:
        for dk, blob in blobs:
            with ks.decrypt_data_key(blob, CTX) as got:
                assert got == dk
    assert out_json(store("audit", "verify", "--json"))["ok"]


def test_kill_during_rotation_leaves_the_key_as_it_was(store, home):
    store("key", "create", "--alias", "k")
    cp = store("key", "rotate", "k", check=False, env={CRASH_ENV: "rotate:before-commit"})
    assert cp.returncode == -signal.SIGKILL
    key = out_json(store("key", "show", "k", "--json"))
    assert key["current_version"] == 1 and len(key["versions"]) == 1
    assert out_json(store("key", "rotate", "k", "--json"))["current_version"] == 2
    assert out_json(store("audit", "verify", "--json"))["ok"]


# -- audit ------------------------------------------------------------------------------

def test_audit_listing_and_verify_detects_tampering(store, home):
    store("key", "create", "--alias", "k")
    store("key", "create", "--alias", "other")
    store("key", "disable", "k")
    store("key", "rotate", "k", check=False)
    records = out_json(store("audit", "--json"))
    assert [(r["operation"], r["result"]) for r in records] == [
        ("init", "success"), ("create", "success"), ("create", "success"),
        ("disable", "success"), ("rotate", "refused")]
    assert "--alias" in records[1]["caller"]["command"]
    only_k = out_json(store("audit", "--key", "k", "--json"))
    assert [r["operation"] for r in only_k] == ["create", "disable", "rotate"]
    assert out_json(store("audit", "--since", "2999-01-01", "--json")) == []
    assert len(out_json(store("audit", "--since", "1h", "--json"))) == 5
    assert_fails(store("audit", "--since", "yesterday", check=False), errors.InvalidInput)
    table = store("audit").stdout.decode().splitlines()
    assert table[0].split()[:3] == ["#", "TIME", "(UTC)"] and len(table) == 6
    assert "KeyStateError" in table[-1]
    text = store("audit", "verify").stdout.decode()
    assert "intact: 5 records" in text
    head = out_json(store("audit", "verify", "--json"))
    anchor = f"{head['head_seq']}:{head['head_hash']}"
    store("audit", "verify", "--anchor", anchor)

    conn = sqlite3.connect(home / "blockcrypt.db")
    conn.execute("UPDATE audit_log SET record = replace(record, '\"refused\"', '\"success\"')"
                 " WHERE seq = 5")
    conn.commit()
    conn.close()
    cp = store("audit", "verify", check=False)
    assert_fails(cp, errors.AuditTampered, "tampered", "record 5 was edited")
    cp = store("audit", "verify", "--json", check=False)
    assert cp.returncode == errors.AuditTampered.exit_code
    assert out_json(cp)["ok"] is False


def test_passphrase_change_cli(store, home, passphrase_file, tmp_path):
    store("key", "create", "--alias", "k")
    new = tmp_path / "new"
    new.write_text("second passphrase\n")
    new.chmod(0o600)
    cp = store("passphrase", "change", check=False)   # no terminal, no --new-passphrase-file
    assert_fails(cp, errors.PassphraseError, "--new-passphrase-file")
    store("passphrase", "change", "--new-passphrase-file", new)
    assert_fails(store("key", "rotate", "k", check=False), errors.WrongPassphrase)
    assert out_json(store("key", "rotate", "k", "--json", passphrase=new))["current_version"] == 2
