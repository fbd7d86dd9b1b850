"""Disks on Ceph RBD against the session's real cluster (issue 17).

- `store add` checks the cluster, the cephx user and the pool before recording
  anything: each bad input has its own error and exit code; `store remove` is
  refused while a disk lives in the store;
- an image removed behind blockcrypt's back is reported as the disk's, naming the
  store;
- two hosts (two homes) share the cluster and one KMIP key manager: a disk created
  and written on A is imported on B (`disk import --store`), attached there with
  A's data; while B serves it A's attach is refused naming B; after kill -9 of B's
  server the lock stays (never broken silently) until A's `--break-lock`, which is
  audited and takes the disk over with B's last writes.

The filesystem lifecycle (create, attach, mkfs, mount, write, detach, re-attach,
verify, delete) runs over both stores in tests/e2e/test_attach.py (``store_name``),
which also checks F-42 (the data area of an exported image: ciphertext or plaintext
where FORMAT.md says).  Rules of docs/FORMAT.md §10 cited here: F-38 (image names),
F-39 (staged creation, host markers), F-40 (header updates), F-41 (one server, the
lock never broken silently), F-43 (snapshots, clones, rollback, reinit).
"""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.system import commands

from support.env import Env, dd_read, dd_write
from support.prereq import require_block_devices
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1 << 20


def _add(e: Env, cluster, keyring: Path, name: str = "ceph", *extra: str):
    return e.cli("store", "add", name, "--type", "rbd", "--conf", str(cluster.conf),
                 "--pool", cluster.pool, "--client-id", "blockcrypt", "--keyring",
                 str(keyring), *extra, check=False)


def _refused(e: Env, error: type[errors.BlockcryptError], cp) -> str:
    assert cp.returncode == error.exit_code, (cp.returncode, cp.stderr.decode())
    return cp.stderr.decode()


def test_store_add_checks_before_recording(env, ceph_cluster, tmp_path):
    """... and F-38: a disk's image is bc-<its id>, recorded as rbd:STORE/bc-<id>."""
    good = ceph_cluster.add_client("blockcrypt", tmp_path / "good.keyring")
    wrong = tmp_path / "wrong.keyring"
    wrong.write_text(good.read_text().split("key = ")[0] +
                     "key = AQBsYQdnAAAAABAAbS1pbGxpb25zb2ZyYW5kb21ieXRlcw==\n")
    wrong.chmod(0o600)
    msg = _refused(env, errors.StoreAuthRefused, _add(env, ceph_cluster, wrong))
    assert "store 'ceph'" in msg and "client.blockcrypt" in msg and str(wrong) in msg
    loose = tmp_path / "loose.keyring"
    loose.write_text(good.read_text())
    loose.chmod(0o644)
    assert "chmod 600" in _refused(env, errors.InsecureFile, _add(env, ceph_cluster, loose))
    cp = env.cli("store", "add", "ceph", "--type", "rbd", "--conf", str(ceph_cluster.conf),
                 "--pool", "nopool", "--client-id", "blockcrypt", "--keyring", str(good),
                 check=False)
    msg = _refused(env, errors.PoolMissing, cp)
    assert "'nopool' does not exist" in msg and "rbd pool init nopool" in msg
    # a cluster nobody answers for: refused within the connect timeout, never a hang
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = tmp_path / "dead.conf"
    mon = next(line for line in ceph_cluster.conf.read_text().splitlines()
               if line.startswith("mon_host"))
    dead.write_text(ceph_cluster.conf.read_text().replace(
        mon, f"mon_host = v2:127.0.0.1:{s.getsockname()[1]}"))
    s.close()
    cp = env.cli("store", "add", "ceph", "--type", "rbd", "--conf", str(dead), "--pool", "rbd",
                 "--client-id", "blockcrypt", "--keyring", str(good), check=False,
                 timeout=60)
    assert "cannot be reached" in _refused(env, errors.StoreUnreachable, cp)
    for bad in ("0", "3601", "x"):
        cp = _add(env, ceph_cluster, good, "ceph", "--io-timeout", bad)
        assert cp.returncode in (errors.InvalidInput.exit_code, 2), cp.stderr
    assert env.json("store", "list") == []                   # nothing recorded

    assert _add(env, ceph_cluster, good).returncode == 0
    assert _refused(env, errors.AlreadyExists, _add(env, ceph_cluster, good))
    shown = env.json("store", "show", "ceph")
    assert shown["pool"] == ceph_cluster.pool and shown["keyring"] == str(good)
    assert shown["io_timeout_s"] == 30                        # the default
    assert "AQ" not in env.cli("store", "show", "ceph", "--json").stdout.decode()  # no key
    d = env.create("db", "64M", "--store", "ceph")
    assert d["store"] == "ceph" and d["path"] == f"rbd:ceph/bc-{d['id']}"
    assert f"bc-{d['id']}" in ceph_cluster.images()
    msg = env.refused(errors.StateError, "store", "remove", "ceph")
    assert "disk db" in msg
    env.refused(errors.DiskStoreNotFound, "disk", "create", "x", "--size", "16M",
                "--store", "nosuch")
    env.cli("disk", "delete", "db")
    assert f"bc-{d['id']}" not in ceph_cluster.images()
    env.cli("store", "remove", "ceph")
    assert env.json("store", "list") == []


