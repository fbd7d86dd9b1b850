"""50 concurrent CLI invocations on a few disks (issue 8 item 9).

Real subprocesses, started together, mixing ``disk attach``, ``disk detach``,
``snapshot create``, ``disk create`` (blank and ``--from-snapshot``) and ``disk
delete`` on three disks (plus the disks being created).  Checked:

- every command exits 0 or with the exit code of a documented error class that
  makes sense for it (e.g. DiskAttached for the losers of an attach race), never
  1 (internal error), never with a traceback, always one line on stderr (a JSON
  error object, as the commands run with ``--json``);
- exactly one attachment per disk at any time: a monitor samples the processes
  all along and never sees two nbdkit servers (or two nbdfuse helpers) for one
  disk, and every successful attach of a disk got its own nbdkit;
- afterwards (all attachments detached by the test): no orphan files or rows
  (the files under ``disks/`` and ``snapshots/`` are exactly the catalog's
  rows, no temp or ``.deleted`` markers), no attachment rows, no run
  directories, processes or loop devices left, ``PRAGMA integrity_check`` ok,
  ``audit verify`` passes, and every container's header is valid and its DK
  unwraps to its lineage's DK.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.storage import container
from blockcrypt.system import proc

from support.cli import REPO
from support.env import Env
from support.prereq import require_block_devices

pytestmark = [pytest.mark.e2e, pytest.mark.root]

DISKS = ("d0", "d1", "d2")
NEW = tuple(f"n{i}" for i in range(5))

# What each kind of command may answer in a race, besides success.
ALLOWED = {
    # StateError: a clean "busy, retry" refusal while a snapshot copies the detached
    # disk would be acceptable; nbdkit failing to start (ServerError) is not
    "attach": {errors.DiskAttached, errors.DiskNotFound, errors.StorageError, errors.StateError},
    "detach": {errors.DiskNotAttached, errors.DiskAttached, errors.DiskNotFound,
               errors.DeviceBusy},
    "snapshot": {errors.DiskNotFound, errors.StateError, errors.StorageError},
    "create": set(),
    "delete": {errors.DiskAttached, errors.DiskNotFound},
}


def _plan(rng: random.Random) -> list[tuple[str, list[str]]]:
    ops: list[tuple[str, list[str]]] = []
    for d in DISKS:
        ops += [("attach", ["disk", "attach", d, "--json"])] * 5
        ops += [("detach", ["disk", "detach", d, "--json"])] * 4
        ops += [("snapshot", ["snapshot", "create", d, f"{d}-snap{j}", "--json"])
                for j in range(3)]
    ops += [("create", ["disk", "create", n, "--size", "32M", "--json"]) for n in NEW[:3]]
    ops += [("create", ["disk", "create", n, "--from-snapshot", "base", "--json"])
            for n in NEW[3:]]
    ops += [("delete", ["disk", "delete", "d2", "--json"])] * 3
    ops += [("delete", ["disk", "delete", n, "--json"]) for n in NEW] + \
           [("delete", ["disk", "delete", "n0", "--json"])]
    assert len(ops) == 50
    rng.shuffle(ops)
    return ops


class Monitor(threading.Thread):
    """Samples, for each disk, the nbdkit and nbdfuse processes serving it (one
    pass over /proc per sample)."""

    def __init__(self, run_dir: Path):
        super().__init__(daemon=True)
        self.marker = f"{run_dir}/"
        self.stop = threading.Event()
        self.violations: list[str] = []
        self.samples = 0

    def _servers(self) -> collections.Counter:
        seen = collections.Counter()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            program = os.path.basename(argv[0]).decode(errors="replace")
            if program not in ("nbdkit", "nbdfuse"):
                continue
            for a in argv:
                a = a.decode(errors="replace")
                if self.marker in a:
                    seen[(program, a.split(self.marker, 1)[1].split("/", 1)[0])] += 1
                    break
        return seen

    def run(self) -> None:
        while not self.stop.is_set():
            for (program, disk), n in self._servers().items():
                if n > 1:
                    self.violations.append(f"{n} {program} processes for disk {disk}")
            self.samples += 1
            self.stop.wait(0.01)   # the sampling interval; returns at once when stopped


def test_fifty_concurrent_cli_invocations(home, passphrase_file, tmp_path):
    require_block_devices()
    env = Env(home, passphrase_file, tmp_path)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    monitor = Monitor(home / "run")
    try:
        env.cli("key", "create", "--alias", "k")
        for d in DISKS:
            env.create(d, "64M", "--key", "k")
        env.cli("snapshot", "create", "d0", "base")
        lineage_dk = {}
        for d in DISKS:
            h = container.read_header(env.json("disk", "show", d)["path"])
            lineage_dk[h.lineage_hex] = env.data_key(d)

        plan = _plan(rng)
        monitor.start()
        base = [sys.executable, "-m", "blockcrypt", "--home", str(home), "--passphrase-file",
                str(passphrase_file)]
        started = time.monotonic()
        procs = [subprocess.Popen(base + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  stdin=subprocess.DEVNULL, cwd=REPO) for _, argv in plan]
        results = []
        for (kind, argv), p in zip(plan, procs):
            out, err = p.communicate(timeout=300)
            results.append((kind, argv, p.returncode, out, err.decode()))
        elapsed = time.monotonic() - started
        monitor.stop.set()
        monitor.join()

        codes = {cls.exit_code: cls for cls in errors.all_error_classes()}
        tally = collections.Counter()
        attaches = collections.defaultdict(list)
        tally_by_disk = collections.Counter()
        for kind, argv, rc, out, err in results:
            tally[(kind, rc)] += 1
            if rc == 0:
                tally_by_disk[(kind, argv[2])] += 1
            assert "Traceback" not in err, f"{argv}: {err}"
            if rc == 0:
                if kind == "attach":
                    d = json.loads(out)
                    assert d["state"] == "attached" and d["device"].startswith("/dev/loop")
                    attaches[d["name"]].append(d["nbdkit_pid"])
                continue
            assert rc != 1, f"{argv}: internal error: {err}"
            allowed = {cls.exit_code for cls in ALLOWED[kind]}
            assert rc in allowed, (f"{argv}: exit {rc} ({codes.get(rc, '?')}) is not one of "
                                   f"{sorted(c.__name__ for c in ALLOWED[kind])}: {err}")
            assert len(err.strip().splitlines()) == 1, err      # --json: one JSON object
            assert json.loads(err)["exit_code"] == rc, err
        print(f"\n50 commands in {elapsed:.1f} s, {monitor.samples} monitor samples; "
              f"outcomes: {sorted(tally.items())}")
        assert monitor.samples > 10
        assert monitor.violations == [], monitor.violations
        for d in ("d0", "d1"):                  # never deleted: some attach must win
            assert attaches[d], f"no attach of {d} succeeded: {sorted(tally.items())}"
        for d, pids in attaches.items():
            assert len(pids) == len(set(pids)), f"two attaches of {d} shared nbdkit {pids}"
        # a detach succeeds only on an attached disk, so with one attachment at a time
        # the successes of each disk alternate: attach, detach, attach, ...
        final = {d["name"]: d["state"] for d in env.json("disk", "list")}
        for d in DISKS:
            detached = tally_by_disk[("detach", d)]
            assert len(attaches[d]) - detached == (1 if final.get(d) == "attached" else 0), \
                (d, len(attaches[d]), detached, final.get(d))

        # clean up every attachment, then look for anything orphaned
        for d in env.json("disk", "list"):
            if d["state"] != "available":
                assert d["state"] == "attached", d
                env.detach(d["name"])
        _assert_consistent(env, lineage_dk)
    finally:
        monitor.stop.set()
        env.cleanup()


def _assert_consistent(env: Env, lineage_dk: dict[str, bytes]) -> None:
    env.cli("snapshot", "list")                      # recovery, as the next command would
    env.cli("disk", "list")
    conn = sqlite3.connect(env.home / "blockcrypt.db")
    conn.row_factory = sqlite3.Row
    with contextlib.closing(conn):
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM attachments").fetchone()[0] == 0
        rows = {t: [dict(r) for r in conn.execute(f"SELECT * FROM {t}")]
                for t in ("disks", "snapshots")}
    for table in ("disks", "snapshots"):
        files = sorted(os.listdir(env.home / table))
        assert files == sorted(Path(r["path"]).name for r in rows[table]), (table, files)
    run = env.home / "run"
    assert not run.exists() or os.listdir(run) == [], os.listdir(run)
    assert proc.find_processes("nbdkit", f"{run}/") == []
    assert proc.find_processes("nbdfuse", f"{run}/") == []
    loops = subprocess.run(["losetup", "--list", "--noheadings", "-O", "BACK-FILE"],
                           capture_output=True, text=True).stdout
    assert str(env.home) not in loops
    dks = dict(lineage_dk)           # disks created during the run bring new lineages
    with env.store() as store:
        for table in ("disks", "snapshots"):
            for r in rows[table]:
                h = container.read_header(env.home / r["path"], repair=False)
                assert h.uid_hex == r["id"] and h.lineage_hex == r["lineage_id"]
                with store.decrypt_data_key(h.wrapped_dk, container.key_context(h)) as dk:
                    assert dks.setdefault(h.lineage_hex, dk.reveal()) == dk.reveal(), r["name"]
    verify = json.loads(env.cli("audit", "verify", "--json").stdout)
    assert verify["ok"] is True


def test_attach_while_a_snapshot_copies_the_detached_disk(home, passphrase_file, tmp_path):
    """`snapshot create` copies a detached disk under a shared flock of its container
    (blockcrypt.services.snapshot_copy.copy_disk).  An attach that comes in meanwhile must
    either wait for the copy or refuse cleanly (one line, a documented state
    error, no traceback), never fail as a server crash."""
    require_block_devices()
    env = Env(home, passphrase_file, tmp_path)
    try:
        d = env.create("busy", "64M")
        fd = os.open(d["path"], os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)                 # what a snapshot copy holds
        release = threading.Timer(2.0, fcntl.flock, (fd, fcntl.LOCK_UN))
        release.start()                                # the copy ends after 2 s
        try:
            cp = env.cli("disk", "attach", "busy", check=False)
        finally:
            release.join()
            os.close(fd)
        err = cp.stderr.decode()
        assert "Traceback" not in err, err
        assert cp.returncode in (0, errors.DiskAttached.exit_code,
                                 errors.StateError.exit_code), err
        if cp.returncode == 0:
            env.detach("busy")
        else:
            assert len(err.strip().splitlines()) == 1, err
            assert env.json("disk", "show", "busy")["state"] == "available"
    finally:
        env.cleanup()
