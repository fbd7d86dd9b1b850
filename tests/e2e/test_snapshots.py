"""Snapshots, disks from snapshots, reset, reinit, refusals and crash recovery.

These run the real CLI in subprocesses; data is written and read through the same
backend and volumes the nbdkit plugin uses (no block device needed).  The tests of
what must hold in every store (``store_env``) run once with container files in the
home and once on an RBD pool of the session's Ceph cluster (root), where a
container is read back with `rbd export`.  The quiesce tests run a real nbdkit
with the pause filter.  Block-device tests (snapshot while mounted, disk copy) are in
tests/e2e/test_lifecycle.py.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.storage import container
from blockcrypt.system import quiesce

from support.cli import run_cli
from support.env import container_dk
from support.nbdkit import connect, import_libnbd, serve_container
from support.prereq import require, require_tools
from support.stored import (allocated_bytes, catalog_ref, container_file, is_rbd,
                            open_disk_volume, stored_objects)

MiB = 1024 * 1024
GiB = 1024 * MiB


# -- helpers ----------------------------------------------------------------------

class Env:
    """One initialised home, the CLI bound to it, and its disks' and snapshots' bytes
    by name, in whichever store holds them (``cluster``: the Ceph cluster of an RBD
    store, None when every container is a file of the home)."""

    def __init__(self, home: Path, passphrase_file: Path, scratch: Path, cluster=None):
        self.home = home
        self.pf = passphrase_file
        self.scratch = scratch
        self.cluster = cluster
        self.where: list[str] = []        # `disk create` arguments naming the store

    def cli(self, *args, check=True, env=None):
        return run_cli(*args, home=self.home, passphrase_file=self.pf, check=check, env=env)

    def json(self, *args):
        import json
        return json.loads(self.cli(*args, "--json").stdout)

    def create(self, name: str, *args: str):
        """``disk create NAME --size ...`` in the store under test."""
        return self.json("disk", "create", name, *args, *self.where)

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.home / "blockcrypt.db")
        conn.row_factory = sqlite3.Row
        return conn

    def rows(self, table: str) -> list[dict]:
        with contextlib.closing(self.db()) as c:
            return [dict(r) for r in c.execute(f"SELECT * FROM {table} ORDER BY name")]

    def container(self, table: str, name: str) -> Path:
        """A container file holding disk or snapshot ``name`` as it is now."""
        return container_file(self.home, table, name, cluster=self.cluster,
                              scratch=self.scratch)

    def disk_path(self, name: str) -> Path:
        return self.container("disks", name)

    def snap_path(self, name: str) -> Path:
        return self.container("snapshots", name)

    def header(self, table: str, name: str) -> container.Header:
        return container.read_header(self.container(table, name))

    def dk(self, path: Path) -> bytes | None:
        """Unwrap a container's DK with the key store, as the test's own check."""
        return container_dk(self.home, self.pf, path)

    @contextlib.contextmanager
    def backend(self, name: str, read_only: bool = False):
        """Disk ``name`` served as the plugin serves it (the volume of its store)."""
        volume = open_disk_volume(self.home, name, read_only=read_only)
        try:
            dk = container_dk(self.home, self.pf, volume.header)
        except BaseException:
            volume.close()
            raise
        b = DiskBackend(volume, Secret(dk) if dk is not None else None, discard=False)
        try:
            yield b
        finally:
            b.close()

    def write(self, name: str, offset: int, data: bytes) -> None:
        with self.backend(name) as b:
            b.pwrite(data, offset, fua=True)

    def read(self, name: str, offset: int, length: int) -> bytes:
        with self.backend(name, read_only=True) as b:
            buf = bytearray(length)
            b.pread_into(buf, offset)
            return bytes(buf)

    def files(self, sub: str) -> list[str]:
        d = self.home / sub
        return sorted(os.listdir(d)) if d.exists() else []

    def stored(self) -> list[str]:
        """Every container file and, on RBD, every image and image snapshot."""
        return stored_objects(self.home, self.cluster)

    def stored_name(self, table: str, name: str) -> str:
        """How disk or snapshot ``name`` appears in :meth:`stored`."""
        ref = catalog_ref(self.home, table, name)
        return ref.split("/", 1)[1] if is_rbd(ref) else ref


@pytest.fixture
def env(home, passphrase_file, tmp_path) -> Env:
    """A home whose disks are files."""
    e = Env(home, passphrase_file, tmp_path)
    e.cli("init")
    return e


@pytest.fixture
def store_env(home, passphrase_file, tmp_path, store_cluster, store_args) -> Env:
    """A home whose disks are created in each store in turn (``store_name``)."""
    e = Env(home, passphrase_file, tmp_path, store_cluster)
    e.cli("init")
    e.where = store_args(e.cli)
    return e


def pattern(seed: int, length: int) -> bytes:
    import random
    return random.Random(seed).randbytes(length)


def data_area(path: Path) -> bytes:
    h = container.read_header(path)
    with open(path, "rb") as f:
        f.seek(h.data_offset)
        return f.read(h.size_bytes)


# -- snapshot of a detached disk, and a disk from it ---------------------------------

def test_snapshot_and_disk_from_snapshot_inherit_key_and_data(store_env, provider_args):
    env = store_env
    env.cli("key", "create", "--alias", "app", *provider_args(env.cli))
    env.create("src", "--size", "64M", "--key", "app", "--sector-size", "512")
    a, b = pattern(1, 3 * MiB + 512), pattern(2, 4096)
    env.write("src", 5 * MiB, a)
    env.write("src", 60 * MiB, b)

    snap = env.json("snapshot", "create", "src", "s1")
    assert snap["encrypted"] and not snap["quiesced"]
    src, spath = env.disk_path("src"), env.snap_path("s1")
    src_h, snap_h = container.read_header(src), container.read_header(spath)
    # Same ciphertext, never re-encrypted; same DK, lineage, CMK and sector size.
    assert data_area(spath) == data_area(src)
    assert snap_h.lineage_id == src_h.lineage_id and snap_h.cmk_id == src_h.cmk_id
    assert snap_h.sector_size == 512 and src_h.kind == container.Kind.DISK
    assert env.dk(spath) == env.dk(src)
    if env.cluster is None:
        # A snapshot file is its own container: own uid and wrapping (FORMAT.md).
        assert snap_h.kind == container.Kind.SNAPSHOT
        assert snap_h.uid != src_h.uid and snap_h.uid_hex == snap["id"]
        assert snap_h.wrapped_dk != src_h.wrapped_dk
        assert os.stat(spath).st_mode & 0o777 == 0o600
    else:
        # F-43: an RBD snapshot holds the disk's header at that instant; the catalog
        # row has the snapshot's own id and records the disk's.
        assert snap_h == src_h and snap["id"] != src_h.uid_hex
        assert {s["name"]: s for s in env.rows("snapshots")}["s1"]["disk_id"] == \
            src_h.uid_hex

    copy = env.json("disk", "create", "copy", "--from-snapshot", "s1", "--size", "128M",
                    "--flatten")
    assert copy["depends_on_snapshot"] is False
    cp_h = env.header("disks", "copy")
    assert cp_h.kind == container.Kind.DISK and cp_h.size_bytes == 128 * MiB
    assert cp_h.uid_hex == copy["id"] and copy["id"] not in (src_h.uid_hex, snap["id"])
    assert cp_h.lineage_id == src_h.lineage_id and cp_h.cmk_id == src_h.cmk_id
    assert cp_h.sector_size == 512 and cp_h.encrypted
    assert env.dk(env.disk_path("copy")) == env.dk(src)   # key inheritance: the same DK
    assert env.read("copy", 5 * MiB, len(a)) == a
    assert env.read("copy", 60 * MiB, len(b)) == b
    assert env.read("copy", 100 * MiB, 4096) == bytes(4096)   # the grown part is blank
    disk = {d["name"]: d for d in env.rows("disks")}["copy"]
    assert disk["source_snapshot_id"] == snap["id"] and disk["lineage_id"] == snap_h.lineage_hex

    # Catalog rows carry the CMK: the key's dependants list the snapshot and both disks.
    shown = env.json("key", "show", "app")
    assert {"disk src", "disk copy", "snapshot s1"} <= set(shown["dependants"])

    # Deleting the snapshot does not affect the disk made from it.
    held = env.stored_name("snapshots", "s1")
    assert held in env.stored()
    env.cli("snapshot", "delete", "s1")
    assert held not in env.stored() and env.rows("snapshots") == []
    assert env.read("copy", 5 * MiB, len(a)) == a

    # Writes to the new disk do not touch the source (independent copies).
    env.write("copy", 5 * MiB, pattern(3, 4096))
    assert env.read("src", 5 * MiB, len(a)) == a


def test_unencrypted_lineage_and_export(store_env, tmp_path):
    env = store_env
    env.create("plain", "--size", "32M", "--no-encrypted")
    data = pattern(4, 2 * MiB)
    env.write("plain", 7 * MiB, data)
    env.cli("snapshot", "create", "plain", "ps")
    env.cli("disk", "create", "plain2", "--from-snapshot", "ps")
    h = env.header("disks", "plain2")
    assert not h.encrypted and h.cipher == "none" and h.wrapped_dk is None
    assert env.read("plain2", 7 * MiB, len(data)) == data
    # Lineage of unencrypted data: the id of the disk it descends from.
    rows = {d["name"]: d for d in env.rows("disks")}
    snaps = {s["name"]: s for s in env.rows("snapshots")}
    assert snaps["ps"]["lineage_id"] == rows["plain"]["id"]
    assert rows["plain2"]["lineage_id"] == rows["plain"]["id"]
    # Both may be reset to ps (same lineage) in the home; on Ceph a reset is a rollback
    # of the disk's own snapshot, so plain2's is refused and changes nothing.
    for name in ("plain", "plain2"):
        env.write(name, 7 * MiB, bytes(4096))
        if env.cluster is not None and name == "plain2":
            before = env.stored()
            cp = env.cli("disk", "reset", name, "--snapshot", "ps", check=False)
            assert cp.returncode == errors.InvalidInput.exit_code, cp.stderr
            assert b"plain2" in cp.stderr and env.stored() == before
            continue
        env.cli("disk", "reset", name, "--snapshot", "ps")
        assert env.read(name, 7 * MiB, len(data)) == data

    # Export of an unencrypted snapshot: the raw disk image, sparse.
    raw = tmp_path / "plain.img"
    env.cli("snapshot", "export", "ps", raw)
    assert raw.stat().st_size == 32 * MiB
    image = raw.read_bytes()
    assert image[7 * MiB:7 * MiB + len(data)] == data
    assert image.count(0) == len(image) - len(data) + data.count(0)
    assert raw.stat().st_blocks * 512 <= 3 * MiB
    # Never overwrites an existing file.
    cp = env.cli("snapshot", "export", "ps", raw, check=False)
    assert cp.returncode == errors.AlreadyExists.exit_code


def test_snapshot_of_sparse_disk_is_thin(store_env):
    """10 GiB disk holding 100 MiB of data -> the snapshot occupies ~100 MiB."""
    env = store_env
    env.create("big", "--size", "10G")
    chunk = pattern(5, 10 * MiB)
    with env.backend("big") as b:
        for i in range(10):          # 100 MiB spread over the disk
            b.pwrite(chunk, i * GiB + 4096 * i, fua=False)
        b.flush()
    s = env.json("snapshot", "create", "big", "bigsnap")
    assert s["size_bytes"] == 10 * GiB
    allocated = allocated_bytes(env.home, "snapshots", "bigsnap", env.cluster)
    if env.cluster is None:
        assert 100 * MiB <= allocated <= 110 * MiB, allocated
        assert s["allocated_bytes"] == allocated
    else:
        # `rbd du` counts whole 4 MiB objects: each 10 MiB run touches 3 of them;
        # blockcrypt counts the extents RADOS reports (an object from its start
        # to its last write), so between the data and rbd du's figure.
        assert 100 * MiB <= allocated <= 10 * 3 * 4 * MiB, allocated
        assert 100 * MiB <= s["allocated_bytes"] <= allocated, s
    listed = env.json("snapshot", "list", "--disk", "big")
    assert [x["name"] for x in listed] == ["bigsnap"]
    assert env.json("snapshot", "list", "--disk", "other") == []


@pytest.mark.e2e
@pytest.mark.root
def test_snapshot_is_a_reflink_on_xfs(xfs_reflink_dir, passphrase_file):
    """With the home on a reflink file system, snapshots and disks from them are clones."""
    env = Env(xfs_reflink_dir / "home", passphrase_file, xfs_reflink_dir)
    env.cli("init")
    env.cli("disk", "create", "d", "--size", "64M")
    data = pattern(10, 5 * MiB)
    env.write("d", MiB, data)
    assert env.json("snapshot", "create", "d", "s")["copy_method"] == "reflink"
    assert data_area(env.snap_path("s")) == data_area(env.disk_path("d"))
    assert env.json("disk", "create", "d2", "--from-snapshot", "s")["copy_method"] == "reflink"
    assert env.read("d2", MiB, len(data)) == data


# -- refusals --------------------------------------------------------------------------

def _state(env: Env):
    return env.rows("disks"), env.rows("snapshots"), env.stored()


def test_every_refusal_has_its_class_and_changes_nothing(store_env, tmp_path, provider_args):
    env = store_env
    kp = provider_args(env.cli)
    env.cli("key", "create", "--alias", "k1", *kp)
    env.cli("key", "create", "--alias", "k2", *kp)
    env.create("enc", "--size", "16M", "--key", "k1")
    env.create("enc2", "--size", "16M", "--key", "k1")
    env.create("plain", "--size", "16M", "--no-encrypted")
    env.create("plain2", "--size", "16M", "--no-encrypted")
    env.cli("snapshot", "create", "enc", "es")
    env.cli("snapshot", "create", "plain", "ps")
    env.cli("snapshot", "create", "enc2", "es2")
    env.cli("snapshot", "create", "plain2", "ps2")
    before = _state(env)

    cases = [
        (errors.ConversionRefused,
         ["disk", "create", "x", "--from-snapshot", "es", "--no-encrypted"]),
        (errors.EncryptionRefused, ["disk", "create", "x", "--from-snapshot", "ps", "--encrypted"]),
        (errors.EncryptionRefused, ["disk", "create", "x", "--from-snapshot", "ps", "--key", "k1"]),
        (errors.CmkChangeRefused, ["disk", "create", "x", "--from-snapshot", "es", "--key", "k2"]),
        (errors.ExportRefused, ["snapshot", "export", "es", str(tmp_path / "out.img")]),
        (errors.LineageMismatch, ["disk", "reset", "enc", "--snapshot", "es2"]),
        (errors.LineageMismatch, ["disk", "reset", "plain", "--snapshot", "ps2"]),
        (errors.LineageMismatch, ["disk", "reset", "enc", "--snapshot", "ps"]),
        (errors.LineageMismatch, ["disk", "reset", "plain", "--snapshot", "es"]),
        (errors.InvalidSize, ["disk", "create", "x", "--from-snapshot", "es", "--size", "8M"]),
        (errors.InvalidInput, ["disk", "create", "x", "--from-snapshot", "es", "--sector-size",
                               "512"]),
        (errors.SnapshotNotFound, ["disk", "create", "x", "--from-snapshot", "nope"]),
        (errors.AlreadyExists, ["snapshot", "create", "enc", "es"]),
        (errors.AlreadyExists, ["disk", "create", "enc2", "--from-snapshot", "es"]),
        (errors.InvalidName, ["snapshot", "create", "enc", "../evil"]),
    ]
    for cls, argv in cases:
        cp = env.cli(*argv, check=False)
        assert cp.returncode == cls.exit_code, (argv, cp.returncode, cp.stderr)
        if issubclass(cls, errors.PolicyRefused):
            assert b"blockcrypt disk copy" in cp.stderr, (argv, cp.stderr)
        assert _state(env) == before, argv
    assert not (tmp_path / "out.img").exists()

    # A disabled CMK wraps nothing: no snapshot of a disk under it.
    env.cli("key", "disable", "k1", "--force")
    cp = env.cli("snapshot", "create", "enc", "while-disabled", check=False)
    assert cp.returncode == errors.KeyStateError.exit_code, cp.stderr
    assert _state(env) == before
    env.cli("key", "enable", "k1")

    # Confirming the snapshot's own properties is not a contradiction.
    env.cli("disk", "create", "ok1", "--from-snapshot", "es", "--encrypted", "--key", "k1",
            "--sector-size", "4096")
    env.cli("disk", "create", "ok2", "--from-snapshot", "ps", "--no-encrypted")


def test_downgraded_header_is_never_snapshotted_as_plain(env):
    """A disk file whose header was rewritten as unencrypted (the checksum is not
    a MAC) must not yield an unencrypted snapshot or disk: that would be a
    conversion behind the catalog's back."""
    env.cli("disk", "create", "enc", "--size", "16M")
    env.cli("snapshot", "create", "enc", "good")
    path = env.disk_path("enc")
    original = container.read_header(path)
    container.write_header(path, original.replace(
        encrypted=False, cipher=container.CIPHER_NONE, cmk_id=None, cmk_version=None,
        lineage_id=None, wrapped_dk=None))
    before = _state(env)
    for argv in (["snapshot", "create", "enc", "bad"], ["disk", "reinit", "enc"]):
        cp = env.cli(*argv, check=False)
        assert cp.returncode == errors.FormatError.exit_code, (argv, cp.stderr)
        assert _state(env) == before
    spath = env.snap_path("good")
    container.write_header(spath, container.read_header(spath).replace(
        encrypted=False, cipher=container.CIPHER_NONE, cmk_id=None, cmk_version=None,
        lineage_id=None, wrapped_dk=None))
    cp = env.cli("disk", "create", "x", "--from-snapshot", "good", check=False)
    assert cp.returncode == errors.FormatError.exit_code, cp.stderr
    cp = env.cli("snapshot", "export", "good", env.home.parent / "x.img", check=False)
    assert cp.returncode == errors.ExportRefused.exit_code, cp.stderr
    assert _state(env) == before and not (env.home.parent / "x.img").exists()


