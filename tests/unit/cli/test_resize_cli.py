"""`blockcrypt disk resize` of a detached disk, run as a user would: growth of both
header copies and the catalog, the DK re-wrapped for the new size, shrinking refused
with the data-copy way, and a crash between header and catalog finished by the next command.
Attached disks (nbdkit, nbdfuse, loop, resize2fs) are in tests/e2e/test_resize.py."""
from __future__ import annotations

import json
import os

import pytest

from blockcrypt import errors
from blockcrypt.cli import read_passphrase_file
from blockcrypt.cli.store import CatalogKeyStore as KeyStore
from blockcrypt.storage import container
from blockcrypt.storage.header import COPY_OFFSETS, COPY_SIZE, decode_copy, key_context
from blockcrypt.storage.home import Home

from support.cli import run_cli

MiB = 2**20


def _copies(path):
    with open(path, "rb") as f:
        raw = [os.pread(f.fileno(), COPY_SIZE, off) for off in COPY_OFFSETS]
    return raw, [decode_copy(r) for r in raw]


def _show(bc, name):
    return json.loads(bc("disk", "show", name, "--json").stdout)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_grow_detached_updates_both_copies_catalog_and_key(bc_home, home, passphrase_file,
                                                          encrypted):
    bc_home("disk", "create", "d", "--size", "8M",
            *([] if encrypted else ["--no-encrypted"]))
    path = _show(bc_home, "d")["path"]
    before = container.read_header(path)
    # data written before the resize stays where it was
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), b"kept" * 1024, before.data_offset + 4096)
    out = json.loads(bc_home("disk", "resize", "d", "--size", "24M", "--json").stdout)
    assert out["size_bytes"] == 24 * MiB and out["old_size_bytes"] == 8 * MiB
    assert out["changed"] and not out["reattach_required"] and not out["finished_catalog"]
    raw, (a, b) = _copies(path)
    assert raw[0] == raw[1]                                   # both copies, identical
    assert a.size_bytes == 24 * MiB and a.seq == before.seq + 1
    assert os.stat(path).st_size == a.data_offset + 24 * MiB
    assert _show(bc_home, "d")["size_bytes"] == 24 * MiB      # the catalog
    with open(path, "rb") as f:
        assert os.pread(f.fileno(), 4096, a.data_offset + 4096) == b"kept" * 1024
    if encrypted:
        assert a.wrapped_dk != before.wrapped_dk
        with KeyStore.open(Home(home), lambda: read_passphrase_file(str(passphrase_file))) as ks:
            ks.decrypt_data_key(a.wrapped_dk, key_context(a)).wipe()   # unwraps for 24M
            with pytest.raises(errors.BlockcryptError):
                ks.decrypt_data_key(a.wrapped_dk, key_context(before))
    else:
        assert a.wrapped_dk is None
    again = json.loads(bc_home("disk", "resize", "d", "--size", "24M", "--json").stdout)
    assert not again["changed"] and container.read_header(path).seq == a.seq


def test_shrink_is_refused_naming_disk_copy_and_changes_nothing(bc_home):
    bc_home("disk", "create", "d", "--size", "16M")
    path = _show(bc_home, "d")["path"]
    raw_before, _ = _copies(path)
    cp = bc_home("disk", "resize", "d", "--size", "8M", check=False)
    assert cp.returncode == errors.InvalidSize.exit_code
    err = cp.stderr.decode()
    assert "disk 'd'" in err and "only grows" in err and "blockcrypt disk copy d NEW" in err
    assert "Traceback" not in err
    assert _copies(path)[0] == raw_before and _show(bc_home, "d")["size_bytes"] == 16 * MiB


@pytest.mark.parametrize("argv, error", [
    (["disk", "resize", "nope", "--size", "8M"], errors.DiskNotFound),
    (["disk", "resize", "d", "--size", "8M+1"], errors.InvalidSize),
    (["disk", "resize", "d", "--size", "4099K"], errors.InvalidSize),  # not whole sectors
])
def test_bad_input_refused(bc_home, argv, error):
    bc_home("disk", "create", "d", "--size", "4M")
    cp = bc_home(*argv, check=False)
    assert cp.returncode == error.exit_code, cp.stderr.decode()
    assert _show(bc_home, "d")["size_bytes"] == 4 * MiB


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_crash_between_header_and_catalog_is_finished_by_the_next_command(
        bc_home, home, passphrase_file, encrypted):
    bc_home("disk", "create", "d", "--size", "8M", *([] if encrypted else ["--no-encrypted"]))
    path = _show(bc_home, "d")["path"]
    cp = run_cli("disk", "resize", "d", "--size", "16M", home=home,
                 passphrase_file=passphrase_file, check=False,
                 env={"BLOCKCRYPT_TESTONLY_CRASH_AT": "disk-resize.after-header"})
    assert cp.returncode == -9, cp.stderr.decode()
    assert container.read_header(path).size_bytes == 16 * MiB     # the header is new
    assert (home / "run" / ".resizes").is_dir()                     # the resize's marker
    # the next command that looks at disks (here a list) finishes it from the header
    assert [d["size_bytes"] for d in json.loads(bc_home("disk", "list", "--json").stdout)] \
        == [16 * MiB]
    assert not (home / "run" / ".resizes").exists()
    assert _show(bc_home, "d")["size_bytes"] == 16 * MiB
    again = json.loads(bc_home("disk", "resize", "d", "--size", "16M", "--json").stdout)
    assert not again["changed"] and again["size_bytes"] == 16 * MiB
    bc_home("disk", "resize", "d", "--size", "24M")               # and it grows on from there
    assert container.read_header(path).size_bytes == 24 * MiB


def test_crash_before_the_header_changes_nothing(bc_home, home, passphrase_file):
    bc_home("disk", "create", "d", "--size", "8M")
    path = _show(bc_home, "d")["path"]
    cp = run_cli("disk", "resize", "d", "--size", "16M", home=home,
                 passphrase_file=passphrase_file, check=False,
                 env={"BLOCKCRYPT_TESTONLY_CRASH_AT": "disk-resize.before-header"})
    assert cp.returncode == -9, cp.stderr.decode()
    assert (home / "run" / ".resizes").is_dir()
    assert _show(bc_home, "d")["size_bytes"] == 8 * MiB
    assert container.read_header(path).size_bytes == 8 * MiB
    assert not (home / "run" / ".resizes").exists()
