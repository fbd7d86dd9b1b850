"""kill -9 of nbdkit under a file-system writer, in a loop (issue 8 item 4).

A writer process appends records to files of an ext4 file system on an
attached encrypted disk and logs each record (file, offset, length, SHA-256)
only after ``fsync`` (and, for a new file, the directory's ``fsync``) has
returned.  The test kills nbdkit with SIGKILL at a random moment of the
writes, then recovers the way a user would and checks:

- the writer sees an I/O error (never a silent success after the kill);
- ``disk attach`` cleans the stale attachment by itself (dead nbdkit, stale
  socket, the orphaned fuse mount, nbdfuse and loop device) and attaches again
  with a new nbdkit;
- after the journal replay (mount), every logged record is present with its
  exact bytes, and ``e2fsck -fn`` finds the file system clean.

What is guaranteed, and why: an ``fsync`` that returned means the loop device
flushed, which reached nbdkit as NBD_CMD_FLUSH through nbdfuse, which the
plugin answers only after ``fdatasync`` of the container file.  Killing nbdkit
(not the machine) cannot lose what was already written to the file, and the
flush put it on stable storage as well.  Records written but not yet fsynced
may or may not be there; they are not checked.

The user's step after nbdkit dies: the file system mounted on the dead device
must be unmounted (``umount -l``; its I/O only returns errors).  Even
iterations unmount before re-attaching; odd ones try to attach first, which
is refused (StaleMount, naming the mount) until ``--force``, and unmount
after.  Both must work and free the old loop device once the mount is gone.

Loops: BLOCKCRYPT_STRESS_LOOPS (default 20 in CI; ``make stress`` runs 100).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.system import proc

from support.env import Env
from support.prereq import require_block_devices, require_tools
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.stress]

LOOPS = int(os.environ.get("BLOCKCRYPT_STRESS_LOOPS", "20"))
KEEP_LOOPS = 3          # records of this many recent loops stay on the disk and are re-checked
MiB = 2**20

WRITER = r"""
import hashlib, json, os, random, sys
mp, log_path, tag = sys.argv[1], sys.argv[2], sys.argv[3]
rng = random.Random(tag)
log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
try:
    dfd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
    app_name = f"append-{tag}"
    app = os.open(os.path.join(mp, app_name), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fsync(app)
    os.fsync(dfd)
    offset, n = 0, 0
    while True:
        payload = rng.randbytes(rng.choice((512, 4096, 4097, 12288, 65536, 200000)))
        if n % 3 == 2:                     # a new file: its data, then its directory entry
            name = f"rec-{tag}-{n}"
            fd = os.open(os.path.join(mp, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, payload)
            os.fsync(fd)
            os.close(fd)
            os.fsync(dfd)
            rec = {"file": name, "offset": 0}
        else:                              # appended to the log-structured file
            assert os.write(app, payload) == len(payload)
            os.fsync(app)
            rec = {"file": app_name, "offset": offset}
            offset += len(payload)
        rec.update(length=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        os.write(log, (json.dumps(rec) + "\n").encode())     # only after fsync returned
        n += 1
except OSError as e:
    sys.stderr.write(f"writer stopped: {e}\n")
    sys.exit(3)
"""


def records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def verify(mp: Path, recs: list[dict]) -> None:
    for r in recs:
        p = mp / r["file"]
        assert p.exists(), f"fsynced record lost: {r}"
        with open(p, "rb") as f:
            f.seek(r["offset"])
            data = f.read(r["length"])
        assert hashlib.sha256(data).hexdigest() == r["sha256"], f"fsynced record damaged: {r}"


def loops_backed_by_dev(st_dev: int) -> list[str]:
    """Loop devices whose backing file lives on the file system st_dev (the fuse mount)."""
    want = f"{os.major(st_dev)}:{os.minor(st_dev)}"
    out = subprocess.run(["losetup", "--list", "--noheadings", "-O", "NAME,BACK-MAJ:MIN"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines()
            if len(line.split()) == 2 and line.split()[1] == want]


def umount_lazy(mp: Path) -> None:
    subprocess.run(["umount", "-l", str(mp)], check=True, capture_output=True)


def test_kill9_nbdkit_under_fsyncing_writer_loses_nothing(home, passphrase_file, tmp_path):
    require_block_devices()
    require_tools("e2fsck", "mkfs.ext4", "losetup", "umount")
    env = Env(home, passphrase_file, tmp_path)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_dir = home / "run" / "k9"
    try:
        env.create("k9", "128M")
        d = env.attach("k9")
        subprocess.run(["mkfs.ext4", "-q", d["device"]], check=True, capture_output=True)
        subprocess.run(["mount", d["device"], str(mp)], check=True, capture_output=True)
        env.mounts.append(mp)
        kept: dict[int, list[dict]] = {}
        total = 0
        for i in range(LOOPS):
            d = env.json("disk", "show", "k9")
            assert d["state"] == "attached"
            fuse_dev = os.stat(run_dir / "fuse" / "disk").st_dev
            log = tmp_path / f"log-{i}.jsonl"
            writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mp), str(log), str(i)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            wait_for(lambda: records(log) or writer.poll() is not None, 30, "the first record")
            assert writer.poll() is None, writer.stderr.read().decode()
            # Not synchronisation: a deliberate random delay, so each kill lands at a
            # different point of the writer's write/fsync cycle.
            time.sleep(rng.uniform(0.05, 0.6))
            os.kill(d["nbdkit_pid"], signal.SIGKILL)
            try:
                rc = writer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                writer.kill()
                raise AssertionError("the writer hung after nbdkit was killed")
            assert rc == 3, f"writer exit {rc}: {writer.stderr.read().decode()}"
            kept[i] = records(log)
            total += len(kept[i])
            assert proc.wait_gone(d["nbdkit_pid"], "nbdkit", None, 10)
            assert (run_dir / "nbd.sock").exists()         # the stale socket nbdkit left

            if i % 2 == 0:                      # the user unmounts first, then attaches
                umount_lazy(mp)
                env.mounts.remove(mp)
                wait_for(lambda: not loops_backed_by_dev(fuse_dev), 20,
                         "the old loop device to be released")
                new = env.attach("k9")
            else:                               # attaches first, unmounts the dead fs later
                cp = env.cli("disk", "attach", "k9", check=False)  # refused while mounted
                assert cp.returncode == errors.StaleMount.exit_code, cp.stderr.decode()
                assert f"umount {mp}" in cp.stderr.decode()
                new = env.attach("k9", "--force")
                umount_lazy(mp)
                env.mounts.remove(mp)
                wait_for(lambda: not loops_backed_by_dev(fuse_dev), 20,
                         "the old loop device to be released after the unmount")
            assert new["nbdkit_pid"] != d["nbdkit_pid"]
            assert proc.find_processes("nbdkit", f"{run_dir}/") == [new["nbdkit_pid"]]
            assert len(proc.find_processes("nbdfuse", f"{run_dir}/")) == 1
            assert len(env.rows("attachments")) == 1
            with socket.socket(socket.AF_UNIX) as s:       # a live socket, not the stale one
                s.connect(str(run_dir / "nbd.sock"))

            subprocess.run(["mount", new["device"], str(mp)], check=True, capture_output=True)
            env.mounts.append(mp)                 # replays the journal
            for recs in kept.values():
                verify(mp, recs)
            env.umount(mp)
            fsck = subprocess.run(["e2fsck", "-fn", new["device"]], capture_output=True)
            assert fsck.returncode == 0, (f"loop {i}: e2fsck -fn exit {fsck.returncode}\n"
                                          + fsck.stdout.decode() + fsck.stderr.decode())
            subprocess.run(["mount", new["device"], str(mp)], check=True, capture_output=True)
            env.mounts.append(mp)
            old = i - KEEP_LOOPS                  # keep the disk from filling up
            if old in kept:
                for p in [mp / f"append-{old}", *mp.glob(f"rec-{old}-*")]:
                    p.unlink()
                os.sync()
                del kept[old]
        assert total > LOOPS, f"only {total} records in {LOOPS} loops: the writer barely ran"
        env.umount(mp)
        env.detach("k9")
    finally:
        env.cleanup()