# -- reset and reinit ------------------------------------------------------------------

def test_reset_and_reinit(store_env):
    env = store_env
    env.create("d", "--size", "32M")
    dk = env.dk(env.disk_path("d"))
    uid = env.header("disks", "d").uid
    first, second = pattern(6, MiB), pattern(7, MiB)
    env.write("d", 0, first)
    env.cli("snapshot", "create", "d", "s-first")
    env.write("d", 0, second)
    env.write("d", 20 * MiB, second)

    r = env.json("disk", "reset", "d", "--snapshot", "s-first")
    assert r["name"] == "d"
    assert env.read("d", 0, MiB) == first
    assert env.read("d", 20 * MiB, MiB) == bytes(MiB)
    path = env.disk_path("d")
    h = container.read_header(path)
    assert h.kind == container.Kind.DISK and h.uid == uid and env.dk(path) == dk

    # A disk created blank is reinitialised blank.  In the home it may have snapshots;
    # on Ceph (F-43) not while its image has any: refused, naming them, nothing changed.
    if env.cluster is not None:
        before = _state(env)
        cp = env.cli("disk", "reinit", "d", check=False)
        assert cp.returncode == errors.StateError.exit_code, cp.stderr
        assert b"snapshots" in cp.stderr and _state(env) == before

    # Reinit of a disk created from a snapshot: back to the snapshot.
    env.cli("disk", "create", "child", "--from-snapshot", "s-first", "--flatten")
    child_dk = env.dk(env.disk_path("child"))
    env.write("child", 0, second)
    env.cli("disk", "reinit", "child")
    assert env.read("child", 0, MiB) == first
    assert env.dk(env.disk_path("child")) == child_dk == dk
    # ... which needs the snapshot to still exist.
    env.cli("snapshot", "delete", "s-first")
    cp = env.cli("disk", "reinit", "child", check=False)
    assert cp.returncode == errors.SnapshotNotFound.exit_code
    assert env.read("child", 0, MiB) == first

    # Reinit of the disk created blank: all zeros again, thin, same key and identity.
    env.cli("disk", "reinit", "d")
    assert env.read("d", 0, MiB) == bytes(MiB)
    path = env.disk_path("d")
    h = container.read_header(path)
    assert h.uid == uid and env.dk(path) == dk
    if env.cluster is None:
        assert os.stat(path).st_blocks * 512 <= 64 * 1024
    assert [n for n in env.stored() if ".tmp-" in n or ".deleted" in n] == []


