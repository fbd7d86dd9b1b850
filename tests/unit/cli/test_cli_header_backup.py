"""`disk header-backup` / `disk header-restore` (issue 12 item 12) and container errors
that name the disk or snapshot, with the file as detail (item 7); the real CLI."""
from __future__ import annotations

import json
import os
import stat

import pytest

from blockcrypt import errors
from blockcrypt.storage import container, header_backup
from blockcrypt.storage.header import COPY_OFFSETS

from support.env import container_dk, container_path


@pytest.fixture
def bc(bc_home):
    run = bc_home
    run("disk", "create", "d1", "--size", "4M")
    run("disk", "create", "d2", "--size", "4M")
    run("disk", "create", "p1", "--size", "4M", "--no-encrypted")
    run("snapshot", "create", "d1", "s1")
    return run


def _damage_both_copies(path):
    with open(path, "r+b") as f:
        for off in COPY_OFFSETS:
            f.seek(off + 200)
            f.write(b"\x55" * 32)


def _err(cp, error):
    err = cp.stderr.decode()
    assert cp.returncode == error.exit_code, err
    assert "Traceback" not in err and err.count("\n") == 1
    return err


def test_backup_holds_the_wrapped_key_only_and_is_private(bc, home, passphrase_file, tmp_path):
    backup = tmp_path / "d1.hdr"
    bc("disk", "header-backup", "d1", backup)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    path = container_path(home, "disks", "d1")
    header = container.read_header(path)
    raw = backup.read_bytes()
    assert header.wrapped_dk in raw
    dk = container_dk(home, passphrase_file, path)
    assert dk[:32] not in raw and dk[32:] not in raw
    assert header_backup.read(backup) == header
    _err(bc("disk", "header-backup", "d1", backup, check=False), errors.AlreadyExists)


def test_restore_after_both_copies_are_damaged(bc, home, passphrase_file, tmp_path):
    backup = tmp_path / "d1.hdr"
    bc("disk", "header-backup", "d1", backup)
    path = container_path(home, "disks", "d1")
    dk = container_dk(home, passphrase_file, path)
    _damage_both_copies(path)
    err = _err(bc("snapshot", "create", "d1", "s2", check=False), errors.ChecksumMismatch)
    assert err.startswith("error: disk 'd1': both header copies fail their checksum")
    assert "blockcrypt disk header-restore d1 FILE" in err
    assert f"(file {path})" in err and ".tmp-" not in err
    out = json.loads(bc("disk", "header-restore", "d1", backup, "--json").stdout)
    assert out["name"] == "d1"
    assert container_dk(home, passphrase_file, path) == dk     # the same key unwraps
    bc("snapshot", "create", "d1", "s2")
    records = json.loads(bc("audit", "--json").stdout)
    ops = [(r["operation"], r["result"]) for r in records]
    assert ("disk-header-backup", "success") in ops and ("disk-header-restore", "success") in ops
    assert bc("audit", "verify").returncode == 0


def test_restore_refuses_another_disks_header(bc, home, tmp_path):
    other = tmp_path / "d2.hdr"
    bc("disk", "header-backup", "d2", other)
    path = container_path(home, "disks", "d1")
    before = path.read_bytes()
    err = _err(bc("disk", "header-restore", "d1", other, check=False),
               errors.HeaderBackupMismatch)
    assert "disk 'd1'" in err and "its id is" in err and str(other) in err
    # same id, another lineage (a forged or mixed-up backup): refused too
    h = container.read_header(path)
    forged = tmp_path / "forged.hdr"
    forged.write_bytes(header_backup.encode(h.replace(lineage_id=os.urandom(16))))
    err = _err(bc("disk", "header-restore", "d1", forged, check=False),
               errors.HeaderBackupMismatch)
    assert "its lineage is" in err and "its id is" not in err
    garbage = tmp_path / "garbage.hdr"
    garbage.write_bytes(b"x" * header_backup.SIZE)
    _err(bc("disk", "header-restore", "d1", garbage, check=False), errors.InvalidHeaderBackup)
    assert path.read_bytes() == before                # nothing was written
    refused = [r for r in json.loads(bc("audit", "--json").stdout)
               if r["operation"] == "disk-header-restore"]
    assert [r["result"] for r in refused] == ["refused"] * 3
    assert refused[0]["exit_code"] == errors.HeaderBackupMismatch.exit_code


# -- item 7: container errors name the disk or snapshot, the file is the detail ----------

@pytest.mark.parametrize("command, what, name", [
    (("snapshot", "create", "d1", "s9"), "disk", "d1"),
    (("disk", "reinit", "d1"), "disk", "d1"),
    (("disk", "header-backup", "d1", "{tmp}/b"), "disk", "d1"),
    (("disk", "create", "d9", "--from-snapshot", "s1"), "snapshot", "s1"),
    (("disk", "reset", "d2", "--snapshot", "s1"), "snapshot", "s1"),
])
@pytest.mark.parametrize("damage", ["both-copies", "missing"])
def test_container_errors_name_the_disk_or_snapshot(bc, home, tmp_path, command, what, name,
                                                    damage):
    path = container_path(home, what + "s", name)
    if damage == "missing":
        path.unlink()
    else:
        _damage_both_copies(path)
    if command[-1] == "{tmp}/b":
        command = command[:-1] + (str(tmp_path / "b"),)
    cp = bc(*command, check=False)
    err = cp.stderr.decode()
    assert "Traceback" not in err and cp.returncode in (
        errors.ChecksumMismatch.exit_code, errors.NotFound.exit_code,
        errors.LineageMismatch.exit_code), err
    if cp.returncode == errors.LineageMismatch.exit_code:
        return      # reset d2 to d1's snapshot is refused before its file is read
    assert err.startswith(f"error: {what} {name!r}: "), err
    assert f"(file {path})" in err and ".tmp-" not in err
    if damage == "missing":
        assert "its container file is missing" in err


@pytest.mark.parametrize("command, error", [
    (("snapshot", "export", "p1s", "{tmp}/missing/x.img"), errors.InvalidInput),
    (("disk", "header-backup", "d1", "{tmp}/missing/x.hdr"), errors.NotFound),
])
def test_a_missing_destination_folder_is_named_not_a_temporary_file(bc, tmp_path, command,
                                                                    error):
    bc("snapshot", "create", "p1", "p1s")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in command]
    err = _err(bc(*argv, check=False), error)
    assert f"no such directory {tmp_path / 'missing'}" in err and ".tmp" not in err
