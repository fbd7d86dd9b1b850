"""kill -9 of the CLI, of the server, or of both, at every step of a snapshot of a
detached disk that is attached (read-write) while the snapshot is copied.

The steps are enumerated by running ``snapshot create`` once with
``BLOCKCRYPT_TESTONLY_CRASH_LIST`` while a ``disk attach`` takes the copy over.
Then, for each step and each victim, a create is stopped there
(``BLOCKCRYPT_TESTONLY_STOP_AT``, the copy slowed by the test-only knob) with a
``disk attach`` of the disk under way: started after the stop for the steps
before the copy (``snapshot.locked``, ``snapshot.background``: the attach waits
for the lock, or its server for the hand-over), else while the copy runs.  The
victim(s) are killed with SIGKILL: the CLI, and/or the server side (nbdkit;
the attaching command itself while it waits for the lock, before nbdkit
exists).  The CLI is let go and the next commands run.  After every one:

- the snapshot is absent, or present and complete, holding exactly the disk's
  data at the instant the create started (not the writes made after the
  attach), and the home holds no snapshot file without a row;
- the disk attaches (again, if its server died);
- every write acknowledged to the live disk, before or during the copy, reads back.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.system import proc
from blockcrypt.testing.crashpoints import ENV_CRASH_LIST, ENV_STOP_AT

from support import procstate
from support.cli import REPO
from support.env import Env, container_dk, dd_read, dd_write, slow_copy
from support.prereq import require_block_devices
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

MiB = 1024 * 1024
REGION = 24 * MiB                     # the data the snapshots hold (all allocated)
DELAY_S = 0.2                         # per copied chunk, until the test lifts it
BEFORE_COPY = ("snapshot.locked", "snapshot.background")


class Detached:
    def __init__(self, e: Env, scratch: Path):
        self.e = e
        self.scratch = scratch
        self.lifted = scratch / "lifted-probe"   # exists: the copy goes at full speed
        e.create("d", "64M")
        self.image = bytearray(os.urandom(REGION))      # what the disk holds now
        dev = e.attach("d")["device"]
        dd_write(dev, bytes(self.image), 0)
        e.detach("d")
        self.expected: dict[str, bytes] = {}            # snapshot -> its instant
        self.rng = random.Random(14)
        self.dev: str | None = None

    def cli(self, *args: str, env: dict) -> subprocess.Popen:
        argv = [sys.executable, "-m", "blockcrypt", "--home", str(self.e.home),
                "--passphrase-file", str(self.e.passphrase_file), *args]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env}, cwd=REPO)

    def slow(self) -> dict:
        """The copy slowed (test-only knob) until :meth:`lift`."""
        return slow_copy(DELAY_S, self.lifted)

    def lift(self) -> None:
        """Let the current snapshot's copy run at full speed: the windows the test
        needed (an attach taking the copy over, a write into it) are behind it."""
        self.lifted.touch()

    def create(self, name: str, env: dict) -> subprocess.Popen:
        self.expected[name] = bytes(self.image)
        self.lifted = self.scratch / f"lifted-{name}"
        return self.cli("snapshot", "create", "d", name, "--json", env={**self.slow(), **env})

    def attach(self) -> subprocess.Popen:
        return self.cli("disk", "attach", "d", "--json", env=self.slow())

    def copying(self, name: str) -> bool:
        cp = self.e.cli("snapshot", "show", name, "--json", check=False)
        s = json.loads(cp.stdout or b"{}")
        return s.get("state") == "copying" and s["percent"] > 0

    def nbdkit(self) -> list[int]:
        return proc.find_processes("nbdkit", f"{self.e.home / 'run' / 'd'}/")

    def asking(self) -> bool:
        """Whether a server waits on the hand-over socket (a connection not yet
        accepted shows in /proc/net/unix with the listener's path)."""
        disk_id = self.e.json("disk", "show", "d")["id"]
        with open("/proc/net/unix") as f:
            return sum(line.rstrip().endswith(f"/{disk_id}.sock") for line in f) >= 2

    def write(self, off: int | None = None) -> None:
        """An acknowledged write into the region the snapshots hold."""
        off = self.rng.randrange(0, REGION // MiB) * MiB if off is None else off
        data = os.urandom(MiB)
        dd_write(self.dev, data, off)
        self.image[off:off + MiB] = data

    def check(self) -> None:
        e = self.e
        snaps = e.json("snapshot", "list")                  # the next command: recovery
        assert all(s["state"] == "complete" for s in snaps), snaps
        assert set(os.listdir(e.home / "snapshots")) == {Path(s["path"]).name for s in snaps}
        for s in snaps:
            path = Path(s["path"])
            with DiskBackend(path, Secret(container_dk(e.home, e.passphrase_file, path)),
                             read_only=True, discard=False) as b:
                buf = bytearray(REGION)
                b.pread_into(buf, 0)
                assert bytes(buf) == self.expected[s["name"]], \
                    f"snapshot {s['name']} is not the instant it was taken"
        if not self.nbdkit():                               # its server died, or none
            self.dev = e.attach("d")["device"]             # never left unattachable
        self.write()
        assert dd_read(self.dev, REGION, 0) == bytes(self.image), "an acknowledged write"
        e.detach("d")
        self.dev = None


@pytest.fixture
def det(home, passphrase_file, tmp_path):
    require_block_devices()
    e = Env(home, passphrase_file, tmp_path)
    try:
        yield Detached(e, tmp_path)
    finally:
        e.cleanup()


def _finish(p: subprocess.Popen) -> bytes:
    _out, err = p.communicate(timeout=300)
    assert b"Traceback" not in err, err.decode()
    return err


def test_snapshot_of_detached_disk_attached_meanwhile_killed_at_every_step(det, tmp_path):
    listing = tmp_path / "steps"
    p = det.create("probe", {ENV_CRASH_LIST: str(listing)})
    wait_for(lambda: det.copying("probe"), 60, "the probe snapshot to copy")
    a = det.attach()
    det.dev = json.loads(a.communicate(timeout=120)[0])["device"]
    det.write(REGION - MiB)                         # the last chunk: not copied yet
    det.lift()
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    assert json.loads(out)["copied_before_write_bytes"] >= MiB  # the server copied it first
    steps = list(dict.fromkeys(listing.read_text().split()))
    assert {"snapshot.locked", "snapshot.background", "snapshot.handed-over",
            "snapshot.after-copy", "snapshot.before-commit",
            "snapshot.after-commit"} <= set(steps), steps
    det.check()
    for i, step in enumerate(steps):
        for victim in ("cli", "server", "both"):
            name = f"s{i}-{victim}"
            p = det.create(name, {ENV_STOP_AT: step})
            if step in BEFORE_COPY:
                wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 120,
                         f"snapshot create to reach {step}")
                a = det.attach()        # waits for the lock, or its server for us
            else:
                wait_for(lambda: det.copying(name), 120, f"{name} to copy")
                a = det.attach()        # its server takes the copy over
                out, _err = a.communicate(timeout=120)
                assert a.returncode == 0, _err.decode()
                det.dev = json.loads(out)["device"]
                det.write()             # acknowledged while the copy is the server's
                det.lift()
                wait_for(lambda: p.poll() is not None or procstate.stopped(p.pid), 120,
                         f"snapshot create to reach {step}")
            assert p.poll() is None, (step, p.communicate())
            if victim in ("server", "both"):
                if step == "snapshot.locked":   # the attach waits for the lock: no nbdkit
                    wait_for(lambda: det.e.rows("attachments"), 60, "the attach to claim")
                    server = [a.pid]
                else:
                    server = wait_for(det.nbdkit, 60, "nbdkit to start")
                    if step == "snapshot.background":
                        wait_for(det.asking, 60, "nbdkit to ask for the copy")
                for pid in server:
                    os.kill(pid, signal.SIGKILL)
                for pid in server:
                    wait_for(lambda: procstate.dead(pid), 30, "the server to die")
            if victim in ("cli", "both"):
                os.kill(p.pid, signal.SIGKILL)
            det.lift()
            os.kill(p.pid, signal.SIGCONT)
            _finish(p)
            if victim == "server":      # a server that died holding the copy: none
                lost = step in ("snapshot.background", "snapshot.handed-over")
                assert p.returncode == (errors.StateError.exit_code if lost else 0), step
            if a.returncode is None:
                out = a.communicate(timeout=300)[0]
                if victim == "cli":
                    assert a.returncode == 0, "the attach failed after the snapshot's CLI died"
                if a.returncode == 0:
                    det.dev = json.loads(out)["device"]
            det.check()
