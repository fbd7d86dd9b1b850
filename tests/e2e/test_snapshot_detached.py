"""Snapshots of a detached disk never hold the disk for the copy.

``snapshot create`` of a detached disk fixes the instant under the container's
lock (milliseconds) and copies afterwards; a ``disk attach`` (read-write) in
the meantime starts at once, its server takes the copy over and copies a range
before its first write changes it.  On ext4 (the test home: no reflink) the
copy is slowed with the test-only knob ``BLOCKCRYPT_TESTONLY_COW_CHUNK_DELAY_S``
(read by ``snapshot create`` and passed on by ``disk attach`` to nbdkit) so the
attach and the writes happen while it runs; on XFS the instant is a reflink and
``snapshot create`` is stopped (SIGSTOP) after it, before it publishes.  Both
check that the snapshot holds the data from before the attach, and the live disk
the data written after.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from blockcrypt.testing.crashpoints import ENV_STOP_AT

from support import procstate
from support.cli import REPO
from support.env import Env, dd_read, dd_write, slow_copy
from support.prereq import require_block_devices
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024
DELAY_S = 0.2          # per copied chunk, until the test has written into the copy
OLD = bytes(range(256)) * (16 * MiB // 256)          # written before the snapshot
NEW = b"\xa5" * (16 * MiB)                           # written after the attach


def _popen_cli(e: Env, *args, env: dict) -> subprocess.Popen:
    argv = [sys.executable, "-m", "blockcrypt", "--home", str(e.home), "--passphrase-file",
            str(e.passphrase_file), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=REPO)


def _prepare(e: Env, *extra: str) -> None:
    """Disk d with OLD at 0 and at 128 MiB, detached."""
    e.create("d", "256M", *extra)
    dev = e.attach("d")["device"]
    dd_write(dev, OLD, 0)
    dd_write(dev, OLD, 128 * MiB)
    e.detach("d")


def _check_snapshot_is_the_instant(e: Env, snap: str) -> None:
    e.cli("disk", "create", "r", "--from-snapshot", snap)
    rdev = e.attach("r")["device"]
    assert dd_read(rdev, 16 * MiB, 0) == OLD
    assert dd_read(rdev, 16 * MiB, 128 * MiB) == OLD
    assert dd_read(rdev, 16 * MiB, 200 * MiB) == bytes(16 * MiB)      # a hole then


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_attach_during_a_detached_snapshot_on_ext4(env, encrypted):
    _prepare(env, *([] if encrypted else ["--no-encrypted"]))
    lifted = env.tmp / "lifted"
    slow = slow_copy(DELAY_S, lifted)
    p = _popen_cli(env, "snapshot", "create", "d", "s", "--json", env=slow)

    def copying():
        s = json.loads(env.cli("snapshot", "show", "s", "--json", check=False).stdout
                       or b"{}")
        return s.get("state") == "copying" and s["percent"] > 0
    wait_for(copying, 60, "the detached snapshot to be copying")
    started = time.monotonic()
    dev = json.loads(env.cli("disk", "attach", "d", "--json", env=slow).stdout)["device"]
    attach_s = time.monotonic() - started
    # attached while the copy runs (it takes 32 chunks x 0.2 s and more)
    assert env.json("snapshot", "show", "s")["state"] == "copying", attach_s
    dd_write(dev, NEW, 128 * MiB)       # not copied yet: the server copies it first
    dd_write(dev, NEW, 200 * MiB)       # a hole at the instant
    lifted.touch()                      # the rest of the copy at full speed
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    snap = json.loads(out)
    assert snap["copy_method"] == "copy-before-write" and snap["quiesced"] is False
    assert snap["copied_before_write_bytes"] >= 16 * MiB, snap
    assert snap["allocated_bytes"] < 40 * MiB, snap                  # holes stayed holes
    assert dd_read(dev, 16 * MiB, 0) == OLD                         # the live disk
    assert dd_read(dev, 16 * MiB, 128 * MiB) == NEW
    assert dd_read(dev, 16 * MiB, 200 * MiB) == NEW
    _check_snapshot_is_the_instant(env, "s")
    # nothing left behind: no marker, no hand-over socket
    assert not (env.home / "run" / ".snapshots").exists()


def test_detached_snapshot_without_attach_copies_alone(env):
    _prepare(env)
    snap = env.json("snapshot", "create", "d", "s")
    assert snap["copy_method"] == "copy-before-write" and snap["quiesced"] is False
    assert snap["copied_before_write_bytes"] == 0
    assert snap["allocated_bytes"] < 40 * MiB, snap
    dev = env.attach("d")["device"]
    dd_write(dev, NEW, 0)
    _check_snapshot_is_the_instant(env, "s")


def test_attach_during_a_detached_snapshot_on_xfs(xfs_reflink_dir, passphrase_file):
    require_block_devices()
    e = Env(xfs_reflink_dir / "home", passphrase_file, xfs_reflink_dir)
    try:
        _prepare(e)
        p = _popen_cli(e, "snapshot", "create", "d", "s", "--json",
                       env={ENV_STOP_AT: "snapshot.after-copy"})
        wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 60,
                 "snapshot create to stop after the reflink")
        assert p.poll() is None, p.communicate()
        dev = e.attach("d")["device"]          # while snapshot create has not finished
        dd_write(dev, NEW, 0)
        dd_write(dev, NEW, 128 * MiB)
        os.kill(p.pid, signal.SIGCONT)
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
        assert json.loads(out)["copy_method"] == "reflink"
        assert dd_read(dev, 16 * MiB, 0) == NEW
        _check_snapshot_is_the_instant(e, "s")
    finally:
        e.cleanup()
