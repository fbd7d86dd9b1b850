"""DiskBackend: sector I/O semantics on real container files (no nbdkit).

Every read/write check compares against a shadow bytearray; on-disk checks
read the container file directly and decrypt with pyca's XTS independently of
blockcrypt.crypto.xts.  Every test runs on both request paths: the compiled
one (blockcrypt.crypto._datapath.Disk) and the Python reference path
(engine="reference": PythonSectors with pyca's XTS).
"""
from __future__ import annotations

import errno
import itertools
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.crypto.xts import XtsCipher
from blockcrypt.nbd.backend import DiskBackend, errno_for
from blockcrypt.storage import container

from support.cli import REPO

KiB, MiB = 1024, 1024 * 1024
SECTOR_SIZES = (512, 4096)


def make_container(path: Path, size_bytes: int, sector_size: int, encrypted: bool):
    """A fresh container; returns (header, DK bytes or None)."""
    if encrypted:
        header = container.new_header("disk", size_bytes, sector_size, encrypted=True,
                                      cmk_id="key-test", cmk_version=1,
                                      wrapped_dk=b"opaque-wrapped-dk")
        dk = os.urandom(64)
    else:
        header = container.new_header("disk", size_bytes, sector_size, encrypted=False)
        dk = None
    return container.create_container(path, header), dk


ENGINE = {"name": "compiled"}


@pytest.fixture(autouse=True, params=["compiled", "reference"])
def engine(request):
    """Run the test on each request path (open_backend uses it)."""
    ENGINE["name"] = request.param
    yield request.param
    ENGINE["name"] = "compiled"


def open_backend(path: Path, dk: bytes | None, *, read_only=False, discard=False):
    b = DiskBackend(path, Secret(dk) if dk is not None else None,
                    read_only=read_only, discard=discard, engine=ENGINE["name"])
    assert b.engine_name == ("compiled" if ENGINE["name"] == "compiled" else "python")
    return b


def read_all(b: DiskBackend, count: int | None = None, offset: int = 0) -> bytearray:
    buf = bytearray(b.size_bytes - offset if count is None else count)
    b.pread_into(buf, offset)
    return buf


def stored(path: Path, header, offset: int, length: int) -> bytes:
    """Raw bytes of the data area as stored in the file."""
    with open(path, "rb") as f:
        f.seek(header.data_offset + offset)
        return f.read(length)


