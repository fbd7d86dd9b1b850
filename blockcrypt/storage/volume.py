"""The I/O half of the storage seam: where a disk's bytes live, as the data path
needs them.

:class:`Volume` is what :class:`~blockcrypt.nbd.backend.DiskBackend` serves: a
disk opened read-only or read-write under the server lock, its header, and
byte I/O on the *data area* (offset 0 is the first byte of sector 0, wherever
the store keeps it).  :class:`FileVolume` keeps a disk in a container file
(docs/FORMAT.md); :class:`~blockcrypt.storage.rbd_volume.RbdVolume` keeps one in a
Ceph RBD image and plugs into the backend unchanged.

This module owns opening and locking a disk for serving, and the byte I/O on
its data area.  It never sees keys or plaintext rules (encryption, the
zero-sector rule and sector locking are the backend's), and it does not
create, grow or rewrite headers (:mod:`.container`).
"""
from __future__ import annotations

import abc
import ctypes
import errno
import fcntl
import os
from typing import Self

from .. import errors
from ..system.libc import libc
from . import container

# Zeros are written in chunks of this many bytes (bounded memory per request).
ZERO_CHUNK_BYTES = 1024 * 1024
_ZEROS = bytes(ZERO_CHUNK_BYTES)

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc = libc()
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of fd; the range then reads as zeros."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Volume(abc.ABC):
    """A disk opened for serving: its header and the bytes of its data area.

    Opening a volume (the implementation's constructor) takes the server lock:
    exclusive for read-write, shared for read-only, so two servers never
    write the same disk; a disk already held raises StateError ("in use by
    another server").  :meth:`close` releases it.

    Offsets are data-area offsets.  I/O methods raise ``OSError`` with the errno
    a client should see.  All methods may be called from many threads at once;
    the volume does not order overlapping writes (the backend's sector locks
    do).  The backend binds :meth:`pread_into` and :meth:`pwrite` once and
    calls them on every request, so implementations keep them lean.
    """

    #: How messages name the disk (a file's path).
    name: str
    #: The header the disk was opened with.
    header: container.Header
    read_only: bool

    @abc.abstractmethod
    def pread_into(self, view: memoryview, offset: int) -> None:
        """Fill all of ``view`` from ``offset``; bytes the store does not have
        (past the end of a short file) read as zeros."""

    @abc.abstractmethod
    def pwrite(self, view: memoryview, offset: int) -> None:
        """Write all of ``view`` at ``offset``."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every write that has returned durable."""

    @abc.abstractmethod
    def deallocate(self, offset: int, length: int) -> None:
        """Release the range; it then reads as zeros (zeros may be written
        where the store cannot deallocate)."""

    @abc.abstractmethod
    def extents(self, offset: int, count: int, max_runs: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_hole)`` runs from ``offset``, at most ``max_runs``
        of them, ending at or before ``offset + count``; holes read as zeros."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the server lock and the store (idempotent)."""

    def raw_file(self) -> tuple[int, int] | None:
        """``(fd, data_offset)`` when the data area is a range of a file that
        the compiled data path may pread/pwrite itself (it dups ``fd``), else
        None: then the backend's Python path serves through these methods."""
        return None

    def write_zeros(self, offset: int, length: int) -> None:
        """Store zero bytes over the range (allocated, unlike :meth:`deallocate`)."""
        zeros = memoryview(_ZEROS)
        for pos in range(0, length, ZERO_CHUNK_BYTES):
            self.pwrite(zeros[:min(ZERO_CHUNK_BYTES, length - pos)], offset + pos)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileVolume(Volume):
    """A disk kept in a container file: the data area starts at the header's
    ``data_offset``; the server lock is a whole-file ``flock`` (independent of
    the header-area lock :mod:`.container` takes, so reading the header of a
    served disk never waits for the server).

    One file descriptor (:attr:`fd`) serves every request, so :meth:`flush`
    (``fdatasync``) covers the writes of all connections.  Deallocation punches
    holes (``fallocate``), falling back to writing zeros where the file system
    cannot.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool):
        self.name = os.fspath(path)
        self.read_only = read_only
        self.header = container.read_header(self.name, repair=not read_only)
        self._base = self.header.data_offset
        self._end = self._base + self.header.size_bytes
        self.fd = os.open(self.name, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise errors.StateError(
                detail=f"container {self.name} is in use by another server; "
                       "detach the disk first") from None
        except BaseException:
            os.close(self.fd)
            raise

    def raw_file(self) -> tuple[int, int] | None:
        return (self.fd, self._base) if self.fd >= 0 else None

    def pread_into(self, view: memoryview, offset: int) -> None:
        file_offset = self._base + offset
        got = os.preadv(self.fd, (view,), file_offset)
        if got != len(view):
            self._finish_read(view, file_offset, got)

    def _finish_read(self, view: memoryview, file_offset: int, got: int) -> None:
        """Complete a short read; bytes past the end of the file read as zeros."""
        while got < len(view):
            n = os.preadv(self.fd, (view[got:],), file_offset + got)
            if n == 0:
                view[got:] = bytes(len(view) - got)
                return
            got += n

    def pwrite(self, view: memoryview, offset: int) -> None:
        file_offset = self._base + offset
        done = os.pwrite(self.fd, view, file_offset)
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], file_offset + done)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def deallocate(self, offset: int, length: int) -> None:
        try:
            _punch_hole(self.fd, self._base + offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.write_zeros(offset, length)

    def extents(self, offset: int, count: int, max_runs: int) -> list[tuple[int, int, bool]]:
        """Runs from SEEK_DATA/SEEK_HOLE (a hole reads as zeros)."""
        base = self._base
        pos, end = base + offset, base + offset + count
        out: list[tuple[int, int, bool]] = []
        while pos < end and len(out) < max_runs:
            data = min(self._seek(pos, os.SEEK_DATA), end)
            if data > pos:
                out.append((pos - base, data - pos, True))
                pos = data
                continue
            hole = min(self._seek(pos, os.SEEK_HOLE), end)
            out.append((pos - base, hole - pos, False))
            pos = hole
        return out

    def _seek(self, file_offset: int, whence: int) -> int:
        """lseek for SEEK_DATA/SEEK_HOLE; ENXIO (no more data) means end of file."""
        try:
            return os.lseek(self.fd, file_offset, whence)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return self._end

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"<FileVolume {self.name} read_only={self.read_only} fd={self.fd}>"
