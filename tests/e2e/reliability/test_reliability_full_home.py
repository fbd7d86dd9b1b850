"""A full home file system (issue 12 item 5), on a real size-limited tmpfs as HOME:
`disk create` and `key create` fail with "no space left in HOME" (HomeFull) and leave
nothing behind; `disk detach` always works (the server is stopped and the device
released first; the catalog row it cannot delete is stale and removed by the first
command once space is freed)."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from blockcrypt import errors
from blockcrypt.system import proc

from support.env import Env
from support.prereq import require_block_devices, require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1 << 20


@pytest.fixture
def small_home(tmp_path, passphrase_file):
    """An Env whose home is on its own 48 MiB tmpfs."""
    require_block_devices()
    require_tools("mount", "umount")
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(fs)],
                   check=True)
    env = None
    try:
        env = Env(fs / "home", passphrase_file, tmp_path)
        yield env, fs
    finally:
        (fs / "filler").unlink(missing_ok=True)
        if env is not None:
            env.cleanup()
        subprocess.run(["umount", "-l", str(fs)], check=True)


def _fill(fs) -> None:
    """Fill the file system up to the last block."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (MiB, 4096):
            chunk = b"\xa5" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)
    assert os.statvfs(fs).f_bfree == 0


def _state(home) -> tuple:
    files = sorted(str(p.relative_to(home)) for p in home.rglob("*")
                   if "run" not in p.relative_to(home).parts[:1])
    conn = sqlite3.connect(home / "blockcrypt.db")
    try:
        rows = tuple(tuple(map(tuple, conn.execute(f"SELECT * FROM {t} ORDER BY 1")))
                     for t in ("disks", "snapshots", "kms_keys"))
    finally:
        conn.close()
    return [f for f in files if not f.startswith("blockcrypt.db")], rows


@pytest.mark.parametrize("command", [("disk", "create", "z", "--size", "4M"),
                                     ("disk", "create", "z", "--size", "4M", "--no-encrypted"),
                                     ("key", "create", "--alias", "kz"),
                                     ("snapshot", "create", "d", "sz"),
                                     ("disk", "create", "z", "--from-snapshot", "s")],
                         ids=["disk-create", "disk-create-plain", "key-create",
                              "snapshot-create", "disk-create-from-snapshot"])
def test_create_on_a_full_home_fails_clearly_and_leaves_nothing(small_home, command):
    env, fs = small_home
    env.create("d", "8M")
    dev = env.attach("d")["device"]
    with open(dev, "wb") as f:              # data to copy: a snapshot needs space
        f.write(os.urandom(4 * MiB))
    env.detach("d")
    env.cli("snapshot", "create", "d", "s")
    before = _state(env.home)
    _fill(fs)
    cp = env.cli(*command, check=False)
    err = cp.stderr.decode()
    assert cp.returncode == errors.HomeFull.exit_code, err
    assert "Traceback" not in err
    assert f"no space left in HOME {env.home}" in err and "free space there" in err
    (fs / "filler").unlink()
    assert _state(env.home) == before          # no file, no row left behind
    env.cli(*command)                          # and it works once there is space
    assert env.json("audit", "verify")["ok"]


def test_detach_on_a_full_home_stops_the_server_and_releases_the_device(small_home):
    env, fs = small_home
    env.create("d", "8M")
    d = env.attach("d")
    nbdkit_pid = d["nbdkit_pid"]
    _fill(fs)
    cp = env.cli("disk", "detach", "d", "--json", check=False)
    err = cp.stderr.decode()
    assert cp.returncode == 0, err
    assert "Traceback" not in err
    out = json.loads(cp.stdout)
    assert out["catalog_pending"] is True and "no space left in HOME" in err
    assert not proc.pid_matches(nbdkit_pid, "nbdkit", f"{env.home}/run/")
    dev = d["device"]
    losetup = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert f"{dev}:" not in losetup or "(deleted)" in losetup
    # still full: listed as stale, not as attached, and no traceback
    listed = {x["name"]: x for x in env.json("disk", "list")}
    assert listed["d"]["state"] in ("stale", "available")
    (fs / "filler").unlink()
    listed = {x["name"]: x for x in env.json("disk", "list")}
    assert listed["d"]["state"] == "available"         # reconciled
    env.attach("d")
    env.detach("d")
    assert env.json("audit", "verify")["ok"]
