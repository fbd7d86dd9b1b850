"""`blockcrypt disk import NAME FILE` refusals and an unencrypted import, without block
devices (the kmip path across three hosts is tests/e2e/test_kmip_hosts.py)."""
from __future__ import annotations

import json
import shutil

from blockcrypt import errors

from support.cli import run_cli


def test_import_checks_the_file_and_changes_nothing_when_refused(tmp_path, passphrase_file):
    a, b = tmp_path / "a", tmp_path / "b"

    def cli(home, *args, check=True):
        return run_cli(*args, home=home, passphrase_file=passphrase_file, check=check)

    def refused(home, error, *args) -> str:
        cp = cli(home, *args, check=False)
        assert cp.returncode == error.exit_code, (cp.returncode, cp.stderr.decode())
        return cp.stderr.decode()
    cli(a, "init")
    cli(b, "init")
    plain = json.loads(cli(a, "disk", "create", "plain", "--size", "1M", "--no-encrypted",
                           "--json").stdout)
    cli(a, "snapshot", "create", "plain", "snap")
    snap = json.loads(cli(a, "snapshot", "show", "snap", "--json").stdout)
    copy = tmp_path / "plain.bcd"
    shutil.copyfile(plain["path"], copy)
    before = copy.read_bytes()

    msg = refused(b, errors.InvalidInput, "disk", "import", "s", snap["path"])
    assert "is a snapshot, not a disk" in msg
    msg = refused(b, errors.NotFound, "disk", "import", "x", tmp_path / "nope.bcd")
    assert "nope.bcd" in msg
    refused(b, errors.InvalidName, "disk", "import", "../x", copy)
    assert json.loads(cli(b, "disk", "list", "--json").stdout) == []

    got = json.loads(cli(b, "disk", "import", "copied", copy, "--json").stdout)
    assert got["id"] == plain["id"] and got["path"] != str(copy)
    assert open(got["path"], "rb").read() == before == copy.read_bytes()   # source untouched
    msg = refused(b, errors.StateError, "disk", "import", "again", copy)
    assert "is disk 'copied' of this host already" in msg
