"""`blockcrypt provider ...` and `key create --provider`, run as a user would (real SoftHSM2)."""
from __future__ import annotations

import json

from blockcrypt import errors

from support.cli import run_cli


def test_provider_add_list_show_remove_and_keys_in_it(home, passphrase_file, softhsm):
    def cli(*args, check=True):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)

    cli("init")
    out = cli(*softhsm.provider_args("hsm")).stdout.decode()
    assert "key provider hsm added" in out and "--provider hsm" in out
    listed = json.loads(cli("provider", "list", "--json").stdout)
    assert [(p["name"], p["type"]) for p in listed] == [("local", "local"), ("hsm", "pkcs11")]
    assert listed[1]["config"] == softhsm.provider_options()
    # Keys in the token need no passphrase: run without one.
    key = json.loads(run_cli("key", "create", "--alias", "db", "--provider", "hsm", "--json",
                             home=home).stdout)
    assert (key["provider"], key["state"]) == ("hsm", "Enabled")
    table = run_cli("key", "list", home=home).stdout.decode()
    assert "PROVIDER" in table and "hsm" in table
    assert "Provider     hsm" in run_cli("key", "show", "db", home=home).stdout.decode()
    shown = run_cli("provider", "show", "hsm", home=home).stdout.decode()
    assert "libsofthsm2.so" in shown and key["id"] in shown and "db" in shown
    cp = run_cli("provider", "remove", "hsm", home=home, check=False)
    assert cp.returncode == errors.StateError.exit_code
    assert b"db" in cp.stderr and key["id"].encode() in cp.stderr
    cp = run_cli("provider", "show", "nope", home=home, check=False)
    assert cp.returncode == errors.ProviderNotFound.exit_code
    cp = run_cli("key", "create", "--provider", "nope", home=home, check=False)
    assert cp.returncode == errors.ProviderNotFound.exit_code
    assert b"blockcrypt provider list" in cp.stderr
    cli(*softhsm.provider_args("spare"))
    assert "removed" in cli("provider", "remove", "spare").stdout.decode()


def test_byok_into_the_token_through_the_cli(home, passphrase_file, softhsm, tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    run_cli("init", home=home, passphrase_file=passphrase_file)
    run_cli(*softhsm.provider_args("hsm"), home=home)
    run_cli("key", "create", "--alias", "mine", "--origin", "external", "--provider", "hsm",
            home=home)
    out = tmp_path / "params"
    p = json.loads(run_cli("key", "get-import-params", "mine", "--out-dir", str(out),
                           "--oaep-hash", "sha1", "--json", home=home).stdout)
    assert p["wrapping_algorithm"] == "RSAES_OAEP_SHA_1"
    pub = serialization.load_pem_public_key(open(p["public_key_file"], "rb").read())
    wrapped = tmp_path / "material.wrapped"
    wrapped.write_bytes(pub.encrypt(b"\x42" * 32, padding.OAEP(
        mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)))
    key = json.loads(run_cli("key", "import", "mine", "--material", str(wrapped), "--token",
                             p["token_file"], "--expires-at", "2099-01-01T00:00:00Z", "--json",
                             home=home).stdout)
    assert (key["state"], key["material_expires_at"]) == ("Enabled", "2099-01-01T00:00:00Z")
    assert "expires 2099-01-01T00:00:00Z" in run_cli("key", "show", "mine",
                                                     home=home).stdout.decode()
    cp = run_cli("key", "delete-imported-material", "mine", home=home)
    assert b"PendingImport" in cp.stdout and b"get-import-params mine" in cp.stdout
    cp = run_cli("key", "import", "mine", "--material", str(wrapped), "--token", "x",
                 "--expires-at", "yesterday", home=home, check=False)
    assert cp.returncode == errors.InvalidInput.exit_code and b"ISO 8601" in cp.stderr
