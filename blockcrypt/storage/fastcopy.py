"""Fast, thin copies of container files (snapshots, disks from snapshots, reset).

A copy is taken in the cheapest way the file system allows:

1. ``reflink``: ``ioctl(FICLONE)`` shares the source's extents copy-on-write
   (XFS with ``reflink=1``, btrfs): constant time, no space used until either
   file is written.
2. ``sparse``: the data ranges found with ``SEEK_DATA``/``SEEK_HOLE`` are copied
   with ``os.copy_file_range`` (falling back to ``pread``/``pwrite`` where the
   kernel refuses it), holes are skipped, and the length is set with
   ``ftruncate``, so a 10 GiB disk holding 100 MiB of data copies as about
   100 MiB.

Both read the bytes as stored: an encrypted container is copied as ciphertext,
never decrypted.  The copy is fsynced before it is reported done.  The caller
keeps the source consistent while it is copied (a detached disk is locked; an
attached one is quiesced, see :mod:`blockcrypt.system.quiesce`): a copy of a file that
changes underneath is not a point-in-time image.

:func:`copy_to_new` writes a new file (``O_EXCL``, 0600, removed again on
failure); :func:`copy_file` adds an atomic rename: the destination appears
complete or not at all.

Progress: every copy reports ``(done_bytes, total_bytes)`` to a callback, the
``progress`` argument or else the one installed with :func:`reporting` for the
current context (how the CLI shows progress of snapshot create, disk create
--from-snapshot, snapshot export and disk reset without each service passing it
along).  ``total_bytes`` is what is actually copied: the data ranges (holes are not
counted), or the whole length once for a reflink.

This module owns how bytes get copied; it must not read headers, choose
names or take locks: the caller (:mod:`.file_store`) does.
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from .. import errors
from .home import create_private_file, fsync_dir

# <linux/fs.h>: #define FICLONE _IOW(0x94, 9, int)
FICLONE = 0x40049409

REFLINK = "reflink"
SPARSE = "sparse"

# copy_file_range / pread+pwrite chunk: large enough to amortise syscalls,
# small enough that one call does not hold the CPU for long.
CHUNK_BYTES = 64 * 1024 * 1024
_FALLBACK_CHUNK_BYTES = 4 * 1024 * 1024

# errnos meaning "this file system (pair) cannot do that", not an I/O failure.
_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                errno.EPERM, errno.ETXTBSY}

# Test seam: force the sparse path even where FICLONE works.
_disable_reflink = False

ProgressFn = Callable[[int, int], None]
"""Called with (done_bytes, total_bytes) as a copy advances; must not raise."""

_reporter: contextvars.ContextVar[ProgressFn | None] = contextvars.ContextVar(
    "blockcrypt_copy_progress", default=None)


@contextlib.contextmanager
def reporting(progress: ProgressFn | None) -> Iterator[None]:
    """Within the block, copies that get no ``progress`` argument report to ``progress``."""
    token = _reporter.set(progress)
    try:
        yield
    finally:
        _reporter.reset(token)


def progress_fn(progress: ProgressFn | None = None) -> ProgressFn:
    """``progress`` if given, else the :func:`reporting` one, else a no-op: what a copy
    loop (here or elsewhere) calls with (done_bytes, total_bytes)."""
    chosen = progress if progress is not None else _reporter.get()
    return chosen if chosen is not None else (lambda done_bytes, total_bytes: None)


def try_reflink(src_fd: int, dst_fd: int) -> bool:
    """Clone src into the (empty) dst with FICLONE; False if the file system cannot."""
    if _disable_reflink:
        return False
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def data_ranges(fd: int, end: int, start: int = 0):
    """Yield (offset, length) of every data range of fd within [start, end).

    File systems without hole support report the whole file as data.
    """
    pos = start
    size_bytes = end
    while pos < size_bytes:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:   # no data after pos
                return
            raise
        if start >= size_bytes:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size_bytes)
        yield start, end - start
        pos = end


def copy_range(src_fd: int, dst_fd: int, offset: int, length: int, shift: int,
               advanced: Callable[[int], None] | None = None) -> None:
    """Copy src [offset, offset + length) to dst at offset - shift; ``advanced(n)``
    after each chunk of n bytes, if given."""
    end = offset + length
    pos = offset
    use_cfr = True
    while pos < end:
        n = 0
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, min(CHUNK_BYTES, end - pos), pos,
                                       pos - shift)
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                use_cfr = False
                continue
            if n == 0:       # source shrank under us, or the kernel declined
                use_cfr = False
                continue
        else:
            buf = os.pread(src_fd, min(_FALLBACK_CHUNK_BYTES, end - pos), pos)
            if not buf:
                raise OSError(errno.EIO, f"source ended at offset {pos} while copying")
            view = memoryview(buf)
            written = 0
            while written < len(view):
                written += os.pwrite(dst_fd, view[written:], pos - shift + written)
            n = len(buf)
        pos += n
        if advanced is not None:
            advanced(n)


def sparse_copy(src_fd: int, dst_fd: int, src_offset: int = 0,
                length: int | None = None, progress: ProgressFn | None = None) -> None:
    """Copy src's data ranges within [src_offset, src_offset + length) into the
    empty dst at offset 0, skipping holes, and set dst's length to length.

    length defaults to the rest of the source file.  Progress counts the bytes of
    the data ranges.
    """
    report = progress_fn(progress)
    src_size = os.fstat(src_fd).st_size
    if length is None:
        length = max(0, src_size - src_offset)
    end = min(src_offset + length, src_size)
    ranges = list(data_ranges(src_fd, end, start=src_offset))
    total_bytes = sum(run for _, run in ranges)
    done_bytes = 0
    report(0, total_bytes)

    def advanced(n: int) -> None:
        nonlocal done_bytes
        done_bytes += n
        report(min(done_bytes, total_bytes), total_bytes)

    for offset, run in ranges:
        copy_range(src_fd, dst_fd, offset, run, src_offset, advanced)
    os.ftruncate(dst_fd, length)


def copy_to_new(src: os.PathLike | str | int, dst: os.PathLike | str, *, src_offset: int = 0,
                length: int | None = None, progress: ProgressFn | None = None) -> str:
    """Copy src (or its range [src_offset, src_offset + length)) to a new file dst.

    src is a path or an open file descriptor (left open; the caller may hold a
    lock on it).  dst is created 0600 and never replaces anything.  Returns
    the method, :data:`REFLINK` (whole files only) or :data:`SPARSE`.  dst is
    fsynced (its directory is not: the caller renames it or fsyncs).  ``progress``
    (default: the :func:`reporting` one) follows the copy.  On any
    failure dst is removed.  Raises NotFound, AlreadyExists, NoSpace, StorageError.
    """
    dst = os.fspath(dst)
    if isinstance(src, int):
        src_fd = os.dup(src)      # our own descriptor, closed below; shares src's file
    else:
        try:
            src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:             # ENOENT: NotFound
            raise errors.storage_error(src, exc) from None
    try:
        dst_fd = create_private_file(dst)
        try:
            whole = src_offset == 0 and length is None
            method = REFLINK if whole and try_reflink(src_fd, dst_fd) else SPARSE
            if method == SPARSE:
                sparse_copy(src_fd, dst_fd, src_offset, length, progress)
            else:
                cloned = os.fstat(dst_fd).st_size
                progress_fn(progress)(cloned, cloned)
            os.fsync(dst_fd)
        except BaseException as exc:
            os.close(dst_fd)
            try:
                os.unlink(dst)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise errors.storage_error(dst, exc) from None
            raise
        os.close(dst_fd)
        return method
    finally:
        os.close(src_fd)


def copy_file(src: os.PathLike | str, dst: os.PathLike | str, *, src_offset: int = 0,
              length: int | None = None, progress: ProgressFn | None = None) -> str:
    """Copy src (or a range of it) to dst atomically: dst appears complete or not at all.

    The copy is written under a temporary name in dst's directory, fsynced,
    then linked to dst (link, unlike rename, fails instead of replacing a dst
    that appeared meanwhile) and the directory fsynced.  dst must not exist
    (AlreadyExists).  Returns the method used.
    """
    dst_path = Path(dst)
    if dst_path.exists() or dst_path.is_symlink():
        raise errors.AlreadyExists(what="file", name=str(dst_path))
    tmp = dst_path.with_name(f".{dst_path.name}.{os.getpid()}.tmp")
    method = copy_to_new(src, tmp, src_offset=src_offset, length=length, progress=progress)
    try:
        os.link(tmp, dst_path)
    except FileExistsError:
        raise errors.AlreadyExists(what="file", name=str(dst_path)) from None
    except OSError as exc:
        raise errors.storage_error(dst_path, exc) from None
    finally:
        os.unlink(tmp)
    fsync_dir(dst_path.parent)
    return method
