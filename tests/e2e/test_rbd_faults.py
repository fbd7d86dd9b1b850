"""Faults under attached RBD disks (issue 17, "Bad input and faults"), on the session's
real Ceph cluster (fixture ``ceph_cluster``).

- OSD stopped mid-write (killed, or frozen with SIGSTOP): a writer doing 4 KiB
  O_DIRECT writes + fsync on the attached block device gets EIO within a bounded
  time, never silent success; after the OSD is restarted, detach and re-attach
  read back every write that was acknowledged before the error.  While it is
  frozen, attaching another disk is refused as StoreNotAnswering (99), not as an
  unreachable cluster.
- Cluster unreachable (every daemon frozen): the attached disk's writer gets EIO
  within the same bound; attaching another disk of the store is refused with an
  error naming the store; once the cluster is back, nothing acknowledged is lost.
- Image deleted behind blockcrypt's back: while attached, `rbd rm` is refused (the
  server watches the image) and the disk keeps its data; an administrator who
  blocklists the server and removes the image makes its writes fail with EIO, not
  succeed; attaching a disk whose image is gone is refused naming the disk and the
  store, and changes nothing.

The bound is the requirement on the RBD store: librados must be given op timeouts
(``rados_osd_op_timeout``) so that I/O to an unreachable OSD fails instead of
hanging for ever.  Every wait has a deadline; nothing sleeps to synchronise.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import signal
import threading
import time

import pytest

from blockcrypt import errors

from support import procstate
from support.ceph import Cluster, kill_osd, osd_pid, osd_up_from, restart_osd
from support.wait import wait_for

pytestmark = pytest.mark.e2e

STORE = "ceph"
BLOCK = 4096
# A write to an RBD disk whose cluster stops answering must fail within this many
# seconds: the store's I/O timeout (`store add --io-timeout`), plus FUSE and the
# loop device; below the 30 s default, so the store's own setting must reach the server.
IO_TIMEOUT_S = 5
EIO_DEADLINE_S = 25.0
ACKED_BEFORE_FAULT = 16
OTHER_DAEMONS = ("mon.a", "mgr.x")


def content(i: int) -> bytes:
    """Block ``i``'s distinct, incompressible content."""
    seed = hashlib.sha256(b"rbd-fault-%d" % i).digest()
    return (seed * (BLOCK // len(seed)))[:BLOCK]


class Writer(threading.Thread):
    """4 KiB O_DIRECT pwrite + fsync of block i = 0, 1, 2, ... on a block device until
    the first error; ``acked`` holds the blocks both calls returned for."""

    def __init__(self, device: str):
        super().__init__(daemon=True)
        self.fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, BLOCK)            # page-aligned, as O_DIRECT needs
        self.acked: list[int] = []
        self.error: OSError | None = None
        self.error_at: float | None = None
        self.fault_at: float | None = None         # set by the test
        self.acked_at_fault = 0
        self.stop = threading.Event()
        self.done = threading.Event()

    def fault(self) -> None:
        """Note the moment the fault is injected (before injecting it)."""
        self.acked_at_fault = len(self.acked)
        self.fault_at = time.monotonic()

    def run(self) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                self.buf[:] = content(i)
                os.pwrite(self.fd, self.buf, i * BLOCK)
                os.fsync(self.fd)
                self.acked.append(i)
                i += 1
        except OSError as e:
            self.error, self.error_at = e, time.monotonic()
        finally:
            os.close(self.fd)
            self.done.set()

    def wait_for_acks(self, n: int) -> None:
        wait_for(lambda: len(self.acked) >= n or self.done.is_set(), 60,
                 f"{n} acknowledged writes")
        assert self.error is None, f"the writer failed before the fault: {self.error}"


def read_blocks(device: str, blocks: list[int]) -> dict[int, bytes]:
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, BLOCK)
    try:
        out = {}
        for i in blocks:
            assert os.preadv(fd, [buf], i * BLOCK) == BLOCK
            out[i] = bytes(buf)
        return out
    finally:
        os.close(fd)