# -- crash safety --------------------------------------------------------------------

def _steps(env: Env, tmp_path: Path, *argv) -> list[str]:
    listing = tmp_path / "steps.txt"
    listing.unlink(missing_ok=True)
    env.cli(*argv, env={"BLOCKCRYPT_TESTONLY_CRASH_LIST": str(listing)})
    prefixes = ("snapshot", "from-snapshot", "reset", "reinit", "lifecycle")
    return [s for s in listing.read_text().split() if s.startswith(prefixes)]


def _consistent(env: Env, baseline: set[str]) -> None:
    """Catalog intact; every row has its container and every container its row (on
    RBD: the images and image snapshots the test made, beside ``baseline``, what the
    session's pool held before)."""
    with contextlib.closing(env.db()) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    expected = {env.stored_name(table, r["name"])
                for table in ("disks", "snapshots") for r in env.rows(table)}
    assert set(env.stored()) - baseline == expected
    if env.cluster is None:
        for ref in expected:
            container.read_header(env.home / ref)


def _recover(env: Env) -> None:
    """The next commands: they finish or undo what a killed one left.  (On Ceph only
    a command that uses the store does: `snapshot list` never contacts a cluster.)"""
    env.cli("snapshot", "list")
    if env.cluster is not None:
        env.create("next", "--size", "16M")
        env.cli("disk", "delete", "next")


