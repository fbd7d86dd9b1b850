"""blockcrypt.storage.fastcopy: thin, exact copies (sparse copy on ext4, reflink on XFS)."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from blockcrypt import errors
from blockcrypt.storage import fastcopy

from support.prereq import require

MiB = 1024 * 1024
GiB = 1024 * MiB


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _make_sparse(path: Path, size_bytes: int, pieces: list[tuple[int, int]]) -> None:
    """A sparse file of size_bytes with random data at each (offset, length)."""
    with open(path, "wb") as f:
        f.truncate(size_bytes)
        for offset, length in pieces:
            f.seek(offset)
            f.write(os.urandom(length))


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


# 10 MiB of data in a 1 GiB file, in pieces at awkward places: the start, the
# middle, a run ending exactly at the end of the file.
PIECES = [(0, 3 * MiB), (300 * MiB + 4096, 5 * MiB), (GiB - 2 * MiB, 2 * MiB)]


def test_sparse_copy_keeps_holes_and_content(tmp_path, monkeypatch):
    monkeypatch.setattr(fastcopy, "_disable_reflink", True)
    src, dst = tmp_path / "src", tmp_path / "dst"
    _make_sparse(src, GiB, PIECES)
    method = fastcopy.copy_file(src, dst)
    assert method == fastcopy.SPARSE
    assert os.path.getsize(dst) == GiB
    assert _sha256(dst) == _sha256(src)
    data_bytes = sum(length for _, length in PIECES)
    # ~10 MiB allocated (file-system metadata and block rounding allowed), not 1 GiB.
    assert data_bytes <= _allocated(dst) <= data_bytes + 2 * MiB
    assert list(fastcopy.data_ranges(os.open(dst, os.O_RDONLY), GiB))  # has data
    assert os.stat(dst).st_mode & 0o777 == 0o600


def test_hole_at_end_and_empty_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fastcopy, "_disable_reflink", True)
    src = tmp_path / "src"
    _make_sparse(src, 64 * MiB, [(4096, 8192)])  # trailing 64 MiB hole
    fastcopy.copy_file(src, tmp_path / "dst")
    assert os.path.getsize(tmp_path / "dst") == 64 * MiB
    assert _sha256(tmp_path / "dst") == _sha256(src)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    fastcopy.copy_file(empty, tmp_path / "empty2")
    assert (tmp_path / "empty2").read_bytes() == b""


def test_pread_fallback_when_copy_file_range_refused(tmp_path, monkeypatch):
    """Kernels / file systems that refuse copy_file_range still copy exactly."""
    monkeypatch.setattr(fastcopy, "_disable_reflink", True)

    def refuse(*_a, **_k):
        raise OSError(fastcopy.errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(fastcopy.os, "copy_file_range", refuse)
    src = tmp_path / "src"
    _make_sparse(src, 32 * MiB, [(MiB, 5 * MiB + 123)])
    fastcopy.copy_file(src, tmp_path / "dst")
    assert _sha256(tmp_path / "dst") == _sha256(src)
    assert _allocated(tmp_path / "dst") <= 8 * MiB


def test_default_on_ext4_falls_back_to_sparse(tmp_path):
    """ext4 has no FICLONE: the fallback is chosen and the copy is still thin."""
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True,
                            text=True).stdout.strip()
    # A prerequisite like any other: CI's /tmp is ext4, so there it always runs.
    require(fstype in ("ext2/ext3", "tmpfs"),
            f"{tmp_path} is on {fstype}, not a file system without reflink")
    src = tmp_path / "src"
    _make_sparse(src, 256 * MiB, [(0, MiB)])
    assert fastcopy.copy_file(src, tmp_path / "dst") == fastcopy.SPARSE
    assert _allocated(tmp_path / "dst") <= 2 * MiB


def test_range_copy_shifts_data_and_keeps_holes(tmp_path):
    """A source range (a container's data area) copied to offset 0 of a new file."""
    src = tmp_path / "src"
    header_bytes, area = MiB, 96 * MiB
    _make_sparse(src, header_bytes + area, [(0, 4096), (header_bytes + 5 * MiB, 3 * MiB),
                                            (header_bytes + area - 4096, 4096)])
    dst = tmp_path / "raw"
    assert fastcopy.copy_file(src, dst, src_offset=header_bytes, length=area) == fastcopy.SPARSE
    assert os.path.getsize(dst) == area
    with open(src, "rb") as f:
        f.seek(header_bytes)
        expected = f.read(area)
    assert dst.read_bytes() == expected
    assert _allocated(dst) <= 4 * MiB + 64 * 1024


def test_destination_is_never_replaced(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(errors.AlreadyExists):
        fastcopy.copy_file(src, dst)
    assert dst.read_bytes() == b"old"
    with pytest.raises(errors.AlreadyExists):
        fastcopy.copy_to_new(src, dst)
    assert dst.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]


def test_failed_copy_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(fastcopy, "_disable_reflink", True)
    src = tmp_path / "src"
    _make_sparse(src, 8 * MiB, [(0, MiB)])

    def enospc(*_a, **_k):
        raise OSError(fastcopy.errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastcopy.os, "copy_file_range", enospc)
    with pytest.raises(errors.NoSpace):
        fastcopy.copy_file(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(errors.NotFound):
        fastcopy.copy_file(tmp_path / "missing", tmp_path / "dst")


@pytest.mark.e2e
@pytest.mark.root
def test_reflink_on_xfs(xfs_reflink_dir):
    src, dst = xfs_reflink_dir / "src", xfs_reflink_dir / "dst"
    _make_sparse(src, 256 * MiB, [(0, MiB), (100 * MiB, 3 * MiB)])
    os.sync()
    method = fastcopy.copy_file(src, dst)
    assert method == fastcopy.REFLINK
    assert _sha256(dst) == _sha256(src)
    # Shared extents: the clone is marked shared (filefrag's "shared" flag).
    out = subprocess.run(["filefrag", "-v", str(dst)], capture_output=True, text=True).stdout
    assert "shared" in out
    # Writing the clone leaves the source untouched (copy on write).
    before = _sha256(src)
    with open(dst, "r+b") as f:
        f.write(b"x" * 4096)
    assert _sha256(src) == before


# -- progress ---------------------------------------------------------------------

@pytest.mark.parametrize("via", ["argument", "reporting"])
def test_sparse_copy_reports_progress_of_the_data_ranges(tmp_path, monkeypatch, via):
    monkeypatch.setattr(fastcopy, "_disable_reflink", True)
    monkeypatch.setattr(fastcopy, "CHUNK_BYTES", MiB)      # several reports per range
    src = tmp_path / "src"
    _make_sparse(src, GiB, PIECES)
    seen: list[tuple[int, int]] = []
    if via == "argument":
        fastcopy.copy_file(src, tmp_path / "dst", progress=lambda d, t: seen.append((d, t)))
    else:
        with fastcopy.reporting(lambda d, t: seen.append((d, t))):
            fastcopy.copy_file(src, tmp_path / "dst")
        fastcopy.copy_file(src, tmp_path / "dst2")            # outside: nothing more
    data_bytes = sum(length for _, length in PIECES)
    totals = {t for _, t in seen}
    assert len(totals) == 1
    total = totals.pop()
    assert data_bytes <= total <= data_bytes + 2 * MiB         # data ranges, not 1 GiB
    done = [d for d, _ in seen]
    assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert len(seen) >= 10                                     # advances chunk by chunk


def test_range_copy_progress_counts_only_the_range(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _make_sparse(src, 64 * MiB, [(0, 2 * MiB), (40 * MiB, 4 * MiB)])
    seen: list[tuple[int, int]] = []
    fastcopy.copy_file(src, tmp_path / "dst", src_offset=32 * MiB, length=32 * MiB,
                       progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (4 * MiB, 4 * MiB)


@pytest.mark.e2e
@pytest.mark.root
def test_reflink_reports_the_whole_length_once_done(xfs_reflink_dir):
    src = xfs_reflink_dir / "src"
    _make_sparse(src, 64 * MiB, [(0, MiB)])
    seen: list[tuple[int, int]] = []
    assert fastcopy.copy_file(src, xfs_reflink_dir / "dst",
                              progress=lambda d, t: seen.append((d, t))) == fastcopy.REFLINK
    assert seen == [(64 * MiB, 64 * MiB)]
