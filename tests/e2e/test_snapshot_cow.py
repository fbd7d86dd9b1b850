"""Snapshots of an attached disk that pause I/O only to fix the point in time.

Real nbdkit serving a real container on the test home's file system (ext4
here: no reflink, so copy-before-write), and on a loop-mounted XFS (reflink).
The background copy is slowed with the test-only knob
``BLOCKCRYPT_TESTONLY_COW_CHUNK_DELAY_S`` (given to ``disk attach``, which
passes it to nbdkit) and ``snapshot create`` is stopped with SIGSTOP at
``snapshot.copying`` (I/O resumed, copy running), so the test overwrites
ranges the copier has not reached yet and checks that the snapshot still holds
the data of the instant it was taken.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.testing.crashpoints import ENV_CRASH_AT, ENV_STOP_AT

from support import procstate
from support.cli import REPO
from support.env import Env, dd_read, dd_write, slow_copy
from support.prereq import require_block_devices
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024
SLOW = slow_copy(0.05)
OLD = bytes(range(256)) * (16 * MiB // 256)          # 16 MiB written before the snapshot
NEW = b"\xa5" * (16 * MiB)                           # overwrites after it


def _popen_cli(e: Env, *args, env: dict) -> subprocess.Popen:
    argv = [sys.executable, "-m", "blockcrypt", "--home", str(e.home), "--passphrase-file",
            str(e.passphrase_file), *args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=REPO)


def _attach(e: Env, name: str) -> str:
    """Attach with the background copy slowed (see the module doc); the device."""
    return json.loads(e.cli("disk", "attach", name, "--json", env=SLOW).stdout)["device"]


def _stop_at_copying(e: Env, disk: str, snap: str) -> subprocess.Popen:
    p = _popen_cli(e, "snapshot", "create", disk, snap, "--json",
                   env={ENV_STOP_AT: "snapshot.copying"})
    wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 60,
             "snapshot create to reach snapshot.copying")
    assert p.poll() is None, p.communicate()
    return p


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "plain"])
def test_snapshot_holds_the_instant_while_writes_continue(env, encrypted):
    env.create("d", "256M", *([] if encrypted else ["--no-encrypted"]))
    dev = _attach(env, "d")
    dd_write(dev, OLD, 0)                      # data the snapshot must hold
    dd_write(dev, OLD, 128 * MiB)
    p = _stop_at_copying(env, "d", "s")
    # I/O has resumed: the disk takes writes while the snapshot is being copied
    dd_write(dev, NEW, 128 * MiB)              # copier has not got there: copy-before-write
    dd_write(dev, NEW, 200 * MiB)              # a hole at the snapshot's instant
    os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    snap = json.loads(out)
    assert snap["copy_method"] == "copy-before-write" and snap["quiesced"] is True
    assert snap["copied_before_write_bytes"] >= 16 * MiB     # the writes copied first
    # the live disk lost nothing
    assert dd_read(dev, 16 * MiB, 0) == OLD
    assert dd_read(dev, 16 * MiB, 128 * MiB) == NEW
    assert dd_read(dev, 16 * MiB, 200 * MiB) == NEW
    # the snapshot is the instant: old data, and holes stayed holes
    assert snap["allocated_bytes"] < 40 * MiB, snap
    env.cli("disk", "create", "r", "--from-snapshot", "s")
    rdev = env.attach("r")["device"]
    assert dd_read(rdev, 16 * MiB, 0) == OLD
    assert dd_read(rdev, 16 * MiB, 128 * MiB) == OLD
    assert dd_read(rdev, 16 * MiB, 200 * MiB) == bytes(16 * MiB)


def test_killed_during_copy_leaves_no_snapshot_and_loses_no_write(env):
    """kill -9 of the CLI, then of nbdkit, while the background copy runs."""
    env.create("d", "128M")
    dev = _attach(env, "d")
    dd_write(dev, OLD, 0)
    # 1. the CLI dies mid-copy: the server stops copying, the next command
    # removes the partial file, the disk keeps serving
    p = _popen_cli(env, "snapshot", "create", "d", "killed",
                   env={ENV_CRASH_AT: "snapshot.copying"})
    p.communicate(timeout=120)
    assert p.returncode == -signal.SIGKILL
    dd_write(dev, NEW, 0)
    assert dd_read(dev, 16 * MiB, 0) == NEW
    assert env.json("snapshot", "list") == []
    assert os.listdir(env.home / "snapshots") == []
    ok = env.json("snapshot", "create", "d", "after")      # the server takes the next one
    assert ok["copy_method"] == "copy-before-write"
    # 2. nbdkit dies mid-copy: the CLI reports it and leaves nothing
    p = _stop_at_copying(env, "d", "orphan")
    pid = env.json("disk", "show", "d")["nbdkit_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: procstate.dead(pid), 30, "nbdkit to die")
    os.kill(p.pid, signal.SIGCONT)
    _out, err = p.communicate(timeout=120)
    assert p.returncode == errors.StateError.exit_code, err.decode()
    assert b"Traceback" not in err and b"snapshot copy of disk 'd'" in err, err.decode()
    assert [s["name"] for s in env.json("snapshot", "list")] == ["after"]
    assert sorted(os.listdir(env.home / "snapshots")) == \
        [Path(env.json("snapshot", "show", "after")["path"]).name]


def test_reflink_snapshot_of_an_attached_disk_on_xfs(xfs_reflink_dir, passphrase_file):
    require_block_devices()
    e = Env(xfs_reflink_dir / "home", passphrase_file, xfs_reflink_dir)
    try:
        e.create("d", "128M")
        dev = e.attach("d")["device"]
        dd_write(dev, OLD, 0)
        snap = e.json("snapshot", "create", "d", "s")
        assert snap["copy_method"] == "reflink" and snap["quiesced"] is True
        dd_write(dev, NEW, 0)
        e.detach("d")
        e.cli("disk", "create", "r", "--from-snapshot", "s")
        assert dd_read(e.attach("r")["device"], 16 * MiB, 0) == OLD
    finally:
        e.cleanup()


def test_second_snapshot_of_a_disk_is_refused_while_one_is_copied(env):
    env.create("d", "256M")
    dev = _attach(env, "d")
    dd_write(dev, OLD, 0)
    p = _popen_cli(env, "snapshot", "create", "d", "first", "--json", env={})

    def copying():
        s = json.loads(env.cli("snapshot", "show", "first", "--json", check=False).stdout
                       or b"{}")
        return s.get("state") == "copying" and s["percent"] > 0 and s

    shown = wait_for(copying, 60, "snapshot show to report the copy in progress")
    assert 0 < shown["percent"] < 100
    listed = env.json("snapshot", "list")
    assert [(s["name"], s["state"]) for s in listed] == [("first", "copying")]
    err = env.refused(errors.StateError, "snapshot", "create", "d", "second")
    assert "disk 'd' already has a snapshot being taken ('first'" in err
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert [(s["name"], s["state"], s["percent"]) for s in env.json("snapshot", "list")] == \
        [("first", "complete", 100)]
    env.json("snapshot", "create", "d", "second")         # allowed once the first is done


def _sync_ok(path: Path, timeout_s: float = 20) -> bool:
    p = subprocess.Popen(["sync", "-f", str(path)])
    try:
        return p.wait(timeout_s) == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        if p.poll() is None:
            subprocess.run(["fsfreeze", "-u", str(path)], capture_output=True)
            p.wait()


def test_freeze_thaws_on_success_error_signal_and_kill(env):
    env.create("d", "128M")
    dev = env.attach("d")["device"]
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    mnt = env.mount(dev, "d")
    (mnt / "before").write_bytes(b"x" * 4096)
    snap = env.json("snapshot", "create", "d", "frozen", "--freeze")
    assert snap["quiesced"] is True
    (mnt / "after").write_bytes(b"y" * 4096)
    assert _sync_ok(mnt / "after"), "file system still frozen after snapshot --freeze"
    # a signal while frozen: thawed, I/O resumed, nothing created
    p = _popen_cli(env, "snapshot", "create", "d", "sig", "--freeze",
                   env={ENV_STOP_AT: "snapshot.paused"})
    wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 60, "the freeze")
    os.kill(p.pid, signal.SIGTERM)
    os.kill(p.pid, signal.SIGCONT)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == errors.StateError.exit_code, err.decode()
    assert b"interrupted by signal" in err and b"Traceback" not in err
    (mnt / "after-signal").write_bytes(b"z" * 4096)
    assert _sync_ok(mnt / "after-signal"), "still frozen after a signal"
    # kill -9 while frozen and paused: the next snapshot command thaws and resumes
    cp = env.cli("snapshot", "create", "d", "killed", "--freeze", check=False,
                 env={ENV_CRASH_AT: "snapshot.paused"})
    assert cp.returncode == -signal.SIGKILL
    env.cli("snapshot", "list")
    (mnt / "after-kill").write_bytes(b"k" * 4096)
    assert _sync_ok(mnt / "after-kill"), "still frozen after kill -9 and snapshot list"
    assert [s["name"] for s in env.json("snapshot", "list")] == ["frozen"]
    # --freeze of a disk that is not attached: refused, nothing created
    env.create("idle", "64M")
    err = env.refused(errors.StateError, "snapshot", "create", "idle", "x", "--freeze")
    assert "--freeze needs disk 'idle' attached" in err
    assert [s["name"] for s in env.json("snapshot", "list")] == ["frozen"]
    # the frozen snapshot's file system is clean without a journal replay
    env.umount(mnt)
    env.cli("disk", "create", "r", "--from-snapshot", "frozen")
    rdev = env.attach("r")["device"]
    fsck = subprocess.run(["e2fsck", "-fn", rdev], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