def test_image_removed_behind_blockcrypts_back(env, ceph_cluster, tmp_path):
    keyring = ceph_cluster.add_client("blockcrypt", tmp_path / "k.keyring")
    assert _add(env, ceph_cluster, keyring).returncode == 0
    d = env.create("gone", "64M", "--store", "ceph")
    ceph_cluster.rbd("rm", f"{ceph_cluster.pool}/bc-{d['id']}")
    msg = env.refused(errors.ImageMissing, "disk", "attach", "gone")
    assert "disk 'gone'" in msg and "store 'ceph'" in msg
    assert env.json("disk", "show", "gone")["state"] == "available"
    env.cli("disk", "delete", "gone")       # the catalog entry can still be removed


def test_two_hosts_share_a_store_and_one_server_at_a_time(kmip_server, ceph_cluster,
                                                           tmp_path, passphrase_file):
    """F-41 (and F-38: an import whose image name is not its header's id is refused)."""
    require_block_devices()
    srv = kmip_server
    hosts: dict[str, Env] = {}
    try:
        for h in "AB":
            (tmp_path / h).mkdir()
            hosts[h] = Env(tmp_path / h / "home", passphrase_file, tmp_path / h)
        A, B = hosts["A"], hosts["B"]
        A.cli(*srv.provider_args("kms", srv.client("rbd-host-a", "tenant-1")))
        B.cli(*srv.provider_args("kms", srv.client("rbd-host-b", "tenant-1")))
        for h, e in hosts.items():
            keyring = ceph_cluster.add_client("blockcrypt", tmp_path / h / "k.keyring")
            assert _add(e, ceph_cluster, keyring).returncode == 0
        A.json("key", "create", "--alias", "shared", "--provider", "kms")
        d = A.create("vol", "64M", "--key", "shared", "--store", "ceph")
        image = f"bc-{d['id']}"
        pattern = os.urandom(MiB)
        dd_write(A.attach("vol")["device"], pattern, 3 * MiB)
        A.detach("vol")

        # B learns of the image, checked: header, id, and the key unwraps on B.
        B.refused(errors.ImageMissing, "disk", "import", "vol", "bc-" + "0" * 32,
                  "--store", "ceph")
        got = B.json("disk", "import", "vol", image, "--store", "ceph")
        assert got["id"] == d["id"] and got["store"] == "ceph"
        assert f"rbd:ceph/{image}" == got["path"]
        B.refused(errors.StateError, "disk", "import", "again", image, "--store", "ceph")
        dev_b = B.attach("vol")["device"]
        assert dd_read(dev_b, MiB, 3 * MiB) == pattern
        # A disk on RBD is served with more requests in flight than a file disk.
        argv = Path(f"/proc/{B.json('disk', 'show', 'vol')['nbdkit_pid']}/cmdline")
        argv = argv.read_bytes().split(b"\0")
        assert argv[argv.index(b"--threads") + 1] == b"%d" % commands.RBD_NBDKIT_THREADS

        # One server at a time: A is refused, naming B (host, home).
        msg = A.refused(errors.DiskHeld, "disk", "attach", "vol")
        assert str(B.home) in msg and "--break-lock" in msg
        A.refused(errors.DiskHeld, "disk", "serve", "vol", "--unix", str(tmp_path / "a.sock"))
        assert A.json("disk", "show", "vol")["state"] == "available"

        # B writes, then its server dies (kill -9): the lock is not broken silently.
        second = os.urandom(MiB)
        dd_write(dev_b, second, 5 * MiB)
        os.kill(B.json("disk", "show", "vol")["nbdkit_pid"], signal.SIGKILL)
        msg = A.refused(errors.DiskHeld, "disk", "attach", "vol")
        assert str(B.home) in msg
        n = len(A.json("audit"))
        dev_a = A.attach("vol", "--break-lock")["device"]
        assert dd_read(dev_a, MiB, 3 * MiB) == pattern
        assert dd_read(dev_a, MiB, 5 * MiB) == second       # B's acknowledged writes
        broke = [r for r in A.json("audit")[n:] if r["operation"] == "disk-break-lock"]
        assert len(broke) == 1 and str(B.home) in str(broke[0]["details"])
        A.json("audit", "verify")
        # B's attachment is stale now; cleaning it up does not disturb A's server.
        wait_for(lambda: B.json("disk", "show", "vol")["state"] in ("stale", "available"),
                 timeout_s=30, what="B's dead attachment seen as stale")
        B.cli("disk", "detach", "vol", check=False)
        assert B.refused(errors.DiskHeld, "disk", "attach", "vol")
        A.detach("vol")
    finally:
        for e in hosts.values():
            e.cleanup()


