"""Faults under the plugin (issue 8, items 6 and 7): injected I/O errors and a full disk.

- nbdkit's ``error`` filter under ``fio --verify=crc32c``: the errors reach fio
  and no read is ever silently wrong.
- EIO from the *backing file* (the container lives on a FUSE file whose own
  NBD server injects EIO on demand): the client gets EIO, never success; the
  server keeps serving once the fault clears.
- ENOSPC: the container on a small tmpfs: writes past the space fail with
  ENOSPC at the client, data flushed earlier reads back intact, and the disk
  works again once space is freed, also after restarting the server.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from blockcrypt.storage import container

from support.nbdkit import import_libnbd, serve_container, stop
from support.prereq import require, require_root, require_tools
from support.wait import wait_for

KiB, MiB = 1024, 1024 * 1024

pytestmark = pytest.mark.e2e


def make_disk(path: Path, size_bytes: int, sector_size: int = 4096):
    header = container.new_header("disk", size_bytes, sector_size, encrypted=True,
                                  cmk_id="key-test", cmk_version=1, wrapped_dk=b"w")
    return container.create_container(path, header), os.urandom(64)


def errnum(call) -> int | None:
    nbd = import_libnbd()
    try:
        call()
    except nbd.Error as e:
        return e.errnum
    return None


# -- item 7a: error filter under fio --verify ---------------------------------------------

FIO_JOB = ["--name=verify", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--size=24M",
           "--iodepth=16", "--verify=crc32c", "--randseed=20240601", "--output-format=json",
           "--verify_state_save=0"]


def run_fio(uri: str, cwd: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    # Engine options (--uri) must follow --ioengine.  cwd: fio may leave files there.
    cp = subprocess.run(["fio", *FIO_JOB, f"--uri={uri}", *extra], capture_output=True,
                        text=True, timeout=300, cwd=cwd)
    out = cp.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0] if "{" in out else {}
    return cp, job


def test_fio_verify_with_injected_errors_never_reads_wrong_data(tmp_path):
    require_tools("nbdkit", "fio")
    engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    require("nbd" in engines.split(), "fio was built without the nbd engine")
    path = tmp_path / "d.bcd"
    header, dk = make_disk(path, 32 * MiB)

    # 1. Write the verification pattern (no faults).
    with serve_container(path, dk) as srv:
        cp, job = run_fio(srv.uri, tmp_path, "--do_verify=0")
    assert cp.returncode == 0 and job["error"] == 0, cp.stderr
    assert job["write"]["io_bytes"] == 24 * MiB

    # 2. Verify it through the error filter failing 5% of reads with EIO: fio
    #    sees the errors, and every read that succeeds carries the right data.
    with serve_container(path, dk, filters=("error",),
                         filter_args=("error-pread=EIO", "error-pread-rate=5%")) as srv:
        cp, job = run_fio(srv.uri, tmp_path, "--verify_only", "--continue_on_error=read",
                          "--verify_fatal=1")
    assert cp.returncode == 0, cp.stderr
    assert "verify:" not in cp.stderr, cp.stderr                # no mismatch at all
    assert job["error"] == errno.EIO and job["total_err"] > 0    # errors reached fio
    assert job["read"]["total_ios"] == 24 * MiB // (4 * KiB)

    # 3. Write errors reach fio too.
    with serve_container(path, dk, filters=("error",),
                         filter_args=("error-pwrite=EIO", "error-pwrite-rate=10%")) as srv:
        cp, job = run_fio(srv.uri, tmp_path, "--do_verify=0", "--continue_on_error=write")
    assert job["error"] == errno.EIO and job["total_err"] > 0, cp.stderr

    # Control: the same verify pass against wrong data (another key) does fail,
    # so step 2 would have caught a silently wrong read.
    with serve_container(path, os.urandom(64)) as srv:
        cp, job = run_fio(srv.uri, tmp_path, "--verify_only", "--verify_fatal=1")
    assert cp.returncode != 0 and "verify:" in cp.stderr


# -- item 7b: EIO from the backing file ----------------------------------------------------

class FaultyBackingFile:
    """The container, exposed as a FUSE file (nbdfuse) by an ``nbdkit file`` server
    whose error filter fails every request while ``trigger`` exists."""

    def __init__(self, image: Path, workdir: Path):
        self.trigger = workdir / "inject-eio"
        self.mountpoint = workdir / "fuse"
        self.mountpoint.mkdir()
        self.sock = workdir / "lower.sock"
        self.file = self.mountpoint / "disk.bcd"
        self._log = open(workdir / "lower.log", "wb")
        self.lower = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=error",
             "file", str(image), "error=EIO", "error-rate=100%", f"error-file={self.trigger}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.fuse = None
        try:
            wait_for(self.sock.exists, 20.0, "the lower nbdkit socket")
            pidfile = workdir / "nbdfuse.pid"
            self.fuse = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(self.file),
                                          "--unix", str(self.sock)],
                                         stdout=self._log, stderr=subprocess.STDOUT)
            wait_for(lambda: pidfile.exists() and self.file.exists(), 20.0, "nbdfuse")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.fuse is not None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.fuse.wait(10)
            except subprocess.TimeoutExpired:
                self.fuse.kill()
                self.fuse.wait()
        stop(self.lower)
        self._log.close()


def test_eio_from_the_backing_file_reaches_the_client(tmp_path):
    require_root()
    require(Path("/dev/fuse").exists(), "no /dev/fuse")
    require_tools("nbdkit", "nbdfuse", "fusermount3")
    require(import_libnbd() is not None, "python3-libnbd not installed")
    image = tmp_path / "image.bcd"
    header, dk = make_disk(image, 16 * MiB)
    backing = FaultyBackingFile(image, tmp_path)
    try:
        with serve_container(backing.file, dk) as srv:
            h = srv.connect()
            good = os.urandom(1 * MiB)
            h.pwrite(good, 0)
            h.flush()
            backing.trigger.touch()
            # Regions the page cache has never seen, so the read reaches the file.
            assert errnum(lambda: h.pread(64 * KiB, 12 * MiB)) == errno.EIO
            assert errnum(lambda: h.pread(100, 10 * MiB + 7)) == errno.EIO
            nbd = import_libnbd()
            assert errnum(lambda: h.pwrite(b"w" * 8192, 6 * MiB, nbd.CMD_FLAG_FUA)) == errno.EIO
            assert errnum(lambda: h.pwrite(b"u" * 100, 7 * MiB + 3)) == errno.EIO   # RMW read
            # (flush may succeed: FUSE here is write-through, nothing is dirty.)
            assert errnum(lambda: h.zero(64 * KiB, 5 * MiB, nbd.CMD_FLAG_FUA)) == errno.EIO
            backing.trigger.unlink()
            # The fault cleared: the same connection and server go on serving.
            assert h.pread(len(good), 0) == good
            assert h.pread(64 * KiB, 12 * MiB) == bytes(64 * KiB)
            h.pwrite(b"after" * 100, 6 * MiB, nbd.CMD_FLAG_FUA)
            assert h.pread(500, 6 * MiB) == b"after" * 100
            assert srv.proc.poll() is None
    finally:
        backing.close()


# -- item 6: ENOSPC ----------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 24 MiB tmpfs."""
    require_root()
    require_tools("mount", "umount")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(mnt)],
                   check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_reaches_the_client_and_flushed_data_survives(small_fs):
    require_tools("nbdkit")
    require(import_libnbd() is not None, "python3-libnbd not installed")
    nbd = import_libnbd()
    path = small_fs / "d.bcd"
    header, dk = make_disk(path, 64 * MiB)           # sparse: more than the 24 MiB fs
    ballast = small_fs / "ballast"
    ballast.write_bytes(os.urandom(4 * MiB))
    flushed = os.urandom(8 * MiB)
    chunk = os.urandom(1 * MiB)
    with serve_container(path, dk) as srv:
        h = srv.connect()
        h.pwrite(flushed, 0)
        h.flush()
        offset, failures = 16 * MiB, []
        while offset < 64 * MiB:
            err = errnum(lambda: h.pwrite(chunk, offset))
            if err is not None:
                failures.append(err)
                break
            offset += len(chunk)
        assert failures == [errno.ENOSPC], failures
        # Encrypted zeros are data too (discard is off): no space for them either.
        assert errnum(lambda: h.zero(4 * MiB, 60 * MiB)) == errno.ENOSPC
        # The server is alive and everything flushed reads back intact.
        assert h.pread(len(flushed), 0) == flushed
        assert srv.proc.poll() is None
        # Free space: the very same write now succeeds.
        ballast.unlink()
        h.pwrite(chunk, offset, nbd.CMD_FLAG_FUA)
        assert h.pread(len(chunk), offset) == chunk
        h.flush()
    # The disk serves again after a restart (a re-attach).
    with serve_container(path, dk, readonly=True) as srv:
        h = srv.connect()
        assert h.pread(len(flushed), 0) == flushed
        assert h.pread(len(chunk), offset) == chunk
