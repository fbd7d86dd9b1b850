"""kill -9 of the CLI at every step (issue 8 item 5).

For each multi-step operation (snapshot create, disk create --from-snapshot
with growth, disk reset, snapshot delete, disk resize, key rotation, passphrase
change, and an in-place header update of a committed disk), the steps are enumerated first
by running the operation once with ``BLOCKCRYPT_TESTONLY_CRASH_LIST`` (the
named crash points of blockcrypt.testing.crashpoints) and with a seam on
``container._fault_hook`` that lists the header update's own steps
(``write:B``, ``fsync:B``, ``write:A``, ``fsync:A``).  Then the operation is
run again and killed with SIGKILL at each step in turn.  After every kill:

- the catalog passes ``PRAGMA integrity_check`` and ``foreign_key_check``;
- once the next command has run (``snapshot list``, which finishes or undoes
  interrupted creates and deletes), the files under ``disks/`` and
  ``snapshots/`` are exactly the catalog's rows: no orphan files, no orphan rows,
  no temp or ``.deleted`` markers, no attachment rows;
- every container has at least one valid header copy, whose uid is its row's id,
  and its data key unwraps to the DK of its lineage (the test knows every DK);
- data written before the operation reads back unchanged;
- ``audit verify`` passes;
- the operation, run again, completes (or, if the killed run had committed, its
  result is complete and usable).

Header-update steps are injected by running the CLI through a tiny wrapper that
installs the hook and then calls ``blockcrypt.cli.main`` (the hook kills the
process with SIGKILL, exactly like the crash points).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from blockcrypt.cli import read_passphrase_file
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms.local import KeyStore
from blockcrypt.nbd.backend import DiskBackend
from blockcrypt.storage import container
from blockcrypt.storage.home import Home
from blockcrypt.testing.crashpoints import ENV_CRASH_AT, ENV_CRASH_LIST

from support.cli import REPO

MiB = 2**20
HEADER_AT = "BLOCKCRYPT_TEST_HEADER_CRASH_AT"
HEADER_LIST = "BLOCKCRYPT_TEST_HEADER_STEPS"

# Runs `blockcrypt ARGS...` (or, with --payload, a snippet) with a header-update hook
# that records each step and SIGKILLs the process at the one named in HEADER_AT.
WRAPPER = r"""
import os, signal, sys
from blockcrypt.storage import container
at, listing = os.environ.get("%(at)s"), os.environ.get("%(list)s")
def hook(step):
    if listing:
        with open(listing, "a") as f:
            f.write("header:" + step + "\n")
    if at == "header:" + step:
        os.kill(os.getpid(), signal.SIGKILL)
container._fault_hook = hook
if sys.argv[1] == "--payload":
    exec(sys.argv[2])
else:
    from blockcrypt.cli import main
    main(sys.argv[1:])
""" % {"at": HEADER_AT, "list": HEADER_LIST}

# An in-place header update of a committed disk, as a re-wrap under the key's
# newest version (what any future "re-wrap after rotation" or grow does): the
# same DK, a new wrapped form, written with container.write_header.
REWRAP_PAYLOAD = r"""
from blockcrypt.storage import container
from blockcrypt.cli import read_passphrase_file
from blockcrypt.storage.home import Home
from blockcrypt.kms.envelope import parse_wrapped
from blockcrypt.kms.local import KeyStore
home, pf, path = sys.argv[3:6]
with KeyStore.open(Home(home), lambda: read_passphrase_file(pf)) as store:
    h = container.read_header(path)
    ctx = container.key_context(h)
    wrapped = store.reencrypt_data_key(h.wrapped_dk, ctx, ctx)
    container.write_header(path, h.replace(wrapped_dk=wrapped,
                                           cmk_version=parse_wrapped(wrapped).key_version))