def pyca_xts(dk: bytes, sector_size: int, sector_no: int, data: bytes, encrypt: bool) -> bytes:
    """Independent dm-crypt plain64 reference: tweak = 512-byte sector number."""
    tweak = (sector_no * (sector_size // 512)).to_bytes(16, "little")
    c = Cipher(algorithms.AES(dk), modes.XTS(tweak))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(params=[(ss, enc) for ss in SECTOR_SIZES for enc in (True, False)],
                ids=lambda p: f"{p[0]}-{'enc' if p[1] else 'plain'}")
def disk(request, tmp_path):
    ss, enc = request.param
    path = tmp_path / "disk.bcd"
    header, dk = make_container(path, 1 * MiB, ss, enc)
    return path, header, dk


# -- basic semantics -------------------------------------------------------------------

def test_fresh_disk_reads_zeros_and_is_sparse(disk):
    path, header, dk = disk
    with open_backend(path, dk) as b:
        assert b.size_bytes == header.size_bytes and b.sector_size == header.sector_size
        assert read_all(b) == bytes(header.size_bytes)
        assert read_all(b, 1000, 12345) == bytes(1000)   # unaligned too
    assert allocated_bytes(path) < header.data_offset + 64 * KiB


def test_random_unaligned_io_matches_shadow(disk):
    """Thousands of random reads/writes/zeros/trims at any offset and length."""
    path, header, dk = disk
    size = header.size_bytes
    shadow = bytearray(size)
    rnd = random.Random(4242)
    with open_backend(path, dk, discard=True) as b:
        for _ in range(1500):
            offset = rnd.randrange(size)
            count = rnd.randrange(0, min(size - offset, 3 * header.sector_size + 100) + 1)
            op = rnd.random()
            if op < 0.45:
                data = rnd.randbytes(count)
                b.pwrite(data, offset, fua=rnd.random() < 0.1)
                shadow[offset:offset + count] = data
            elif op < 0.6:
                b.zero(count, offset, may_trim=rnd.random() < 0.5, fua=False)
                shadow[offset:offset + count] = bytes(count)
            elif op < 0.65:
                b.trim(count, offset, fua=False)
                shadow[offset:offset + count] = bytes(count)
            else:
                assert read_all(b, count, offset) == shadow[offset:offset + count]
        assert read_all(b) == shadow
    with open_backend(path, dk, read_only=True) as b:      # persisted, reopened
        assert read_all(b) == shadow


def test_large_request_spanning_chunks(tmp_path):
    """A request larger than the encrypt-and-write chunk, unaligned at both ends."""
    path = tmp_path / "big.bcd"
    header, dk = make_container(path, 16 * MiB, 4096, True)
    data = os.urandom(9 * MiB + 1000)
    with open_backend(path, dk) as b:
        b.pwrite(data, 777, fua=False)
        assert read_all(b, len(data), 777) == data
        assert read_all(b, 777) == bytes(777)
        tail = 777 + len(data)
        assert read_all(b, b.size_bytes - tail, tail) == bytes(b.size_bytes - tail)


# -- what is stored -----------------------------------------------------------------

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_ciphertext_on_disk_is_xts_at_the_sector_tweak(tmp_path, sector_size):
    """F-30, F-31: Sector i is stored at data_offset + i*ss, encrypted with plain64 tweak i*(ss/512)."""
    path = tmp_path / "c.bcd"
    header, dk = make_container(path, 1 * MiB, sector_size, True)
    sector_no = 37
    plain = os.urandom(3 * sector_size)
    with open_backend(path, dk) as b:
        b.pwrite(plain, sector_no * sector_size, fua=True)
    raw = stored(path, header, sector_no * sector_size, len(plain))
    assert raw != plain
    cipher = XtsCipher(Secret(dk), sector_size)
    assert raw == bytes(cipher.encrypt(plain, sector_no))
    for i in range(3):
        piece = slice(i * sector_size, (i + 1) * sector_size)
        assert pyca_xts(dk, sector_size, sector_no + i, raw[piece], encrypt=False) == plain[piece]
    # No 16-byte block of the plaintext appears in the file.
    whole = path.read_bytes()
    assert all(plain[k:k + 16] not in whole for k in range(0, len(plain), 16))


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_unencrypted_disk_stores_plaintext_at_data_offset(tmp_path, sector_size):
    """F-34: an unencrypted data area holds the plaintext at the same offsets."""
    path = tmp_path / "p.bcd"
    header, _ = make_container(path, 1 * MiB, sector_size, False)
    data = os.urandom(5000)
    with open_backend(path, None) as b:
        b.pwrite(data, 1234, fua=False)
    assert stored(path, header, 1234, len(data)) == data


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_zero_sector_rule(tmp_path, sector_size):
    """F-32, F-33: A stored all-zero sector reads as zeros; any other stored bytes are decrypted."""
    path = tmp_path / "z.bcd"
    header, dk = make_container(path, 1 * MiB, sector_size, True)
    ss = sector_size
    with open_backend(path, dk) as b:
        b.pwrite(os.urandom(4 * ss), 0, fua=False)
        # Plaintext zeros are stored encrypted: nothing shows they are zeros.
        b.pwrite(bytes(ss), 8 * ss, fua=False)
        assert stored(path, header, 8 * ss, ss) != bytes(ss)
        assert read_all(b, ss, 8 * ss) == bytes(ss)
        # Overwrite stored sector 1 with zero bytes, sector 2 with non-zero garbage.
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(ss), header.data_offset + 1 * ss)
            garbage = b"\x01" + bytes(ss - 1)
            os.pwrite(fd, garbage, header.data_offset + 2 * ss)
        finally:
            os.close(fd)
        got = read_all(b, 4 * ss)
        assert got[ss:2 * ss] == bytes(ss)
        assert got[2 * ss:3 * ss] == pyca_xts(dk, ss, 2, garbage, encrypt=False)
        assert got[2 * ss:3 * ss] != bytes(ss)


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_zero_sector_rule_looks_past_a_zero_head(tmp_path, sector_size):
    """Reads test only the first bytes of each stored sector for speed; a stored
    sector that starts with zero bytes but is not all zero must still be
    decrypted, in single-sector reads and in short and long multi-sector
    reads, next to holes and ordinary ciphertext."""
    ss = sector_size
    n_sectors = 160                           # longer than the short-read fast test
    path = tmp_path / "zh.bcd"
    header, dk = make_container(path, n_sectors * ss, ss, True)
    rng = random.Random(ss)
    expected = bytearray(n_sectors * ss)
    with open_backend(path, dk) as b:
        written = os.urandom(n_sectors * ss)
        b.pwrite(written, 0, fua=False)
        expected[:] = written
        fd = os.open(path, os.O_WRONLY)
        try:
            for sector_no in rng.sample(range(n_sectors), 40):
                kind = rng.choice(["head8", "head16", "last", "hole"])
                raw = bytearray(os.urandom(ss))
                if kind == "hole":
                    raw = bytearray(ss)
                elif kind == "last":                 # only the very last byte set
                    raw = bytearray(ss)
                    raw[-1] = 0x5A
                else:
                    raw[:8 if kind == "head8" else 16] = bytes(8 if kind == "head8" else 16)
                os.pwrite(fd, raw, header.data_offset + sector_no * ss)
                expected[sector_no * ss:(sector_no + 1) * ss] = (
                    bytes(ss) if kind == "hole"
                    else pyca_xts(dk, ss, sector_no, bytes(raw), encrypt=False))
        finally:
            os.close(fd)
        for sector_no in range(n_sectors):             # one sector at a time
            assert read_all(b, ss, sector_no * ss) == expected[sector_no * ss:
                                                               (sector_no + 1) * ss]
        for _ in range(60):                            # runs of whole sectors
            first = rng.randrange(n_sectors)
            count = rng.randint(1, n_sectors - first)
            assert read_all(b, count * ss, first * ss) == \
                expected[first * ss:(first + count) * ss], (first, count)
        assert read_all(b) == expected


def test_reads_past_end_of_a_short_file_are_zeros(tmp_path):
    """If the file is shorter than the data area (truncated while served), the
    missing part reads as zeros, never as stale buffer contents."""
    path = tmp_path / "s.bcd"
    header, dk = make_container(path, 64 * KiB, 4096, True)
    with open_backend(path, dk) as b:
        b.pwrite(os.urandom(64 * KiB), 0, fua=False)
        os.truncate(path, header.data_offset + 8 * KiB + 100)   # mid-sector
        buf = bytearray(b"\xee" * (64 * KiB))
        b.pread_into(buf, 0)
        assert buf[12 * KiB:] == bytes(52 * KiB)
        # the cut sector decrypts from its 100 stored bytes followed by zeros
        cut = stored(path, header, 8 * KiB, 100) + bytes(4096 - 100)
        assert buf[8 * KiB:12 * KiB] == pyca_xts(dk, 4096, 2, cut, encrypt=False)


# -- zero, trim, discard --------------------------------------------------------------

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_zero_without_discard_writes_encrypted_zeros(tmp_path, sector_size):
    """F-33: without discard, zeroing stores encrypted zeros (no holes reveal unused ranges)."""
    path = tmp_path / "z.bcd"
    header, dk = make_container(path, 1 * MiB, sector_size, True)
    data = os.urandom(256 * KiB)
    with open_backend(path, dk, discard=False) as b:
        b.pwrite(data, 0, fua=False)
        before = allocated_bytes(path)
        b.zero(100 * KiB + 3, 10 * KiB + 5, may_trim=True, fua=True)
        expect = bytearray(data)
        expect[10 * KiB + 5:110 * KiB + 8] = bytes(100 * KiB + 3)
        assert read_all(b, len(data)) == expect
        assert b.zero_is_fast(True) is False
    assert allocated_bytes(path) >= before                     # nothing deallocated
    raw = stored(path, header, 16 * KiB, 64 * KiB)
    assert raw.count(0) < len(raw) // 100                      # ciphertext, not zeros


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_zero_with_discard_punches_whole_sectors(tmp_path, sector_size):
    path = tmp_path / "z.bcd"
    header, dk = make_container(path, 1 * MiB, sector_size, True)
    data = os.urandom(512 * KiB)
    with open_backend(path, dk, discard=True) as b:
        b.pwrite(data, 0, fua=True)
        before = allocated_bytes(path)
        start, count = 64 * KiB + 7, 256 * KiB
        b.zero(count, start, may_trim=True, fua=False)
        expect = bytearray(data)
        expect[start:start + count] = bytes(count)
        assert read_all(b, len(data)) == expect
        assert allocated_bytes(path) <= before - 200 * KiB
        holes = [e for e in b.extents(len(data), 0) if e[2]]
        assert any(o <= 72 * KiB and o + n >= 300 * KiB for o, n, _ in holes)
        # may_trim=False still writes (encrypted) zeros rather than punching.
        b.zero(64 * KiB, 0, may_trim=False, fua=False)
        assert read_all(b, 64 * KiB) == bytes(64 * KiB)
        assert stored(path, header, 0, 64 * KiB).count(0) < 64 * KiB // 100
        assert b.zero_is_fast(True) and not b.zero_is_fast(False)


@pytest.mark.parametrize("encrypted", [True, False])
def test_trim_deallocates_only_with_discard(tmp_path, encrypted):
    path = tmp_path / "t.bcd"
    header, dk = make_container(path, 1 * MiB, 4096, encrypted)
    data = os.urandom(256 * KiB)
    with open_backend(path, dk, discard=False) as b:
        b.pwrite(data, 0, fua=True)
        b.trim(128 * KiB, 0, fua=False)                        # no-op without discard
        assert read_all(b, len(data)) == data
    with open_backend(path, dk, discard=True) as b:
        before = allocated_bytes(path)
        b.trim(128 * KiB + 10, 100, fua=True)
        expect = bytearray(data)
        expect[100:128 * KiB + 110] = bytes(128 * KiB + 10)
        assert read_all(b, len(data)) == expect
        assert allocated_bytes(path) <= before - 120 * KiB


def test_unencrypted_zero_without_discard_keeps_allocation(tmp_path):
    path = tmp_path / "u.bcd"
    header, _ = make_container(path, 1 * MiB, 512, False)
    with open_backend(path, None, discard=False) as b:
        b.pwrite(os.urandom(128 * KiB), 0, fua=False)
        before = allocated_bytes(path)
        b.zero(100 * KiB, 3, may_trim=True, fua=False)
        assert read_all(b, 100 * KiB, 3) == bytes(100 * KiB)
    assert allocated_bytes(path) >= before
    assert stored(path, header, 3, 100 * KiB) == bytes(100 * KiB)


def test_extents_report_holes_and_data(tmp_path):
    path = tmp_path / "e.bcd"
    header, dk = make_container(path, 4 * MiB, 4096, True)
    with open_backend(path, dk) as b:
        assert b.extents(b.size_bytes, 0) == [(0, b.size_bytes, True)]
        b.pwrite(os.urandom(8 * KiB), 1 * MiB, fua=False)
        ext = b.extents(b.size_bytes, 0)
        # contiguous, starting at the offset, covering the range
        assert ext[0][0] == 0
        assert all(a[0] + a[1] == c[0] for a, c in zip(ext, ext[1:]))
        assert ext[-1][0] + ext[-1][1] == b.size_bytes
        data = [(o, n) for o, n, hole in ext if not hole]
        assert any(o <= 1 * MiB and o + n >= 1 * MiB + 8 * KiB for o, n in data)
        assert sum(n for o, n in data) < 1 * MiB
        # a sub-range starts at its offset
        sub = b.extents(100 * KiB, 1 * MiB - 50 * KiB)
        assert sub[0] == (1 * MiB - 50 * KiB, sub[0][1], True)
        assert sum(n for _, n, _ in sub) == 100 * KiB


# -- refusals and errors ---------------------------------------------------------------

def test_key_presence_must_match_the_container(tmp_path):
    enc_path, plain_path = tmp_path / "e.bcd", tmp_path / "p.bcd"
    _, dk = make_container(enc_path, 1 * MiB, 4096, True)
    make_container(plain_path, 1 * MiB, 4096, False)
    with pytest.raises(errors.InvalidKeyMaterial, match="encrypted and no data key"):
        DiskBackend(enc_path, None, read_only=False, discard=False)
    with pytest.raises(errors.InvalidKeyMaterial, match="not encrypted"):
        DiskBackend(plain_path, Secret(dk), read_only=False, discard=False)
    with pytest.raises(errors.InvalidKeyMaterial):                 # halves equal
        DiskBackend(enc_path, Secret(bytes(32) * 2), read_only=False, discard=False)


def test_read_only_refuses_writes_with_erofs(disk):
    path, header, dk = disk
    with open_backend(path, dk) as b:
        b.pwrite(b"keep", 0, fua=False)
    before = path.read_bytes()
    with open_backend(path, dk, read_only=True, discard=True) as b:
        for call in (lambda: b.pwrite(b"x", 0, fua=False),
                     lambda: b.zero(512, 0, may_trim=True, fua=False),
                     lambda: b.trim(512, 0, fua=False)):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EROFS
            assert errno_for(exc.value) == errno.EROFS
        assert read_all(b, 4) == b"keep"
        b.flush()
    assert path.read_bytes() == before


def test_out_of_range_requests_are_einval(disk):
    path, header, dk = disk
    size = header.size_bytes
    with open_backend(path, dk) as b:
        calls = [lambda: b.pread_into(bytearray(2), size - 1),
                 lambda: b.pread_into(bytearray(1), size),
                 lambda: b.pread_into(bytearray(1), -1),
                 lambda: b.pwrite(b"ab", size - 1, fua=False),
                 lambda: b.pwrite(b"a", 2**63, fua=False),
                 lambda: b.zero(size + 1, 0, may_trim=False, fua=False),
                 lambda: b.trim(10, size, fua=False),
                 lambda: b.extents(1, size)]
        for call in calls:
            with pytest.raises(OSError) as exc:
                call()
            assert errno_for(exc.value) == errno.EINVAL
        assert read_all(b) == bytes(size)


def test_errno_mapping():
    for e in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        assert errno_for(OSError(e, os.strerror(e))) == errno.ENOSPC
    for e in (errno.EROFS, errno.EINVAL):
        assert errno_for(OSError(e, os.strerror(e))) == e
    for e in (errno.EIO, errno.EBADF, errno.ENXIO, errno.EPERM, errno.EACCES):
        assert errno_for(OSError(e, os.strerror(e))) == errno.EIO
    assert errno_for(errors.NoSpace(path="x")) == errno.ENOSPC
    assert errno_for(errors.InvalidInput(detail="x")) == errno.EINVAL
    assert errno_for(errors.StorageError(path="x", reason="y")) == errno.EIO
    assert errno_for(ValueError("bug")) == errno.EIO


_EFBIG_CHILD = r"""
import errno, os, resource, signal, sys
from blockcrypt.nbd.backend import DiskBackend, errno_for
from blockcrypt.crypto.secret import Secret
path, dk_hex, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
b = DiskBackend(path, Secret(bytes.fromhex(dk_hex)), read_only=False, discard=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
b.pwrite(b"x" * 4096, 0, fua=False)            # below the limit: fine
try:
    b.pwrite(b"y" * 8192, limit - (1 << 20) + 4096 - 100, fua=False)
except OSError as e:
    print(errno.errorcode[e.errno], errno.errorcode[errno_for(e)])
"""


def test_real_file_size_limit_maps_to_enospc(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE, in a child process) reaches
    the client as ENOSPC."""
    path = tmp_path / "f.bcd"
    header, dk = make_container(path, 1 * MiB, 4096, True)
    limit = header.data_offset + 512 * KiB
    cp = subprocess.run([sys.executable, "-c", _EFBIG_CHILD, str(path), dk.hex(), str(limit)],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["EFBIG", "ENOSPC"]
    assert dk.hex() not in cp.stdout + cp.stderr


# -- keys, locking, lifecycle ----------------------------------------------------------

def test_caller_may_wipe_its_key_and_close_wipes_the_cipher(tmp_path):
    path = tmp_path / "k.bcd"
    _, dk = make_container(path, 1 * MiB, 4096, True)
    secret = Secret(dk)
    b = DiskBackend(path, secret, read_only=False, discard=False)
    secret.wipe()                                # the backend keeps its own copy
    b.pwrite(b"still works", 5000, fua=False)
    assert read_all(b, 11, 5000) == b"still works"
    cipher = b._cipher
    b.close()
    b.close()                                    # idempotent
    with pytest.raises(errors.StateError):       # the cipher's key is gone
        cipher.encrypt(bytes(4096), 0)


def test_one_writer_per_container(tmp_path):
    path = tmp_path / "l.bcd"
    _, dk = make_container(path, 1 * MiB, 4096, True)
    with open_backend(path, dk):
        with pytest.raises(errors.StateError, match="in use"):
            open_backend(path, dk)
        with pytest.raises(errors.StateError):
            open_backend(path, dk, read_only=True)
    with open_backend(path, dk, read_only=True), open_backend(path, dk, read_only=True):
        with pytest.raises(errors.StateError):
            open_backend(path, dk)
    with open_backend(path, dk):                 # released on close
        pass


def test_fua_and_flush_reach_fdatasync(tmp_path, monkeypatch):
    """fua=True syncs before returning; fua=False leaves it to flush()."""
    path = tmp_path / "d.bcd"
    _, dk = make_container(path, 1 * MiB, 4096, True)
    synced: list[int] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
    with open_backend(path, dk, discard=True) as b:
        fd = b.volume.fd
        b.pwrite(b"a" * 100, 10, fua=False)
        b.zero(4096, 0, may_trim=True, fua=False)
        assert synced == []
        b.pwrite(b"a" * 100, 10, fua=True)
        assert synced == [fd]
        b.zero(8192, 100, may_trim=False, fua=True)
        b.trim(8192, 0, fua=True)
        assert synced == [fd] * 3
        b.flush()
        assert synced == [fd] * 4


# -- concurrency ---------------------------------------------------------------------

@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_disjoint_writes_within_one_sector_all_survive(tmp_path, sector_size):
    """Many threads each write their own unaligned slice of the same sectors:
    every slice survives (the read-modify-writes do not lose each other)."""
    path = tmp_path / "c.bcd"
    _, dk = make_container(path, 1 * MiB, sector_size, True)
    n_threads, piece = 8, sector_size // 8 - 3
    expect = bytearray(4 * sector_size)
    with open_backend(path, dk) as b:
        for round_no in range(20):
            barrier = threading.Barrier(n_threads)
            jobs = []
            for t in range(n_threads):
                offset = sector_size + t * (sector_size // 8) + round_no % 3
                data = bytes([(round_no * n_threads + t) % 255 + 1]) * piece
                expect[offset:offset + piece] = data
                jobs.append((offset, data))

            def worker(offset, data):
                barrier.wait()
                b.pwrite(data, offset, fua=False)

            threads = [threading.Thread(target=worker, args=j) for j in jobs]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert read_all(b, len(expect)) == expect, f"round {round_no}"


def test_overlapping_concurrent_writes_equal_some_serial_order(tmp_path):
    """Four threads write overlapping unaligned ranges at once; the result is
    exactly what one of the 24 serial orders produces (no torn mixture)."""
    path = tmp_path / "o.bcd"
    ss = 512
    _, dk = make_container(path, 1 * MiB, ss, True)
    rnd = random.Random(7)
    span = 6 * ss
    with open_backend(path, dk) as b:
        for round_no in range(40):
            base = bytearray(rnd.randbytes(span))
            b.pwrite(base, 0, fua=False)
            writes = []
            for t in range(4):
                offset = rnd.randrange(0, 2 * ss)
                length = rnd.randrange(ss, span - offset)
                writes.append((offset, bytes([t + 1]) * length))
            barrier = threading.Barrier(len(writes))

            def worker(offset, data):
                barrier.wait()
                b.pwrite(data, offset, fua=False)

            threads = [threading.Thread(target=worker, args=w) for w in writes]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            got = read_all(b, span)
            outcomes = []
            for order in itertools.permutations(writes):
                expect = bytearray(base)
                for offset, data in order:
                    expect[offset:offset + len(data)] = data
                outcomes.append(expect)
            assert got in outcomes, f"round {round_no}: not any serial order"


@pytest.mark.parametrize("sector_size", SECTOR_SIZES)
def test_scratch_buffers_are_reused_not_made_per_request(tmp_path, sector_size):
    """Encrypted writes borrow scratch buffers from a pool: short-lived threads
    one after the other (as nbdkit's callbacks look to Python) reuse one
    buffer; a burst of concurrent writes keeps at most MAX_IDLE_SCRATCH; every
    write lands intact whatever buffer it used.  (The Python path's pool; the
    compiled path keeps one scratch buffer per thread, freed with the thread:
    tests/e2e/test_memory.py bounds nbdkit's memory under load.)"""
    from blockcrypt.nbd import sectors as backend
    path = tmp_path / "s.bcd"
    _, dk = make_container(path, 4 * MiB, sector_size, True)
    rng = random.Random(sector_size)
    expect = bytearray(4 * MiB)
    ENGINE["name"] = "reference"
    with open_backend(path, dk) as b:
        pool = b._sectors
        for i in range(50):
            size = rng.choice([sector_size, 4 * KiB, 64 * KiB, 64 * KiB + sector_size,
                               backend.CHUNK_BYTES + 2 * sector_size])
            offset = rng.randrange(0, (4 * MiB - size) // sector_size) * sector_size
            data = os.urandom(size)
            expect[offset:offset + size] = data
            th = threading.Thread(target=b.pwrite, args=(data, offset, False))
            th.start()
            th.join()
        assert len(pool._idle_scratch) == 1
        assert read_all(b) == expect

        n_threads = backend.MAX_IDLE_SCRATCH + 8
        barrier = threading.Barrier(n_threads)
        region = 4 * MiB // n_threads // sector_size * sector_size

        def writer(t):
            data = os.urandom(region)
            expect[t * region:(t + 1) * region] = data
            barrier.wait()
            for pos in range(0, region, 8 * KiB):           # many small writes each
                b.pwrite(data[pos:pos + 8 * KiB], t * region + pos, fua=False)

        threads = [threading.Thread(target=writer, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert 1 <= len(pool._idle_scratch) <= backend.MAX_IDLE_SCRATCH
        assert read_all(b) == expect
    assert pool._idle_scratch == []                              # close() unmapped them


@pytest.mark.parametrize("sector_size,sector_no", [(512, 2**32 + 5), (512, 2**32 - 1),
                                                   (4096, 2**29 + 3)])
def test_tweaks_above_2_32_on_a_large_sparse_disk(tmp_path, sector_size, sector_no):
    """A 3 TiB sparse disk: sectors whose plain64 tweak (sector * ss/512) is at or
    above 2^32 are stored as XTS under that full 64-bit tweak (pyca decrypts the
    file's bytes), read back right, and partial writes there read-modify-write."""
    path = tmp_path / "big.bcd"
    header, dk = make_container(path, 3 << 40, sector_size, True)
    data = os.urandom(3 * sector_size)
    offset = sector_no * sector_size
    with open_backend(path, dk) as b:
        b.pwrite(data, offset, fua=False)
        assert read_all(b, len(data), offset) == data
        b.pwrite(b"patch", offset + sector_size + 100, fua=False)   # read-modify-write
        expect = bytearray(data)
        expect[sector_size + 100:sector_size + 105] = b"patch"
        assert read_all(b, len(data) + 10, offset - 5) == bytes(5) + expect + bytes(5)
    raw = stored(path, header, offset, len(data))
    for i in range(3):
        piece = slice(i * sector_size, (i + 1) * sector_size)
        assert pyca_xts(dk, sector_size, sector_no + i, raw[piece], encrypt=False) \
            == expect[piece]
    assert (sector_no + 2) * (sector_size // 512) >= 2**32 - 1


def test_compiled_requests_release_the_gil(tmp_path):
    """While the compiled path encrypts and writes (or reads and decrypts), other
    Python threads run: a counting thread advances during the C calls.  With
    the GIL held for a call it could not advance at all during that call."""
    if ENGINE["name"] != "compiled":
        return                                     # a property of the compiled path only
    import time
    path = tmp_path / "g.bcd"
    _, dk = make_container(path, 64 * MiB, 512, True)
    data = os.urandom(32 * MiB)
    counter, stop = [0], threading.Event()

    def count():
        while not stop.is_set():
            counter[0] += 1

    with open_backend(path, dk) as b:
        buf = bytearray(len(data))
        th = threading.Thread(target=count)
        th.start()
        try:
            gains, deadline = [], time.monotonic() + 30
            while len(gains) < 6 and time.monotonic() < deadline:
                before = counter[0]
                b.pwrite(data, 0, fua=False) if len(gains) % 2 == 0 else b.pread_into(buf, 0)
                gains.append(counter[0] - before)
        finally:
            stop.set()
            th.join()
        assert buf == data
    # every call let the other thread run (each is a 32 MiB XTS pass: milliseconds)
    assert len(gains) == 6 and min(gains) > 0, gains


def test_close_waits_for_running_requests(tmp_path, engine):
    """backend.close() while threads read and write: every request either
    completes correctly or fails cleanly (OSError / the closed-disk error);
    close waits for the running ones before the key is wiped."""
    path = tmp_path / "c.bcd"
    _, dk = make_container(path, 8 * MiB, 4096, True)
    b = open_backend(path, dk)
    data = os.urandom(256 * KiB)
    b.pwrite(data, 0, fua=False)
    outcomes, started = [], threading.Barrier(5)

    def worker(t):
        started.wait()
        buf = bytearray(len(data))
        for _ in range(200):
            try:
                if t % 2:
                    b.pwrite(data, (t + 1) * MiB, fua=False)
                else:
                    b.pread_into(buf, 0)
                    if buf != data:
                        outcomes.append("WRONG")
                outcomes.append("ok")
            except (OSError, RuntimeError, errors.BlockcryptError):
                outcomes.append("closed")
                return

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    started.wait()
    b.close()
    for th in threads:
        th.join()
    assert "WRONG" not in outcomes and outcomes.count("closed") <= 4


def test_the_compiled_path_is_one_c_call_per_request(tmp_path, engine):
    """With the compiled path, pread_into IS the extension's Disk.pread (no
    Python frame between the plugin and C), and writes and zeroes go to the
    same Disk; the reference path has no Disk."""
    path = tmp_path / "p.bcd"
    _, dk = make_container(path, 1 * MiB, 4096, True)
    with open_backend(path, dk) as b:
        if engine == "compiled":
            assert type(b.pread_into).__name__ == "builtin_function_or_method"
            assert b.pread_into.__self__ is b._disk
            assert b._write.__self__ is b._disk and b._zero.__self__ is b._disk
        else:
            assert b._disk is None
