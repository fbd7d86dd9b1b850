"""kill -9 of the CLI, of nbdkit, or of both, at every step of a snapshot of an
attached disk (pause, copy-before-write, background copy, publish).

The steps are enumerated by running ``snapshot create`` once with
``BLOCKCRYPT_TESTONLY_CRASH_LIST``; then, for each step and each victim, a
create is stopped there (``BLOCKCRYPT_TESTONLY_STOP_AT``), the victim(s) killed
with SIGKILL, the CLI let go, and the next command run (``snapshot list``, then
``disk attach`` where nbdkit died).  After every one:

- the snapshot is absent, or present and complete (its data is the data
  written before it started), and the home holds no file without a row;
- every write acknowledged to the live disk, before or after, reads back;
- the disk is not left paused (a write completes).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.crypto.secret import Secret
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.testing.crashpoints import ENV_CRASH_LIST, ENV_STOP_AT

from support import procstate
from support.cli import REPO
from support.env import Env, container_dk, dd_read, dd_write, slow_copy
from support.prereq import require_block_devices
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024
SLOW = slow_copy(0.02)
BEFORE = os.urandom(4 * MiB)


class Attached:
    def __init__(self, e: Env):
        self.e = e
        e.create("d", "64M")
        self.dev = self.attach()
        dd_write(self.dev, BEFORE, 0)
        self.acked: dict[int, bytes] = {0: BEFORE}
        self.n = 0

    def attach(self) -> str:
        cp = self.e.cli("disk", "attach", "d", "--json", env=SLOW)
        return json.loads(cp.stdout)["device"]

    def popen(self, name: str, env: dict) -> subprocess.Popen:
        argv = [sys.executable, "-m", "blockcrypt", "--home", str(self.e.home),
                "--passphrase-file", str(self.e.passphrase_file), "snapshot", "create", "d",
                name]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=REPO)

    def write_more(self) -> None:
        """An acknowledged write (fails the test if I/O is still paused)."""
        self.n += 1
        data = os.urandom(MiB)
        off = (8 + self.n) * MiB
        p = subprocess.Popen(["dd", "of=" + self.dev, "bs=1M", f"seek={8 + self.n}",
                              "oflag=direct,sync", "conv=notrunc,fsync", "status=none"],
                             stdin=subprocess.PIPE)
        p.stdin.write(data)
        p.stdin.close()
        try:
            assert p.wait(30) == 0
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError("the disk is still paused: a write did not complete")
        self.acked[off] = data

    def check(self) -> None:
        e = self.e
        snaps = e.json("snapshot", "list")                  # the next command: recovery
        e.json("disk", "show", "d")          # a command on the disk ends a pause left behind
        assert all(s["state"] == "complete" for s in snaps), snaps
        rows = {Path(s["path"]).name for s in snaps}
        assert set(os.listdir(e.home / "snapshots")) == rows
        for s in snaps:                                   # complete: the data before it
            path = Path(s["path"])
            with DiskBackend(path, Secret(container_dk(e.home, e.passphrase_file, path)),
                             read_only=True, discard=False) as b:
                buf = bytearray(len(BEFORE))
                b.pread_into(buf, 0)
                assert bytes(buf) == BEFORE, f"snapshot {s['name']} is not the instant"
        self.write_more()
        for off, data in self.acked.items():
            assert dd_read(self.dev, len(data), off) == data, f"acknowledged write at {off}"


@pytest.fixture
def att(home, passphrase_file, tmp_path):
    require_block_devices()
    e = Env(home, passphrase_file, tmp_path)
    try:
        yield Attached(e)
    finally:
        e.cleanup()


def test_snapshot_of_attached_disk_killed_at_every_step(att, tmp_path):
    listing = tmp_path / "steps"
    p = att.popen("probe", {ENV_CRASH_LIST: str(listing)})
    _out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    steps = list(dict.fromkeys(listing.read_text().split()))
    assert {"snapshot.paused", "snapshot.copying", "snapshot.after-copy",
            "snapshot.before-commit", "snapshot.after-commit"} <= set(steps), steps
    att.check()
    for i, step in enumerate(steps):
        for victim in ("cli", "nbdkit", "both"):
            name = f"s{i}-{victim}"
            nbdkit_pid = att.e.json("disk", "show", "d")["nbdkit_pid"]
            p = att.popen(name, {ENV_STOP_AT: step})
            wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 120,
                     f"snapshot create to reach {step}")
            assert p.poll() is None, p.communicate()
            if victim in ("nbdkit", "both"):
                os.kill(nbdkit_pid, signal.SIGKILL)
                wait_for(lambda: procstate.dead(nbdkit_pid), 30, "nbdkit to die")
            if victim in ("cli", "both"):
                os.kill(p.pid, signal.SIGKILL)
            os.kill(p.pid, signal.SIGCONT)
            _out, err = p.communicate(timeout=300)
            assert b"Traceback" not in err, err.decode()
            if victim != "cli":
                # nbdkit is gone: the acknowledged writes are in the container;
                # attach again (cleans the stale attachment) and check them there
                att.e.cli("snapshot", "list")
                att.dev = att.attach()
            att.check()
