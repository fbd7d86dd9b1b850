"""End to end on real block devices (root): snapshot of a mounted disk under a
concurrent writer, refusals while attached, and `disk copy` in both directions.

Every CLI call is a subprocess, as a user would run it; devices come from
`blockcrypt disk attach` (nbd-client where the kernel has nbd, else nbdfuse +
loop).  Never skipped in CI (conftest.require_block_devices).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.system import quiesce

from support.cli import run_cli
from support.env import container_dk, container_path
from support.prereq import require_block_devices, require_tools
from support.stored import container_file
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024


class Env:
    def __init__(self, home: Path, pf: Path, tmp: Path):
        self.home, self.pf, self.tmp = home, pf, tmp
        self.mounts: list[Path] = []

    def cli(self, *args, check=True, env=None, timeout=300):
        return run_cli(*args, home=self.home, passphrase_file=self.pf, check=check, env=env,
                       timeout=timeout)

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def attach(self, name: str, read_only: bool = False) -> str:
        args = ["disk", "attach", name] + (["--read-only"] if read_only else [])
        return self.json(*args)["device"]

    def mount(self, device: str, name: str, options: str | None = None) -> Path:
        mnt = self.tmp / f"mnt-{name}"
        mnt.mkdir(exist_ok=True)
        argv = ["mount"] + (["-o", options] if options else []) + [device, str(mnt)]
        subprocess.run(argv, check=True, capture_output=True)
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: Path) -> None:
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)
        self.mounts.remove(mnt)

    def path(self, table: str, name: str) -> Path:
        return container_path(self.home, table, name)

    def container(self, name: str, cluster=None) -> Path:
        """Disk ``name``'s container: its file, or with the Ceph ``cluster`` of its RBD
        store an `rbd export` of its image."""
        return container_file(self.home, "disks", name, cluster=cluster, scratch=self.tmp)

    def dk(self, path: Path) -> bytes:
        dk = container_dk(self.home, self.pf, path)
        assert dk is not None, f"{path} is not encrypted"
        return dk

    def cleanup(self) -> None:
        attached = []
        if (self.home / "blockcrypt.db").exists():
            cp = self.cli("disk", "list", "--json", check=False)
            if cp.returncode == 0:
                attached = [d for d in json.loads(cp.stdout) if d["state"] != "available"]
        for d in attached:        # never leave I/O paused under a mount (test failure)
            if d.get("control_socket"):
                with contextlib.suppress(Exception):
                    quiesce.resume(d["control_socket"], timeout_s=5)
        for mnt in reversed(self.mounts):
            subprocess.run(["umount", str(mnt)], capture_output=True)
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        self.mounts.clear()
        for d in attached:
            self.cli("disk", "detach", d["name"], check=False)


@pytest.fixture
def env(home, passphrase_file, tmp_path):
    require_block_devices()
    e = Env(home, passphrase_file, tmp_path)
    e.cli("init")
    try:
        yield e
    finally:
        e.cleanup()


def file_bytes(name: str) -> bytes:
    """Deterministic contents for a writer's file (16-80 KiB)."""
    seed = hashlib.sha256(name.encode()).digest()
    size = 16 * 1024 + int.from_bytes(seed[:2], "little") % (64 * 1024)
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "little")).digest()
        counter += 1
    return bytes(out[:size])


WRITER = r"""
import os, sys, time
sys.path[:0] = [{here!r}, {tests!r}]   # test_lifecycle, and the support package it imports
from test_lifecycle import file_bytes
mnt, log, stop = sys.argv[1], sys.argv[2], sys.argv[3]
logf = open(log, "a")
dfd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
i = 0
while not os.path.exists(stop):
    name = f"f{{i:06d}}"
    fd = os.open(os.path.join(mnt, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, file_bytes(name))
    os.fsync(fd)
    os.close(fd)
    os.fsync(dfd)
    logf.write(name + "\n"); logf.flush(); os.fsync(logf.fileno())   # only after fsync
    i += 1
"""