def test_kill_at_every_step_leaves_nothing_behind(store_env, tmp_path):
    env = store_env
    baseline = set(env.stored())
    env.create("d", "--size", "16M")
    data = pattern(8, 64 * 1024)
    env.write("d", 0, data)
    env.cli("snapshot", "create", "d", "probe-snap")
    snap_steps = _steps(env, tmp_path, "snapshot", "create", "d", "probe2")
    from_steps = _steps(env, tmp_path, "disk", "create", "probe-disk", "--from-snapshot",
                        "probe-snap")
    reset_steps = _steps(env, tmp_path, "disk", "reset", "d", "--snapshot", "probe-snap")
    env.create("blank", "--size", "16M")
    reinit_steps = _steps(env, tmp_path, "disk", "reinit", "blank")
    assert {"snapshot.before-commit", "snapshot.after-commit"} <= set(snap_steps)
    if env.cluster is None:
        assert "snapshot.after-copy" in snap_steps
    assert {"from-snapshot.after-copy", "from-snapshot.after-commit"} <= set(from_steps)
    assert "reset.before-swap" in reset_steps and "reinit.before-swap" in reinit_steps

    def crash(step, *argv):
        cp = env.cli(*argv, check=False, env={"BLOCKCRYPT_TESTONLY_CRASH_AT": step})
        assert cp.returncode == -9, (step, cp.returncode, cp.stderr)
        _recover(env)
        _consistent(env, baseline)

    for i, step in enumerate(snap_steps):
        crash(step, "snapshot", "create", "d", f"s{i}")
        names = [s["name"] for s in env.rows("snapshots")]
        if f"s{i}" in names:                 # committed: complete and usable
            assert step.endswith("after-commit")
            env.cli("disk", "create", f"check{i}", "--from-snapshot", f"s{i}")
            assert env.read(f"check{i}", 0, len(data)) == data
    for i, step in enumerate(from_steps):
        crash(step, "disk", "create", f"f{i}", "--from-snapshot", "probe-snap")
    other = pattern(9, len(data))
    env.write("d", 0, other)
    dk = env.dk(env.disk_path("d"))
    for step in reset_steps:            # every step is before the swap: the old contents
        crash(step, "disk", "reset", "d", "--snapshot", "probe-snap")
        assert env.read("d", 0, len(data)) == other
        assert env.dk(env.disk_path("d")) == dk
    env.write("blank", 0, other)
    for step in reinit_steps:
        crash(step, "disk", "reinit", "blank")
        assert env.read("blank", 0, len(other)) == other
    # A killed delete: the snapshot is gone or still whole, never half.  (On Ceph the
    # disks cloned from it go first: a snapshot with clones is not deleted.)
    probe = {s["name"]: s for s in env.rows("snapshots")}["probe-snap"]
    for d in env.rows("disks"):
        if d["source_snapshot_id"] == probe["id"]:
            env.cli("disk", "delete", d["name"])
    crash("snapshot-delete.in-txn", "snapshot", "delete", "probe-snap")   # not committed
    assert "probe-snap" in [s["name"] for s in env.rows("snapshots")]
    env.cli("disk", "create", "whole", "--from-snapshot", "probe-snap", "--flatten")
    assert env.read("whole", 0, len(data)) == data
    env.cli("disk", "delete", "whole")
    crash("snapshot-delete.after-commit", "snapshot", "delete", "probe-snap")
    assert "probe-snap" not in [s["name"] for s in env.rows("snapshots")]


