"""Bad command-line input changes nothing (issue 8 item 11).

Every bad name, size or passphrase file must give one clean line on stderr
(``error: ...``, never a traceback), the exit code of its error class, and
leave the home exactly as it was.  "Exactly" is checked on a snapshot of the
home taken before and after each command:

- every file except the database: type, mode, size, mtime (ns) and the SHA-256
  of its allocated extents (holes are zeros by definition, and the extent map
  is part of the snapshot); every directory: mode and entries;
- the database (its bytes change when SQLite merely opens it: WAL, checkpoint),
  compared logically: every row of every table equal, except that the audit
  trail may gain records of *refused* key-store operations (the key store audits
  refusals, e.g. a passphrase it could not read) and nothing else.  A bad name
  or size is refused before the key store is used, so it may not even add those;
  it may add only the record of the refused management operation (every disk and
  snapshot operation is audited, refusals too: issue 12 item 11).

NUL cannot reach a process through argv (execve takes C strings), so names
containing NUL are tested through the library API that the CLI calls.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from blockcrypt import errors, names
from blockcrypt.cli import read_passphrase_file
from blockcrypt.kms.local import KeyStore
from blockcrypt.services.disks import DiskService
from blockcrypt.services.snapshots import LifecycleService
from blockcrypt.storage.home import Home

from support.cli import REPO, run_cli
from support.prereq import require_root, require_tools

MiB = 2**20


# -- the snapshot of a home ----------------------------------------------------------

def _extents_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:                      # ENXIO: only a hole is left
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            h.update(f"[{start},{stop})".encode())
            for off in range(start, stop, 4 * MiB):
                h.update(os.pread(fd, min(4 * MiB, stop - off), off))
            pos = stop
    return h.hexdigest()


def _db_state(db: Path) -> tuple[dict, list]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        content = {t: sorted(map(tuple, conn.execute(f"SELECT * FROM {t}")), key=repr)
                   for t in tables if t not in ("audit_log", "audit_head")}
        audit = [tuple(r) for r in conn.execute("SELECT * FROM audit_log ORDER BY seq")]
    finally:
        conn.close()
    return content, audit


def home_state(home: Path) -> dict:
    files = {}
    for dirpath, dirnames, filenames in os.walk(home):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(home))
            if rel.startswith("blockcrypt.db"):
                continue
            st = os.lstat(p)
            if stat.S_ISDIR(st.st_mode):
                files[rel] = ("dir", stat.S_IMODE(st.st_mode), sorted(os.listdir(p)))
            elif stat.S_ISREG(st.st_mode):
                files[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns,
                              _extents_digest(p))
            else:
                files[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode))
    tables, audit = _db_state(home / "blockcrypt.db")
    return {"files": files, "tables": tables, "audit": audit}


def assert_unchanged(before: dict, after: dict, *, refusals_may_be_audited: bool) -> None:
    assert after["files"] == before["files"], "files under the home changed"
    assert after["tables"] == before["tables"], "catalog or key store rows changed"
    n = len(before["audit"])
    assert after["audit"][:n] == before["audit"], "existing audit records changed"
    added = [json.loads(r[4]) for r in after["audit"][n:]]
    assert all(r["result"] == "refused" for r in added), added
    if not refusals_may_be_audited:   # only the refused management operations themselves
        assert all("objects" in r for r in added), f"audit records added: {added}"


class HomeUnderTest:
    """An initialised home with disk d (under key k) and its snapshot s.

    The service key is deliberately not created: a command that created it as a
    side effect before refusing would change the key store."""

    def __init__(self, home: Path, passphrase_file: Path):
        self.home, self.pf = home, passphrase_file
        self.cli("init")
        self.cli("key", "create", "--alias", "k")
        self.cli("disk", "create", "d", "--size", "16M", "--key", "k")
        self.cli("snapshot", "create", "d", "s")

    def cli(self, *args, check=True, passphrase_file=None, env=None):
        return run_cli(*args, home=self.home, passphrase_file=passphrase_file or self.pf,
                       check=check, env=env)

    def refused(self, error: type[errors.BlockcryptError], *args,
                refusals_may_be_audited: bool = False, **kw) -> str:
        before = home_state(self.home)
        cp = self.cli(*args, check=False, **kw)
        err = cp.stderr.decode()
        assert cp.returncode == error.exit_code, (
            f"{args!r}: exit {cp.returncode}, expected {error.__name__} "
            f"({error.exit_code}); stderr: {err}")
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{args!r}: {err!r}"
        assert "Traceback" not in err and cp.stdout == b"", args
        assert_unchanged(before, home_state(self.home),
                         refusals_may_be_audited=refusals_may_be_audited)
        return lines[0]


@pytest.fixture
def h(home, passphrase_file) -> HomeUnderTest:
    return HomeUnderTest(home, passphrase_file)


# -- names -------------------------------------------------------------------------------

BAD_NAMES = {
    "slash": "a/b",
    "absolute": "/etc",
    "dotdot": "..",
    "dotdot-path": "../d",
    "newline": "x\ny",
    "leading-dot": ".hidden",
    "too-long": "x" * (names.NAME_MAX_CHARS + 1),
}


def _name_commands(bad: str, tmp: Path) -> list[list[str]]:
    """Every command taking a disk or snapshot name, with the bad name in each
    name position ('--' so a name is never read as an option)."""
    cmds = [
        ["disk", "create", "--size", "16M", "--", bad],
        ["disk", "create", "--from-snapshot", "s", "--", bad],
        ["disk", "create", "--from-snapshot", bad, "--", "ok"],
        ["disk", "show", "--", bad],
        ["disk", "delete", "--", bad],
        ["disk", "reset", "--snapshot", "s", "--", bad],
        ["disk", "reset", "--snapshot", bad, "--", "d"],
        ["disk", "reinit", "--", bad],
        ["snapshot", "create", "--", "d", bad],
        ["snapshot", "create", "--", bad, "s2"],
        ["snapshot", "show", "--", bad],
        ["snapshot", "delete", "--", bad],
        ["disk", "serve", "--unix", str(tmp / "serve.sock"), "--", bad],
    ]
    if os.geteuid() == 0:        # attach/detach check root first, then the name
        cmds += [["disk", "attach", "--", bad], ["disk", "detach", "--", bad]]
    return cmds


@pytest.mark.parametrize("bad", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
def test_bad_names_are_refused_everywhere_and_change_nothing(h, tmp_path, bad):
    for argv in _name_commands(bad, tmp_path):
        line = h.refused(errors.InvalidName, *argv)
        assert "name" in line, line
    assert not (tmp_path / "serve.sock").exists()


@pytest.mark.parametrize("bad", ["", ".", "sp ace", "tab\there", "caf\u00e9", "a;rm -rf",
                                 "*", "x" * 1000])
def test_more_bad_names_on_create(h, bad):
    h.refused(errors.InvalidName, "disk", "create", "--size", "16M", "--", bad)
    h.refused(errors.InvalidName, "snapshot", "create", "--", "d", bad)


def test_longest_valid_name_is_accepted(h):
    """The boundary: 64 characters is fine (so the refusal above is about length)."""
    name = "n" * names.NAME_MAX_CHARS
    h.cli("disk", "create", "--size", "16M", "--key", "k", "--", name)
    h.cli("disk", "delete", "--", name)


def test_nul_in_names_is_refused_by_the_library(h):
    """argv cannot carry NUL: Python refuses it before exec (and the kernel could
    not pass it).  The library the CLI calls refuses it as InvalidName, before
    anything is written."""
    with pytest.raises(ValueError, match="null byte"):
        subprocess.run([sys.executable, "-m", "blockcrypt", "disk", "show", "a\0b"])
    before = home_state(h.home)
    store = KeyStore.open(Home(h.home), lambda: read_passphrase_file(str(h.pf)))
    try:
        disks = DiskService(Home(h.home), store.conn, store)
        life = LifecycleService(Home(h.home), store.conn, store, disks=disks)
        for call in (lambda: disks.create("a\0b", 16 * MiB, key_ref="k"),
                     lambda: disks.create("\0", 16 * MiB, key_ref="k"),
                     lambda: disks.show("d\0"),
                     lambda: disks.delete("d\0"),
                     lambda: life.create_snapshot("d", "s\0x"),
                     lambda: life.create_snapshot("d\0", "s3"),
                     lambda: life.create_disk_from_snapshot("n\0", "s"),
                     lambda: life.delete_snapshot("s\0")):
            with pytest.raises(errors.InvalidName):
                call()
        with pytest.raises(errors.InvalidName):
            names.validate_name("a\x00")
    finally:
        store.close()
    assert_unchanged(before, home_state(h.home), refusals_may_be_audited=False)


# -- sizes -------------------------------------------------------------------------------

BAD_SIZES = {
    "zero": ("0", "4096"),
    "zero-suffixed": ("0G", "4096"),
    "negative": ("-1", "4096"),
    "negative-suffixed": ("-4G", "4096"),
    "unaligned-4096": ("4097", "4096"),
    "unaligned-512": ("1000", "512"),
    "unaligned-suffix": ("6K", "4096"),
    "fraction": ("1.5G", "4096"),
    "unknown-suffix": ("10X", "4096"),
    "garbage": ("abc", "4096"),
    "empty": ("", "4096"),
    "hex": ("0x1000", "4096"),
    "exponent": ("1e9", "4096"),
    "two-pow-63": (str(2**63), "4096"),          # aligned, but past the last offset
    "8E": ("8E", "4096"),                        # the same, with a suffix
    "above-two-pow-63": (str(2**63 + 4096), "4096"),
    "two-pow-64": (str(2**64), "4096"),
    "huge": ("9" * 40 + "E", "4096"),
}


@pytest.mark.parametrize("size,sector", list(BAD_SIZES.values()), ids=list(BAD_SIZES))
def test_bad_sizes_are_refused_and_change_nothing(h, size, sector):
    """With and without --key: without it, the service key must not be created
    as a side effect of a size that is refused anyway."""
    h.refused(errors.InvalidSize, "disk", "create", "x", "--size", size,
              "--sector-size", sector, "--key", "k")
    h.refused(errors.InvalidSize, "disk", "create", "x", "--size", size,
              "--sector-size", sector)
    if sector == "4096":                     # the snapshot's sector size
        h.refused(errors.InvalidSize, "disk", "create", "x", "--from-snapshot", "s",
                  "--size", size)


def test_from_snapshot_size_may_only_grow(h):
    h.refused(errors.InvalidSize, "disk", "create", "x", "--from-snapshot", "s",
              "--size", "8M")


# -- passphrase files ------------------------------------------------------------------

def _passphrase_cases(tmp: Path) -> dict[str, Path]:
    (tmp / "a-directory").mkdir()
    (tmp / "empty").write_bytes(b"")
    (tmp / "huge").write_bytes(b"p" * (64 * 1024 + 1))
    for private in ("empty", "huge"):      # private as they must be: refused for content
        (tmp / private).chmod(0o600)
    (tmp / "a-file").write_text("x\n")
    return {"missing": tmp / "does-not-exist", "directory": tmp / "a-directory",
            "empty": tmp / "empty", "larger-than-64k": tmp / "huge",
            "not-a-directory": tmp / "a-file" / "passphrase"}


def _material_commands() -> list[list[str]]:
    """Commands that need CMK material, hence the passphrase."""
    cmds = [["disk", "create", "n", "--size", "16M", "--key", "k"],
            ["disk", "create", "n", "--size", "16M"],          # would create the service key
            ["disk", "create", "n", "--from-snapshot", "s"],
            ["snapshot", "create", "d", "s2"],
            ["key", "create", "--alias", "z"],
            ["key", "rotate", "k"]]
    if os.geteuid() == 0:
        cmds.append(["disk", "attach", "d"])
    return cmds


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "larger-than-64k",
                                  "not-a-directory"])
def test_unreadable_passphrase_file_is_a_clean_error(h, tmp_path, case):
    bad = _passphrase_cases(tmp_path)[case]
    for argv in _material_commands():
        line = h.refused(errors.PassphraseFileError, *argv, passphrase_file=bad,
                         refusals_may_be_audited=True)
        assert str(bad) in line
    # the same through the environment variable, with no --passphrase-file
    before = home_state(h.home)
    cp = run_cli("key", "rotate", "k", home=h.home, check=False,
                 env={"BLOCKCRYPT_PASSPHRASE_FILE": str(bad)})
    assert cp.returncode == errors.PassphraseFileError.exit_code, cp.stderr.decode()
    assert_unchanged(before, home_state(h.home), refusals_may_be_audited=True)


def test_unreadable_by_permissions_as_a_user():
    """A 0000 file cannot be read by an ordinary user (root bypasses modes, which is
    why the cases above use other kinds of unreadable paths)."""
    require_root()
    require_tools("setpriv")
    d = Path(tempfile.mkdtemp(prefix="bc-perm-"))      # /tmp itself is traversable
    try:
        os.chmod(d, 0o755)
        pf = d / "secret-pass"
        pf.write_text("pw\n")
        pf.chmod(0)
        probe = ("from blockcrypt.cli import read_passphrase_file as r\n"
                 "from blockcrypt import errors\n"
                 f"try:\n    r({str(pf)!r})\nexcept errors.PassphraseFileError as e:\n"
                 "    print(e.exit_code, e.message)")
        cp = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             sys.executable, "-c", probe], capture_output=True, cwd=d,
                            env={"PYTHONPATH": str(REPO), "PATH": os.environ["PATH"]})
    finally:
        shutil.rmtree(d)
    out = cp.stdout.decode()
    assert out.startswith(f"{errors.PassphraseFileError.exit_code} "), cp.stderr.decode()
    assert "Permission denied" in out