def _logged(log: Path) -> list[str]:
    return [line for line in log.read_text().split("\n") if line] if log.exists() else []


def test_snapshot_while_mounted_under_concurrent_writer(env, tmp_path, store_args,
                                                        store_cluster):
    env.cli("disk", "create", "src", "--size", "256M", *store_args(env.cli))
    dev = env.attach("src")
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = env.mount(dev, "src")
    log, stop = tmp_path / "written.log", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c",
                               WRITER.format(here=str(Path(__file__).parent),
                                             tests=str(Path(__file__).parents[1])),
                               str(mnt), str(log), str(stop)])
    try:
        wait_for(lambda: len(_logged(log)) >= 30, 60, "the writer to start")
        before = _logged(log)                      # completed before the snapshot began
        snap = env.json("snapshot", "create", "src", "live")
        assert snap["quiesced"] is True
        n_after = len(_logged(log))
        # The mounted file system keeps working after the snapshot.
        wait_for(lambda: len(_logged(log)) >= n_after + 20, 60, "writes after the snapshot")
    finally:
        stop.touch()
        writer.wait(60)
    assert writer.returncode == 0
    env.umount(mnt)
    env.cli("disk", "detach", "src")

    env.cli("disk", "create", "restored", "--from-snapshot", "live")
    assert env.dk(env.container("restored", store_cluster)) == \
        env.dk(env.container("src", store_cluster))
    dev2 = env.attach("restored")
    mnt2 = env.mount(dev2, "restored")          # replays the journal, as after a power cut
    present = set(os.listdir(mnt2))
    for name in before:
        assert name in present, f"{name} was fsynced before the snapshot but is missing"
        assert (mnt2 / name).read_bytes() == file_bytes(name), f"{name} is corrupt"
    # Files that exist are whole or were being written at the instant of the
    # snapshot (at most the writer's one in-flight file is short).
    partial = [n for n in present if n.startswith("f") and n not in before
               and (mnt2 / n).read_bytes() != file_bytes(n)]
    assert len(partial) <= 1, partial
    env.umount(mnt2)
    fsck = subprocess.run(["e2fsck", "-fn", dev2], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    env.cli("disk", "detach", "restored")


def _sync_within(path: Path, timeout_s: float, ctl_socket: str) -> bool:
    """Run `sync -f path`; False if it is still blocked after timeout_s (then
    resume I/O so the blocked process can finish, and reap it)."""
    p = subprocess.Popen(["sync", "-f", str(path)])
    try:
        p.wait(timeout_s)
        return p.returncode == 0
    except subprocess.TimeoutExpired:
        quiesce.resume(ctl_socket)
        p.wait()
        return False


def test_killed_snapshot_never_leaves_io_paused(env):
    """kill -9 while I/O is paused: the next blockcrypt command on the disk resumes it."""
    env.cli("disk", "create", "d", "--size", "64M")
    dev = env.attach("d")
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = env.mount(dev, "d")
    ctl = env.json("disk", "show", "d")["control_socket"]
    for i, next_command in enumerate((["disk", "show", "d"], ["disk", "list"],
                                      ["snapshot", "create", "d", "s-next"])):
        (mnt / f"dirty{i}").write_bytes(os.urandom(MiB))     # dirty in the page cache
        cp = env.cli("snapshot", "create", "d", f"killed{i}", check=False,
                     env={"BLOCKCRYPT_TESTONLY_CRASH_AT": "snapshot.paused"})
        assert cp.returncode == -signal.SIGKILL
        # (nothing may touch the mount here: its I/O is held until resumed)
        env.cli(*next_command)
        assert _sync_within(mnt / f"dirty{i}", 20, ctl), \
            f"I/O still paused after `blockcrypt {' '.join(next_command)}`"
    env.umount(mnt)
    env.cli("disk", "detach", "d")
    assert [s["name"] for s in env.json("snapshot", "list")] == ["s-next"]
    assert sorted(os.listdir(env.home / "snapshots")) == [env.path("snapshots", "s-next").name]


def test_refusals_while_attached_and_read_only_snapshot(env, store_args):
    where = store_args(env.cli)
    env.cli("disk", "create", "a", "--size", "32M", "--no-encrypted", *where)
    env.cli("disk", "create", "b", "--size", "32M", "--no-encrypted", *where)
    env.cli("snapshot", "create", "a", "sa")
    env.attach("a", read_only=True)
    s = env.json("snapshot", "create", "a", "ro-snap")     # read-only: no pause needed
    assert s["quiesced"] is False
    for argv in (["disk", "reset", "a", "--snapshot", "sa"], ["disk", "reinit", "a"],
                 ["disk", "copy", "a", "b"], ["disk", "copy", "b", "a"]):
        cp = env.cli(*argv, check=False)
        assert cp.returncode == errors.DiskAttached.exit_code, (argv, cp.stderr)
    env.cli("disk", "detach", "a")
    env.cli("disk", "reset", "a", "--snapshot", "sa")


def _tree_manifest(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, sha256 | link target, names of its hard-link group)."""
    out, by_inode = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if rel.startswith("lost+found"):
                continue
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                by_inode.setdefault(st.st_ino, []).append(rel)
                out[rel] = ("file", st.st_mode, hashlib.sha256(p.read_bytes()).hexdigest(),
                            st.st_ino)
    for rel, entry in out.items():
        if entry[0] == "file":
            out[rel] = entry[:3] + (tuple(sorted(by_inode[entry[3]])),)
    return out


def _populate(root: Path) -> None:
    (root / "docs" / "deep").mkdir(parents=True)
    (root / "docs" / "readme.txt").write_text("blockcrypt disk copy test\n")
    (root / "docs" / "deep" / "blob.bin").write_bytes(os.urandom(3 * MiB + 17))
    (root / "big.bin").write_bytes(os.urandom(20 * MiB))
    (root / "secret.key").write_bytes(os.urandom(64))
    os.chmod(root / "secret.key", 0o600)
    os.symlink("docs/readme.txt", root / "link")
    os.link(root / "big.bin", root / "big.hardlink")
    os.setxattr(root / "docs" / "readme.txt", "user.origin", b"demo")


def test_disk_copy_both_directions(env, store_args, store_cluster):
    """enc (a file) -> plain (in the store of the parameter) -> enc2 (a file): with the
    rbd store, files go from a file disk to a disk on Ceph and back."""
    require_tools("rsync", "blkid")
    env.cli("disk", "create", "enc", "--size", "128M")
    env.cli("disk", "create", "plain", "--size", "128M", "--no-encrypted",
            *store_args(env.cli))
    env.cli("disk", "create", "enc2", "--size", "128M")
    dev = env.attach("enc")
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = env.mount(dev, "enc")
    _populate(mnt)
    expected = _tree_manifest(mnt)
    env.umount(mnt)
    env.cli("disk", "detach", "enc")

    # encrypted -> unencrypted (the destination has no file system yet: one is made)
    r = env.json("disk", "copy", "enc", "plain")
    assert r["source"] == "enc" and r["destination"] == "plain"
    # ... and back, unencrypted -> encrypted
    env.cli("disk", "copy", "plain", "enc2")
    listed = {d["name"]: d for d in env.json("disk", "list")}
    assert all(d["state"] == "available" for d in listed.values())   # all detached again
    assert not listed["plain"]["encrypted"] and listed["enc2"]["encrypted"]

    for name in ("plain", "enc2", "enc"):
        dev = env.attach(name, read_only=True)
        mnt = env.mount(dev, name, "ro")
        assert _tree_manifest(mnt) == expected, name
        assert os.getxattr(mnt / "docs" / "readme.txt", "user.origin") == b"demo"
        env.umount(mnt)
        env.cli("disk", "detach", name)
    # The plain disk's file holds the plaintext; the encrypted ones do not.
    needle = b"blockcrypt disk copy test"
    assert needle in env.container("plain", store_cluster).read_bytes()
    assert needle not in env.path("disks", "enc2").read_bytes()