def test_delete_racing_a_create_between_commit_and_rename(tmp_path):
    """A create commits its row, then renames its temp file; a delete that runs in
    between takes the temp file, and the creator's rename then leaves it."""
    from blockcrypt.storage.publish import doom, publish
    final = tmp_path / "abc.bcd"
    tmp = tmp_path / "abc.bcd.tmp-123-456"
    tmp.write_bytes(b"container")
    doomed = doom(final)
    assert doomed == tmp_path / "abc.bcd.deleted" and doomed.read_bytes() == b"container"
    assert publish(tmp, final) is False
    assert sorted(os.listdir(tmp_path)) == ["abc.bcd.deleted"]
    # the ordinary order: published first, then deleted
    tmp.write_bytes(b"second")
    doomed.unlink()
    assert publish(tmp, final) is True
    assert doom(final).read_bytes() == b"second" and not final.exists()


# -- quiesce (nbdkit's pause filter) -----------------------------------------------------

@pytest.fixture
def paused_server(tmp_path):
    require_tools("nbdkit")
    require(import_libnbd() is not None, "python3-libnbd not installed")
    path = tmp_path / "c.bcd"
    container.create_container(path, container.new_header("disk", 16 * MiB, 4096,
                                                          encrypted=False))
    ctl = tmp_path / "ctl.sock"
    with serve_container(path, filters=("pause",), filter_args=(f"pause-control={ctl}",)) as srv:
        h = connect(srv.socket)
        yield h, ctl, path
        h.shutdown()