def expect_eio(w: Writer, cluster: Cluster, what: str, recover) -> float:
    """Wait (bounded) for the writer's error; on a timeout, recover the cluster (so the
    writer's stuck write can finish) and fail with the requirement.  Returns the
    seconds from the fault to the error."""
    got_error = w.done.wait(EIO_DEADLINE_S)
    if not got_error:
        acked_after = len(w.acked) - w.acked_at_fault
        recover()
        w.stop.set()
        w.done.wait(EIO_DEADLINE_S)
        if acked_after > 1:
            pytest.fail(f"{what}: {acked_after} writes + fsync SUCCEEDED while the cluster "
                        f"could not store them (silent success)")
        pytest.fail(f"{what}: the write hung for {EIO_DEADLINE_S:.0f} s; requirement: I/O on "
                    "an RBD disk whose cluster stops answering fails with EIO within "
                    f"{EIO_DEADLINE_S:.0f} s (librados op timeouts set by the RBD store)")
    assert w.error is not None and w.error.errno == errno.EIO, (
        f"{what}: the writer ended with {w.error!r}, expected EIO")
    return w.error_at - w.fault_at


def assert_acked_intact(env, name: str, w: Writer) -> None:
    """Detach, re-attach: every acknowledged write reads back; the disk takes writes."""
    env.detach(name)
    dev = env.attach(name)["device"]
    got = read_blocks(dev, w.acked)
    lost = [i for i in w.acked if got[i] != content(i)]
    assert not lost, (f"{len(lost)} of {len(w.acked)} acknowledged writes did not survive "
                      f"(first: block {lost[0]})")
    fd, buf = os.open(dev, os.O_WRONLY | os.O_DIRECT), mmap.mmap(-1, BLOCK)
    try:                            # and the disk takes writes again
        buf[:] = content(10_000)
        os.pwrite(fd, buf, 10_000 * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_blocks(dev, [10_000])[10_000] == content(10_000)
    env.detach(name)


# -- fixtures ---------------------------------------------------------------------------

def daemon_pid(cluster: Cluster, name: str) -> int:
    return int((cluster.dir / "run" / f"{name}.pid").read_text().strip())


def thaw(cluster: Cluster) -> None:
    for name in OTHER_DAEMONS:
        try:
            os.kill(daemon_pid(cluster, name), signal.SIGCONT)
        except (OSError, ValueError):
            pass


def osd_state(cluster: Cluster) -> str | None:
    pid = osd_pid(cluster)
    state = None if pid is None else procstate.state(pid)
    return None if state == "gone" else state


@pytest.fixture
def rbd_env(env, ceph_cluster, tmp_path):
    """``env`` with store ``ceph`` (a restricted cephx user on the session cluster); the
    cluster is left running and answering whatever the test did to it."""
    keyring = ceph_cluster.add_client("faults", tmp_path / "faults.keyring")
    env.cli("store", "add", STORE, "--type", "rbd", "--conf", ceph_cluster.conf,
            "--pool", ceph_cluster.pool, "--client-id", "faults", "--keyring", keyring,
            "--io-timeout", str(IO_TIMEOUT_S))
    try:
        yield env
    finally:
        thaw(ceph_cluster)
        if osd_state(ceph_cluster) in (None, "T"):
            restart_osd(ceph_cluster)


def create(env, name: str) -> None:
    env.create(name, "64M", "--store", STORE)


def writing_vol_until_a_fault(env, ceph_cluster: Cluster) -> tuple[Writer, int]:
    """Disks ``vol`` and ``other``; a writer on ``vol`` with writes acknowledged, told
    the fault begins now.  Returns it and the OSD's ``up_from`` (for restart_osd)."""
    create(env, "vol")
    create(env, "other")
    w = Writer(env.attach("vol")["device"])
    w.start()
    w.wait_for_acks(ACKED_BEFORE_FAULT)
    up_from = osd_up_from(ceph_cluster)
    w.fault()
    return w, up_from


def attach_refused_promptly(env, error: type[errors.BlockcryptError]) -> str:
    """``disk attach other`` during the fault: refused with ``error`` within the bound,
    naming the store, changing nothing; returns the message."""
    t0 = time.monotonic()
    msg = env.refused(error, "disk", "attach", "other")
    assert time.monotonic() - t0 < EIO_DEADLINE_S
    assert f"'{STORE}'" in msg and "Traceback" not in msg, msg
    assert env.json("disk", "show", "other")["state"] == "available"
    return msg


# -- OSD stopped mid-write ---------------------------------------------------------------

@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_osd_stopped_mid_write_gives_eio_and_keeps_acknowledged_writes(rbd_env, ceph_cluster,
                                                                       how):
    env = rbd_env
    w, up_from = writing_vol_until_a_fault(env, ceph_cluster)
    kill_osd(ceph_cluster, signal.SIGKILL if how == "killed" else signal.SIGSTOP)

    took = expect_eio(w, ceph_cluster, f"OSD {how}",
                      lambda: restart_osd(ceph_cluster, up_from_before=up_from))
    assert took <= EIO_DEADLINE_S
    assert w.acked, "nothing was acknowledged before the fault"
    if how == "frozen":
        # the monitors answer, the OSD does not: a command's refusal says so, names
        # the disk, and points at the cluster's health, within its bound
        msg = attach_refused_promptly(env, errors.StoreNotAnswering)
        assert "'other'" in msg and "ceph -s" in msg, msg

    restart_osd(ceph_cluster, up_from_before=up_from)
    assert_acked_intact(env, "vol", w)


# -- cluster unreachable -----------------------------------------------------------------

def test_cluster_unreachable_gives_eio_and_a_clear_refusal(rbd_env, ceph_cluster):
    env = rbd_env
    w, up_from = writing_vol_until_a_fault(env, ceph_cluster)
    for name in OTHER_DAEMONS:
        os.kill(daemon_pid(ceph_cluster, name), signal.SIGSTOP)
    kill_osd(ceph_cluster, signal.SIGSTOP)

    def recover():
        thaw(ceph_cluster)
        restart_osd(ceph_cluster, up_from_before=up_from)

    try:
        expect_eio(w, ceph_cluster, "cluster unreachable", recover)
        attach_refused_promptly(env, errors.StoreUnreachable)
    finally:
        recover()
    assert_acked_intact(env, "vol", w)


# -- image deleted behind blockcrypt's back ----------------------------------------------

def image_of(ceph_cluster: Cluster, before: set[str]) -> str:
    new = sorted(set(ceph_cluster.images()) - before)
    assert len(new) == 1, f"disk create --store made images {new}"
    return new[0]


def test_image_deleted_behind_blockcrypts_back(rbd_env, ceph_cluster):
    env = rbd_env
    before = set(ceph_cluster.images())
    create(env, "vol")
    image = image_of(ceph_cluster, before)
    w = Writer(env.attach("vol")["device"])
    w.start()
    w.wait_for_acks(ACKED_BEFORE_FAULT)

    # While attached, Ceph itself refuses: the serving host watches the image.
    rm = ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{image}", check=False)
    assert rm.returncode != 0 and image in ceph_cluster.images(), rm.stderr

    # An administrator forces it: blocklist the watcher, then remove the image.
    status = json.loads(ceph_cluster.rbd("status", "--format", "json",
                                         f"{ceph_cluster.pool}/{image}").stdout)
    watchers = [wt["address"] for wt in status["watchers"]]
    assert watchers, status
    w.fault()
    for addr in watchers:
        ceph_cluster.ceph("osd", "blocklist", "add", addr)
    try:
        wait_for(lambda: ceph_cluster.rbd("rm", "--no-progress",
                                          f"{ceph_cluster.pool}/{image}",
                                          check=False).returncode == 0,
                 EIO_DEADLINE_S, "rbd rm after blocklisting the server", interval_s=0.5)
        expect_eio(w, ceph_cluster, "image removed under an attached disk", lambda: None)
        env.detach("vol")
    finally:
        for addr in watchers:
            ceph_cluster.ceph("osd", "blocklist", "rm", addr, check=False)

    msg = env.refused(errors.ImageMissing, "disk", "attach", "vol")
    assert "vol" in msg and f"'{STORE}'" in msg and "Traceback" not in msg, msg
    assert image not in ceph_cluster.images()
    assert env.json("disk", "show", "vol")["state"] == "available"
    # the catalog entry can then be removed, as the message says
    env.cli("disk", "delete", "vol")
    assert "vol" not in env.cli("disk", "list").stdout.decode()