"""


class HomeUnderTest:
    """A home with key k, disk d (data written) and snapshot s; knows every DK."""

    def __init__(self, home: Path, tmp: Path):
        self.home, self.tmp = home, tmp
        self.pf = tmp / "passphrase-1"
        self.pf.write_text("first passphrase\n")
        self.pf.chmod(0o600)
        self.other_pf = tmp / "passphrase-2"
        self.other_pf.write_text("second passphrase\n")
        self.other_pf.chmod(0o600)
        self.cli("init")
        self.cli("key", "create", "--alias", "k")
        self.cli("disk", "create", "d", "--size", "16M", "--key", "k")
        self.data = random.Random(5).randbytes(256 * 1024)
        self.dks: dict[str, bytes] = {}                 # lineage hex -> DK
        d = self.row("disks", "d")
        h = container.read_header(self.home / d["path"])
        self.dks[h.lineage_hex] = self.unwrap(h)
        with DiskBackend(self.home / d["path"], Secret(self.dks[h.lineage_hex]),
                         read_only=False, discard=False) as b:
            b.pwrite(self.data, 3 * 4096 + 17, fua=True)
        self.cli("snapshot", "create", "d", "s")

    # -- running -----------------------------------------------------------------
    def argv(self, *args, pf: Path | None = None) -> list[str]:
        return [sys.executable, "-c", WRAPPER, "--home", str(self.home), "--passphrase-file",
                str(pf or self.pf), *map(str, args)]

    def run(self, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
        full = dict(os.environ)
        full.update(env or {})
        return subprocess.run(argv, capture_output=True, env=full, cwd=REPO,
                              stdin=subprocess.DEVNULL, timeout=120)

    def cli(self, *args, pf: Path | None = None, check: bool = True):
        cp = self.run(self.argv(*args, pf=pf))
        if check:
            assert cp.returncode == 0, f"{args}: {cp.returncode} {cp.stderr.decode()}"
        return cp

    def steps(self, argv: list[str]) -> list[str]:
        """Every crash point and header step the operation reaches, in order."""
        listing = self.tmp / "steps.txt"
        listing.unlink(missing_ok=True)
        cp = self.run(argv, env={ENV_CRASH_LIST: str(listing), HEADER_LIST: str(listing)})
        assert cp.returncode == 0, cp.stderr.decode()
        seen: list[str] = []
        for s in listing.read_text().split():
            if s not in seen:
                seen.append(s)
        return seen

    def crash(self, argv: list[str], step: str) -> None:
        var = HEADER_AT if step.startswith("header:") else ENV_CRASH_AT
        cp = self.run(argv, env={var: step})
        assert cp.returncode == -signal.SIGKILL, (step, cp.returncode, cp.stderr.decode())

    # -- looking -------------------------------------------------------------------
    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.home / "blockcrypt.db")
        conn.row_factory = sqlite3.Row
        return conn

    def row(self, table: str, name: str):
        with contextlib.closing(self.db()) as c:
            return c.execute(f"SELECT * FROM {table} WHERE name = ?", (name,)).fetchone()

    def store(self, pf: Path | None = None) -> KeyStore:
        return KeyStore.open(Home(self.home), lambda: read_passphrase_file(str(pf or self.pf)))

    def unwrap(self, h: container.Header) -> bytes:
        with self.store() as s, s.decrypt_data_key(h.wrapped_dk,
                                                   container.key_context(h)) as dk:
            return dk.reveal()

    def read(self, rel_path: str, offset: int, length: int) -> bytes:
        path = self.home / rel_path
        h = container.read_header(path, repair=False)
        with DiskBackend(path, Secret(self.dks[h.lineage_hex]), read_only=True,
                         discard=False) as b:
            buf = bytearray(length)
            b.pread_into(buf, offset)
            return bytes(buf)

    def check(self) -> None:
        """The invariants after a kill, once the next command has run."""
        with contextlib.closing(self.db()) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert c.execute("PRAGMA foreign_key_check").fetchall() == []
        self.cli("snapshot", "list")                       # the next command: recovery
        with contextlib.closing(self.db()) as c:
            rows = {t: [dict(r) for r in c.execute(f"SELECT * FROM {t}")]
                    for t in ("disks", "snapshots")}
            assert c.execute("SELECT COUNT(*) FROM attachments").fetchone()[0] == 0
        with self.store() as store:
            for table in ("disks", "snapshots"):
                on_disk = sorted(os.listdir(self.home / table))
                assert on_disk == sorted(Path(r["path"]).name for r in rows[table]), \
                    f"{table}: files {on_disk} vs rows {[r['path'] for r in rows[table]]}"
                for r in rows[table]:
                    path = self.home / r["path"]
                    valid = []
                    with open(path, "rb") as f:
                        for off in container.COPY_OFFSETS:
                            with contextlib.suppress(Exception):
                                valid.append(container.decode_copy(
                                    os.pread(f.fileno(), container.COPY_SIZE, off)))
                    assert valid, f"{path}: no valid header copy"
                    h = container.read_header(path, repair=False)
                    assert h.uid_hex == r["id"] and h.size_bytes == r["size_bytes"]
                    with store.decrypt_data_key(h.wrapped_dk, container.key_context(h)) as dk:
                        assert dk.reveal() == self.dks[h.lineage_hex], f"{path}: wrong DK"
                    assert self.read(r["path"], 3 * 4096 + 17, len(self.data)) == self.data
        verify = self.cli("audit", "verify", "--json")
        assert json.loads(verify.stdout)["ok"] is True

    def names(self, table: str) -> set[str]:
        with contextlib.closing(self.db()) as c:
            return {r[0] for r in c.execute(f"SELECT name FROM {table}")}


@pytest.fixture
def h(home, tmp_path) -> HomeUnderTest:
    return HomeUnderTest(home, tmp_path)


def _crash_everywhere(h: HomeUnderTest, make_argv, after_each) -> list[str]:
    """Enumerate the steps of argv i, then crash run i at step i for each step."""
    steps = h.steps(make_argv("probe"))
    for i, step in enumerate(steps):
        h.crash(make_argv(i), step)
        h.check()
        after_each(i, step)
        h.check()
    return steps


def test_snapshot_create_killed_at_every_step(h):
    def after(i, step):
        if f"s{i}" not in h.names("snapshots"):         # not committed: run it again
            h.cli("snapshot", "create", "d", f"s{i}")
        assert f"s{i}" in h.names("snapshots")

    steps = _crash_everywhere(h, lambda i: h.argv("snapshot", "create", "d", f"s{i}"), after)
    assert {"snapshot.after-copy", "snapshot.before-commit", "snapshot.after-commit",
            "header:write:B", "header:fsync:B", "header:write:A",
            "header:fsync:A"} <= set(steps), steps


def test_disk_create_from_snapshot_with_growth_killed_at_every_step(h):
    def after(i, step):
        if f"n{i}" not in h.names("disks"):
            h.cli("disk", "create", f"n{i}", "--from-snapshot", "s", "--size", "32M")
        assert h.row("disks", f"n{i}")["size_bytes"] == 32 * MiB

    steps = _crash_everywhere(
        h, lambda i: h.argv("disk", "create", f"n{i}", "--from-snapshot", "s",
                            "--size", "32M"), after)
    assert {"from-snapshot.after-copy", "from-snapshot.before-commit",
            "from-snapshot.after-commit", "header:write:B", "header:fsync:A"} <= set(steps)


def test_disk_reset_killed_at_every_step(h):
    d = h.row("disks", "d")
    other = random.Random(6).randbytes(4096)
    lineage = container.read_header(h.home / d["path"]).lineage_hex
    with DiskBackend(h.home / d["path"], Secret(h.dks[lineage]), read_only=False,
                     discard=False) as b:
        b.pwrite(other, 1024 * 1024, fua=True)           # not in snapshot s

    def after(i, step):
        now = h.read(d["path"], 1024 * 1024, 4096)
        assert now in (other, bytes(4096)), "reset left a mix"   # old, or reset done
        h.cli("disk", "reset", "d", "--snapshot", "s")
        assert h.read(d["path"], 1024 * 1024, 4096) == bytes(4096)
        with DiskBackend(h.home / d["path"], Secret(h.dks[lineage]), read_only=False,
                         discard=False) as b:
            b.pwrite(other, 1024 * 1024, fua=True)

    steps = _crash_everywhere(h, lambda i: h.argv("disk", "reset", "d", "--snapshot", "s"),
                              after)
    assert {"reset.before-swap", "header:write:B", "header:fsync:A"} <= set(steps), steps


def test_snapshot_delete_killed_at_every_step(h):
    for i in range(3):
        h.cli("snapshot", "create", "d", f"del{i}")
    h.cli("snapshot", "create", "d", "delprobe")

    def argv(i):
        return h.argv("snapshot", "delete", "delprobe" if i == "probe" else f"del{i}")

    def after(i, step):
        if f"del{i}" in h.names("snapshots"):
            h.cli("snapshot", "delete", f"del{i}")
        assert f"del{i}" not in h.names("snapshots")

    steps = _crash_everywhere(h, argv, after)
    assert steps == ["snapshot-delete.in-txn", "snapshot-delete.after-commit"], steps


def test_disk_resize_killed_at_every_step(h):
    """The catalog takes the header's size at the next command (``snapshot list``
    in check()), without running the resize again."""
    def size(i) -> int:
        return (24 + 8 * (0 if i == "probe" else i + 1)) * MiB

    def after(i, step):
        assert h.row("disks", "d")["size_bytes"] in (size(i - 1 if i else "probe"), size(i))
        h.cli("disk", "resize", "d", "--size", str(size(i)))
        assert h.row("disks", "d")["size_bytes"] == size(i)

    steps = _crash_everywhere(
        h, lambda i: h.argv("disk", "resize", "d", "--size", str(size(i))), after)
    assert {"disk-resize.before-header", "header:write:B", "header:fsync:A",
            "disk-resize.after-header"} <= set(steps), steps


def test_key_rotation_killed_at_every_step(h):
    def versions() -> int:
        with h.store() as s:
            return s.get_key("k")["current_version"]

    start = versions()

    def after(i, step):
        v = versions()
        h.cli("key", "rotate", "k")
        assert versions() == v + 1

    steps = _crash_everywhere(h, lambda i: h.argv("key", "rotate", "k"), after)
    assert "rotate:before-commit" in steps
    # every crashed rotation was rolled back: only the probe and the re-runs added versions
    assert versions() == start + 1 + len(steps)
    # disks and snapshots wrapped by version 1 still unwrap (h.check did), and a new
    # snapshot is wrapped by the newest version
    h.cli("snapshot", "create", "d", "after-rotations")
    snap = container.read_header(h.home / h.row("snapshots", "after-rotations")["path"])
    assert snap.cmk_version == versions()
    h.check()


def test_passphrase_change_killed_at_every_step(h):
    h.cli("key", "rotate", "k")                  # several materials to re-seal
    h.cli("key", "create", "--alias", "k2")
    pfs = [h.pf, h.other_pf]

    def works(pf: Path) -> bool:
        cp = h.cli("key", "rotate", "k2", pf=pf, check=False)
        return cp.returncode == 0

    def change_argv(i):
        cur, new = (pfs[0], pfs[1])
        return h.argv("passphrase", "change", "--new-passphrase-file", new, pf=cur)

    steps = h.steps(change_argv("probe"))                  # now the second passphrase
    pfs.reverse()
    h.pf = pfs[0]
    assert {"passphrase-change:after-first-key", "passphrase-change:before-commit"} \
        <= set(steps), steps
    for step in steps:
        h.crash(change_argv(0), step)
        # exactly one passphrase works: the old one (nothing was committed)
        assert works(pfs[0]) and not works(pfs[1]), step
        h.check()
        # the change, run again, completes: then only the new one works
        h.cli("passphrase", "change", "--new-passphrase-file", pfs[1], pf=pfs[0])
        pfs.reverse()
        h.pf = pfs[0]
        assert works(pfs[0]) and not works(pfs[1])
        h.check()


def test_in_place_header_update_killed_at_every_step(h):
    """A committed disk's header rewritten in place (a re-wrap under the newest
    key version): a kill at any step leaves the old or the new header, both
    unwrapping to the same DK, and the next read repairs the other copy."""
    h.cli("key", "rotate", "k")
    d = h.row("disks", "d")
    path = h.home / d["path"]

    def argv(_i):
        return [sys.executable, "-c", WRAPPER, "--payload", REWRAP_PAYLOAD, str(h.home),
                str(h.pf), str(path)]

    def after(i, step):
        h.run(argv(i)).check_returncode()         # completes; both copies the newest
        with open(path, "rb") as f:
            a, b = (os.pread(f.fileno(), container.COPY_SIZE, off)
                    for off in container.COPY_OFFSETS)
        assert a == b

    seqs = []
    steps = h.steps(argv("probe"))
    assert steps == ["header:write:B", "header:fsync:B", "header:write:A", "header:fsync:A"]
    for i, step in enumerate(steps):
        before = container.read_header(path)
        h.crash(argv(i), step)
        got = container.read_header(path, repair=False)
        assert got.seq in (before.seq, before.seq + 1), step
        seqs.append(got.seq - before.seq)
        h.check()
        after(i, step)
    # killed before the first write: old header; between the copies the new one may win
    assert seqs[0] == 0
