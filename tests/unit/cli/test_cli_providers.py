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