def test_snapshots_clones_and_reset_on_rbd(env, ceph_cluster, tmp_path):
    """F-43. Snapshots of an RBD disk are RBD snapshots (attached: taken by the server's
    librbd, no pause filter), disks from them are clones with their own id and the same
    data key, reset is a rollback; what depends on what is never deleted.  (Snapshot
    contents, key inheritance, reset, reinit, export and every refusal of the mission run
    over both stores in tests/e2e/test_snapshots.py.)"""
    keyring = ceph_cluster.add_client("blockcrypt", tmp_path / "k.keyring")
    assert _add(env, ceph_cluster, keyring).returncode == 0
    env.cli("key", "create", "--alias", "app")
    d = env.create("src", "64M", "--key", "app", "--store", "ceph")
    first, second = os.urandom(MiB), os.urandom(MiB)
    dev = env.attach("src")["device"]
    dd_write(dev, first, 2 * MiB)
    snap = env.json("snapshot", "create", "src", "s1")          # attached
    assert snap["copy_method"] == "rbd-snapshot" and snap["quiesced"] is True
    assert snap["path"] == f"rbd:ceph/bc-{d['id']}@{snap['id']}"
    assert snap["id"] in [s for s in ceph_cluster.rbd(
        "snap", "ls", f"{ceph_cluster.pool}/bc-{d['id']}").stdout.split()]
    dd_write(dev, second, 2 * MiB)                              # after the instant
    env.detach("src")

    c = env.json("disk", "create", "clone", "--from-snapshot", "s1")
    assert c["store"] == "ceph" and c["id"] not in (d["id"], snap["id"])
    assert c["cmk_id"] == d["cmk_id"] and c["lineage_id"] == d["lineage_id"]
    info = ceph_cluster.rbd("info", "--format", "json", f"{ceph_cluster.pool}/bc-{c['id']}")
    assert f"bc-{d['id']}" in info.stdout and snap["id"] in info.stdout   # an RBD clone
    exported = ceph_cluster.export(c["path"], tmp_path / "clone.bcd")
    from blockcrypt.storage import container
    h = container.read_header(exported)
    assert h.uid_hex == c["id"] and h.kind == container.Kind.DISK and h.encrypted
    dev = env.attach("clone")["device"]
    assert dd_read(dev, MiB, 2 * MiB) == first                  # the instant's data
    dd_write(dev, second, 10 * MiB)
    env.detach("clone")

    msg = env.refused(errors.StateError, "snapshot", "delete", "s1")
    assert "disk clone" in msg
    # --flatten: the snapshot's data copied into the new disk, which then has no parent
    env.refused(errors.InvalidInput, "disk", "create", "y", "--size", "16M", "--flatten")
    f = env.json("disk", "create", "flat", "--from-snapshot", "s1", "--flatten")
    assert f["depends_on_snapshot"] is False and c["depends_on_snapshot"] is True
    info = json.loads(ceph_cluster.rbd("info", "--format", "json",
                                       f"{ceph_cluster.pool}/bc-{f['id']}").stdout)
    assert "parent" not in info
    dev = env.attach("flat")["device"]
    assert dd_read(dev, MiB, 2 * MiB) == first
    env.detach("flat")
    msg = env.refused(errors.StateError, "snapshot", "delete", "s1")
    assert "disk clone" in msg and "flat" not in msg
    env.cli("disk", "delete", "flat")
    msg = env.refused(errors.StateError, "disk", "delete", "src")
    assert "snapshot s1" in msg

    env.cli("disk", "reset", "src", "--snapshot", "s1")         # rollback
    dev = env.attach("src")["device"]
    assert dd_read(dev, MiB, 2 * MiB) == first
    assert dd_read(dev, MiB, 10 * MiB) == bytes(MiB)            # the clone's write stays there
    env.refused(errors.DiskAttached, "disk", "reset", "src", "--snapshot", "s1")
    env.detach("src")

    # reinit: the clone back to the snapshot's data (a new clone swapped in), the
    # source refused while its image has snapshots, then blank once they are gone
    env.cli("disk", "reinit", "clone")
    dev = env.attach("clone")["device"]
    assert dd_read(dev, MiB, 10 * MiB) == bytes(MiB) and dd_read(dev, MiB, 2 * MiB) == first
    env.detach("clone")
    assert "snapshots" in env.refused(errors.StateError, "disk", "reinit", "src")
    env.cli("disk", "delete", "clone")
    env.cli("snapshot", "delete", "s1")
    env.cli("disk", "reinit", "src")
    dev = env.attach("src")["device"]
    assert dd_read(dev, MiB, 2 * MiB) == bytes(MiB)
    env.detach("src")
    assert not [i for i in ceph_cluster.images() if ".tmp-" in i or ".deleted-" in i]
    env.cli("disk", "delete", "src")
    assert not [i for i in ceph_cluster.images() if d["id"] in i or c["id"] in i]


