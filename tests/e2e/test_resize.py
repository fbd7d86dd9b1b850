"""End to end: `disk resize` with real nbdkit, nbdfuse, losetup, mkfs.ext4, mount,
resize2fs and e2fsck (root), for encrypted and plain disks, detached and attached.

An attached disk grows in its container at once, but its device keeps the size it was
attached with (nbdkit 1.32 cannot notify a connected NBD client of a new size, and
nbdfuse fixes its file's size at connect): the command says to re-attach, and after
re-attaching the device has the new size, the files are intact and resize2fs grows
the file system into it.
"""
from __future__ import annotations

import os
import subprocess

import pytest

from blockcrypt import errors

from support.env import sha256
from support.prereq import require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 2**20


def _size(dev: str) -> int:
    return int(subprocess.run(["blockdev", "--getsize64", dev], capture_output=True,
                              check=True).stdout)


def write_files(mp) -> dict[str, str]:
    """A few files (8 MiB of random data in all) on a small disk; returns name -> sha256."""
    (mp / "dir").mkdir()
    (mp / "hello.txt").write_text("hello, blockcrypt\n")
    (mp / "dir" / "odd-size.bin").write_bytes(os.urandom(12345))
    (mp / "random.bin").write_bytes(os.urandom(8 * MiB))
    return _files(mp)


def _files(mp) -> dict[str, str]:
    return {str(p.relative_to(mp)): sha256(p) for p in mp.rglob("*")
            if p.is_file() and "lost+found" not in str(p)}


def _grow_fs_and_check(env, dev: str, hashes: dict[str, str], size_bytes: int) -> None:
    """resize2fs into the whole device, then the files and e2fsck are as before."""
    subprocess.run(["e2fsck", "-fy", dev], check=True, capture_output=True)
    subprocess.run(["resize2fs", dev], check=True, capture_output=True)
    mp = env.mount(dev)
    assert _files(mp) == hashes
    df = subprocess.run(["df", "-B1", "--output=size", str(mp)], capture_output=True,
                        check=True, text=True).stdout.split()
    assert int(df[-1]) > size_bytes * 3 // 4            # the file system fills the disk
    env.umount(mp)
    fsck = subprocess.run(["e2fsck", "-fn", dev], capture_output=True)
    assert fsck.returncode == 0, fsck.stdout.decode() + fsck.stderr.decode()


def _mounted_64m_disk_with_files(env, encrypted: bool, *where: str):
    """Disk g (64 MiB, in the store ``where`` names) attached, formatted ext4 and
    mounted, holding write_files: ``(device, mount point, the files' hashes)``."""
    require_tools("mkfs.ext4", "e2fsck", "resize2fs", "blockdev")
    env.create("g", "64M", *([] if encrypted else ["--no-encrypted"]), *where)
    dev = env.attach("g")["device"]
    subprocess.run(["mkfs.ext4", "-q", dev], check=True, capture_output=True)
    mp = env.mount(dev)
    return dev, mp, write_files(mp)


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_resize_attached_and_mounted_then_reattach(env, encrypted):
    dev, mp, hashes = _mounted_64m_disk_with_files(env, encrypted)

    out = env.json("disk", "resize", "g", "--size", "160M")
    assert out["size_bytes"] == 160 * MiB and out["reattach_required"] is True
    assert out["state"] == "attached" and out["device"] == dev
    text = env.cli("disk", "resize", "g", "--size", "160M").stdout.decode()
    assert "nothing to do" in text                       # already that size
    # still served, with the size it was attached with; the files stay usable
    assert _size(dev) == 64 * MiB
    (mp / "after-resize").write_bytes(b"x" * MiB)
    hashes["after-resize"] = sha256(mp / "after-resize")
    env.umount(mp)
    env.detach("g")

    dev = env.attach("g")["device"]
    assert _size(dev) == 160 * MiB
    _grow_fs_and_check(env, dev, hashes, 160 * MiB)
    env.detach("g")


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_resize_detached_then_attach(env, encrypted, store_args):
    dev, mp, hashes = _mounted_64m_disk_with_files(env, encrypted, *store_args(env.cli))
    env.umount(mp)
    env.detach("g")

    cp = env.cli("disk", "resize", "g", "--size", "128M")
    assert "grown from 64 MiB to 128 MiB" in cp.stdout.decode()
    assert "detach" not in cp.stdout.decode()            # nothing to re-attach
    dev = env.attach("g")["device"]
    assert _size(dev) == 128 * MiB
    _grow_fs_and_check(env, dev, hashes, 128 * MiB)
    env.detach("g")


def test_resize_attached_message_says_to_reattach(env, store_name, store_args):
    env.create("m", "32M", *store_args(env.cli))
    env.attach("m")
    if store_name == "rbd":
        # only the lock owner may write an image's header (FORMAT.md F-40): refused,
        # saying what to do, and nothing changed
        msg = env.refused(errors.StateError, "disk", "resize", "m", "--size", "64M")
        assert "'m'" in msg and "detach" in msg, msg
        assert env.json("disk", "show", "m")["size_bytes"] == 32 * MiB
        assert not any((env.home / "run" / ".resizes").glob("*"))
        env.detach("m")
        assert env.json("disk", "resize", "m", "--size", "64M")["size_bytes"] == 64 * MiB
        return
    text = env.cli("disk", "resize", "m", "--size", "64M").stdout.decode()
    assert "still shows 32 MiB" in text
    assert "blockcrypt disk detach m" in text and "blockcrypt disk attach m" in text
    env.detach("m")
