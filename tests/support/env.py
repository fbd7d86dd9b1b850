"""An initialised blockcrypt home for root end-to-end tests, with helpers to
attach, mount and inspect; :meth:`Env.cleanup` tears down every attachment.
The ``env`` fixture (tests/conftest.py) wraps it."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

from blockcrypt import errors
from blockcrypt.cli import read_passphrase_file
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage import container
from blockcrypt.storage.home import Home
from blockcrypt.system import devices, proc

from .cli import run_cli
from .stored import catalog_ref, container_file

MiB = 2**20


# -- helpers ------------------------------------------------------------------------

class Env:
    """An initialised home plus helpers; tears down every attachment at the end."""

    def __init__(self, home: Path, passphrase_file: Path, tmp_path: Path):
        self.home, self.passphrase_file, self.tmp = home, passphrase_file, tmp_path
        self.mounts: list[Path] = []
        self.cli("init")

    def cli(self, *args, check=True, **kw):
        return run_cli(*args, home=self.home, passphrase_file=self.passphrase_file,
                       check=check, **kw)

    def json(self, *args):
        return json.loads(self.cli(*args, "--json").stdout)

    def create(self, name, size="256M", *extra):
        return self.json("disk", "create", name, "--size", size, *extra)

    def attach(self, name, *extra) -> dict:
        d = self.json("disk", "attach", name, *extra)
        assert d["state"] == "attached" and d["device"].startswith("/dev/")
        return d

    def detach(self, name):
        return self.json("disk", "detach", name)

    def refused(self, error: type[errors.BlockcryptError], *args) -> str:
        cp = self.cli(*args, check=False)
        assert cp.returncode == error.exit_code, (
            f"{args}: exit {cp.returncode}, expected {error.__name__} "
            f"({error.exit_code}): {cp.stderr.decode()}")
        return cp.stderr.decode()

    def mount(self, device: str, name: str = "mnt") -> Path:
        mp = self.tmp / name
        mp.mkdir(exist_ok=True)
        subprocess.run(["mount", device, str(mp)], check=True, capture_output=True)
        self.mounts.append(mp)
        return mp

    def umount(self, mp: Path) -> None:
        subprocess.run(["umount", str(mp)], check=True, capture_output=True)
        self.mounts.remove(mp)

    def store(self) -> KeyStore:
        return open_store(self.home, self.passphrase_file)

    def data_key(self, name: str, cluster=None) -> bytes:
        """The disk's DK, unwrapped here through the key store (the test knows it);
        ``cluster``: the Ceph cluster of its RBD store, if it has one."""
        return container_dk(self.home, self.passphrase_file,
                            container_file(self.home, "disks", name, cluster=cluster,
                                           scratch=self.tmp))

    def rows(self, table: str) -> list:
        conn = sqlite3.connect(self.home / "blockcrypt.db")
        try:
            return conn.execute(f"SELECT * FROM {table}").fetchall()
        finally:
            conn.close()

    def cleanup(self) -> None:
        for mp in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(mp)], capture_output=True)
        teardown_home(self.home, self.cli)


def open_store(home: Path, passphrase_file: Path) -> KeyStore:
    """The key store of ``home``, opened in the test process with the passphrase file."""
    return KeyStore.open(Home(home), lambda: read_passphrase_file(str(passphrase_file)))


def slow_copy(delay_s: float, lifted: Path | None = None) -> dict[str, str]:
    """Environment that slows a snapshot's background copy (the test-only knob of
    blockcrypt.storage.chunkcopy) by ``delay_s`` per chunk, for good or until
    ``lifted`` exists: the test touches it once the windows it needed are behind it."""
    from blockcrypt.storage.chunkcopy import TESTONLY_DELAY_ENV
    return {TESTONLY_DELAY_ENV: f"{delay_s}" + (f":{lifted}" if lifted else "")}


def container_path(home: Path, table: str, name: str) -> Path:
    """The container file the catalog records for the disk or snapshot ``name``
    (``table``: ``disks`` or ``snapshots``) in the home's file store."""
    return home / catalog_ref(home, table, name)


def container_dk(home: Path, passphrase_file: Path,
                 path: Path | container.Header) -> bytes | None:
    """A container's data key (``path``: its file, or its header), unwrapped through
    ``home``'s key store as the test's own check of what blockcrypt wrote; None for an
    unencrypted container."""
    h = path if isinstance(path, container.Header) else container.read_header(path)
    if not h.encrypted:
        return None
    with open_store(home, passphrase_file) as store:
        with store.decrypt_data_key(h.wrapped_dk, container.key_context(h)) as dk:
            return dk.reveal()


def teardown_home(home: Path, cli: Callable[..., subprocess.CompletedProcess]) -> None:
    """Detach every attached disk of ``home`` through ``cli`` (a CLI runner taking
    ``check=``), then stop any nbdkit or nbdfuse still running from its run directory."""
    if (home / "blockcrypt.db").exists():
        for d in json.loads(cli("disk", "list", "--json").stdout or "[]"):
            if d["state"] != "available" and d["method"] != "serve":
                cli("disk", "detach", d["name"], check=False)
    run = home / "run"
    for program in ("nbdkit", "nbdfuse"):
        for pid in proc.find_processes(program, f"{run}/"):
            proc.stop_process(pid, program, f"{run}/")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def write_files(mp: Path) -> dict[str, str]:
    """A few small files and one of 64 MiB of random data; returns name -> sha256."""
    (mp / "dir").mkdir()
    (mp / "hello.txt").write_text("hello, blockcrypt\n")
    (mp / "dir" / "odd-size.bin").write_bytes(os.urandom(12345))
    with open(mp / "random.bin", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    return {str(p.relative_to(mp)): sha256(p) for p in mp.rglob("*") if p.is_file()}


def read_allocated(path: str) -> list[tuple[int, bytes]]:
    """(offset, bytes) of every allocated extent of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, os.pread(fd, stop - start, start)))
            pos = stop
    return out


def dd_write(device: str, data: bytes, offset: int) -> None:
    src = Path(f"/tmp/bc-pattern-{os.getpid()}")
    src.write_bytes(data)
    try:
        subprocess.run(["dd", f"if={src}", f"of={device}", "bs=4096", f"seek={offset // 4096}",
                        "oflag=direct,sync", "conv=notrunc,fsync", "status=none"],
                       check=True, capture_output=True)
    finally:
        src.unlink()


def dd_read(device: str, length: int, offset: int) -> bytes:
    return subprocess.run(["dd", f"if={device}", "bs=4096", f"skip={offset // 4096}",
                           f"count={length // 4096}", "iflag=direct", "status=none"],
                          check=True, capture_output=True).stdout


def assert_nothing_started(e: Env, name: str) -> None:
    run_dir = e.home / "run" / name
    assert not run_dir.exists()
    assert e.rows("attachments") == []
    assert proc.find_processes("nbdkit", f"{run_dir}/") == []
    assert devices.loop_devices_backed_by(run_dir / "fuse" / "disk") == []