CREATE_STEPS = ["disk-create.after-file", "disk-create.in-txn", "disk-create.after-row"]
DELETE_STEPS = ["disk-delete.in-txn", "disk-delete.after-row"]
SNAPSHOT_STEPS = ["snapshot.before-commit", "snapshot.after-commit"]


def test_killed_creates_and_deletes_leave_nothing_behind(env, ceph_cluster, tmp_path):
    """F-39: kill -9 (crash point) of `disk create --store`, `disk delete` and `snapshot create`
    of an RBD disk at each step: the next command on the store finishes or undoes it:
    an image exists exactly when its row does, and no staged image or snapshot stays."""
    from blockcrypt.testing.crashpoints import ENV_CRASH_AT
    keyring = ceph_cluster.add_client("blockcrypt", tmp_path / "k.keyring")
    assert _add(env, ceph_cluster, keyring).returncode == 0

    def crash(step: str, *argv: str) -> None:
        cp = env.cli(*argv, check=False, env={ENV_CRASH_AT: step})
        assert cp.returncode == -signal.SIGKILL, (step, cp.returncode, cp.stderr.decode())

    def ours() -> list[str]:
        ids = {d["id"] for d in env.json("disk", "list")}
        return [i for i in ceph_cluster.images() if any(x in i for x in ids) or ".tmp-" in i
                or ".deleted-" in i]

    for i, step in enumerate(CREATE_STEPS):
        crash(step, "disk", "create", f"c{i}", "--size", "16M", "--store", "ceph")
        env.create(f"n{i}", "16M", "--store", "ceph")   # uses the store: recovers it
        rows = {d["name"]: d for d in env.json("disk", "list")}
        committed = step == "disk-create.after-row"   # in-txn: never committed
        assert (f"c{i}" in rows) == committed, step
        images = ceph_cluster.images()
        assert not [n for n in images if ".tmp-" in n], (step, images)
        for d in rows.values():
            assert f"bc-{d['id']}" in images, (step, d["name"])
        if committed:
            env.attach(f"c{i}")                          # a real, usable disk
            env.detach(f"c{i}")
    for step in DELETE_STEPS:
        victim = next(d for d in env.json("disk", "list") if d["name"].startswith("n"))
        crash(step, "disk", "delete", victim["name"])
        env.create(f"after-{step}", "16M", "--store", "ceph")
        names = [d["name"] for d in env.json("disk", "list")]
        images = ceph_cluster.images()
        committed = step == "disk-delete.after-row"
        assert (victim["name"] in names) != committed, step
        assert (f"bc-{victim['id']}" in images) != committed, step
        assert not [n for n in images if ".deleted-" in n], (step, images)
    disk = env.json("disk", "list")[0]
    for step in SNAPSHOT_STEPS:
        crash(step, "snapshot", "create", disk["name"], f"s-{step}")
        env.json("snapshot", "list")       # snapshot commands recover the staged snap
        env.create(f"x-{step}", "16M", "--store", "ceph")
        env.json("snapshot", "list")
        snaps = ceph_cluster.rbd("snap", "ls", f"{ceph_cluster.pool}/bc-{disk['id']}").stdout
        assert ".tmp-" not in snaps, (step, snaps)
        rows = [s["name"] for s in env.json("snapshot", "list")]
        assert (f"s-{step}" in rows) == (step == "snapshot.after-commit"), step