def _file_bytes(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(container.DATA_ALIGN + offset)
        return f.read(length)


def _wait_done(h, cookie, timeout_s=10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not h.aio_command_completed(cookie):
        assert time.monotonic() < deadline, "request did not complete"
        h.poll(100)


@pytest.mark.e2e
def test_paused_holds_requests_until_resume(paused_server):
    h, ctl, path = paused_server
    with quiesce.paused(ctl):
        cookie = h.aio_pwrite(b"W" * 4096, 8192)
        for _ in range(10):
            h.poll(50)
        assert not h.aio_command_completed(cookie)      # held by the filter
        assert _file_bytes(path, 8192, 4096) == bytes(4096)
    _wait_done(h, cookie)
    assert _file_bytes(path, 8192, 4096) == b"W" * 4096


@pytest.mark.e2e
def test_paused_resumes_on_error_and_recovers_from_a_killed_pauser(paused_server):
    h, ctl, _path = paused_server
    with pytest.raises(RuntimeError):
        with quiesce.paused(ctl):
            raise RuntimeError("copy failed")
    h.pwrite(b"a" * 4096, 0)                 # not paused any more

    # A pauser that dies without resuming (kill -9) leaves I/O held ...
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(ctl))
    s.sendall(b"p")
    assert s.recv(1) == b"P"
    s.close()
    cookie = h.aio_pwrite(b"b" * 4096, 4096)
    for _ in range(10):
        h.poll(50)
    assert not h.aio_command_completed(cookie)
    # ... until the next pause/resume on the socket ends it.
    quiesce.resume(ctl)
    _wait_done(h, cookie)
    with quiesce.paused(ctl):
        pass
    h.pwrite(b"c" * 4096, 0)


@pytest.mark.e2e
def test_pause_waits_for_in_flight_requests(paused_server):
    """'P' comes only after requests already received have completed: a large
    write issued just before the pause is entirely in the file when paused."""
    h, ctl, path = paused_server
    big = os.urandom(8 * MiB)
    for _ in range(5):
        cookie = h.aio_pwrite(big, 0)
        h.poll(0)                            # push the request out
        with quiesce.paused(ctl):
            # Received before the pause: complete; not yet received: untouched.
            # Never a torn write in the file while paused.
            assert _file_bytes(path, 0, len(big)) in (big, bytes(len(big)))
        _wait_done(h, cookie)
        assert _file_bytes(path, 0, len(big)) == big
        h.pwrite(bytes(len(big)), 0)


def test_pause_errors_are_clean(tmp_path):
    with pytest.raises(errors.StateError):
        with quiesce.paused(tmp_path / "no-such.sock"):
            pass