def test_f40_header_update_on_an_image_is_crash_safe_at_every_step(ceph_cluster, tmp_path,
                                                                   monkeypatch):
    """F-40 (F-25/F-26 on RBD): a header update stopped before or after any write or
    flush of either copy leaves the old or the new header, and the next read repairs
    the other copy (both copies equal, read from the image's bytes)."""
    from blockcrypt.storage import container
    from blockcrypt.storage.ceph import StoreConfig
    from blockcrypt.storage.header import Kind, new_header
    from blockcrypt.storage.rbd_store import RbdStore
    keyring = ceph_cluster.add_client("blockcrypt", tmp_path / "k.keyring")
    store = RbdStore(StoreConfig("ceph", str(ceph_cluster.conf), ceph_cluster.pool,
                                 "blockcrypt", str(keyring)))
    h = new_header(Kind.DISK, 16 * MiB, 4096, encrypted=False)
    loc = store.locate(store.new_ref("disks", h.uid_hex))
    store.create(loc, h)
    try:
        for step in ("write:B", "fsync:B", "write:A", "fsync:A", None):
            old = store.read_header(loc)

            def hook(name: str, step=step) -> None:
                if name == step:
                    raise RuntimeError(f"crash at {name}")
            monkeypatch.setattr(container, "_fault_hook", hook)
            try:
                store.write_header(loc, old)
            except RuntimeError:
                pass
            monkeypatch.setattr(container, "_fault_hook", None)
            now = store.read_header(loc)                      # repairs (F-24)
            assert now.seq in (old.seq, old.seq + 1), step
            assert now.replace(seq=old.seq) == old
            with store.image(loc, read_only=True) as img:
                a, b = (img.read(off, container.COPY_SIZE) for off in container.COPY_OFFSETS)
            assert a == b, step
            if step is None:
                assert now.seq == old.seq + 1
    finally:
        store.remove(loc)
        store.close()
