"""Sector I/O on a disk's data area: what the nbdkit plugin serves.

:class:`DiskBackend` turns byte-range requests (any offset, any length) into
whole-sector reads and writes of a :class:`~blockcrypt.storage.volume.Volume`
(a container file today), encrypting with
:class:`~blockcrypt.crypto.xts.XtsCipher` when the disk is encrypted.  It owns
the request semantics below; where the bytes live, the server lock, hole
punching and durability are the volume's.  Rules it follows (docs/FORMAT.md):

- Sector ``i`` of the virtual disk is stored at data-area offset
  ``i * sector_size`` (file offset ``data_offset + i * sector_size`` in a
  container file) and encrypted with XTS sector index ``i``.
- Zero-sector rule: a stored sector whose bytes are all zero reads as plaintext
  zeros without decryption.  Holes in the sparse file are such sectors, so a new
  disk reads as zeros.  This shows nothing the file's sparseness does not
  already show.  Writing plaintext zeros stores *encrypted* zeros (random-looking
  bytes), so ordinary writes never reveal which sectors hold zeros.
- Partial sectors are read-modify-written.  Writers whose sector ranges
  overlap are serialised (striped sector locks); disjoint requests run in
  parallel, so each write is atomic with respect to every other write.
- Discard: with ``discard=True``, ``trim`` and ``zero(may_trim=True)``
  deallocate whole sectors (punch holes).  Like dm-crypt's ``allow_discards``
  this leaks which ranges of the disk are unused to anyone who can see the
  file's allocation map.  Without it, zeroing writes encrypted zeros and
  ``trim`` does nothing.
- Durability: ``flush`` is the volume's flush (``fdatasync`` of a container
  file); an operation with ``fua=True`` is followed by one before it returns.
  One volume (one file descriptor) is shared by all connections, so a flush
  covers every connection's writes.

Two request paths implement these rules.  The compiled path
(``Disk`` of :mod:`blockcrypt.crypto._datapath`) serves a volume that hands
out its file descriptor (:meth:`~blockcrypt.storage.volume.Volume.raw_file`,
a container file): one C call per request does the range check, pread/pwrite,
XTS, the zero-sector rule, the read-modify-write and the sector locks, with
the GIL released from start to end.  :class:`~.sectors.PythonSectors` serves
any other volume, and is the reference the compiled path is tested against;
it is also the fallback, announced on stderr, when the extension is missing.
Flush, FUA, extents and the choice between them stay here.

Errors are raised as ``OSError`` (with the errno a client should see) or
:class:`~blockcrypt.errors.BlockcryptError`; :func:`errno_for` gives the NBD
errno for either.  No message carries key bytes.
"""
from __future__ import annotations

import errno
import os
from typing import Self

from .. import errors
from ..crypto import compiled
from ..crypto.secret import Secret
from ..crypto.xts import XtsCipher
from ..storage.volume import FileVolume, Volume
from .sectors import PythonSectors

# Largest number of extents returned by one extents() call; nbdkit accepts a
# shorter answer and the client asks again from where it ends.
MAX_EXTENTS = 1024

ENGINES = ("auto", "compiled", "reference")


def errno_for(exc: BaseException) -> int:
    """The errno an NBD client should see for ``exc``.

    ENOSPC also for EDQUOT and EFBIG (the client can only act on "no space");
    EROFS for writes to a read-only disk; EINVAL for requests outside the disk;
    ENOTSUP for a fast zero that cannot be fast; EIO for everything else,
    including bugs: never success.
    """
    if isinstance(exc, OSError) and exc.errno:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return errno.ENOSPC
        if exc.errno in (errno.EROFS, errno.EINVAL, errno.ENOTSUP):
            return exc.errno
        return errno.EIO
    if isinstance(exc, errors.NoSpace):
        return errno.ENOSPC
    if isinstance(exc, errors.InvalidInput):
        return errno.EINVAL
    return errno.EIO


class DiskBackend:
    """Serve the virtual disk kept in one :class:`~blockcrypt.storage.volume.Volume`.

    ``volume`` is an open Volume, or the path of a container file, which is
    opened as a :class:`~blockcrypt.storage.volume.FileVolume` with
    ``read_only`` (required then; with a Volume it may be omitted, and must
    match the volume's if given).  The backend owns the volume from the call
    on: :meth:`close` closes it, and so does a constructor that fails.

    ``dk`` is the plaintext data key for an encrypted disk and must be
    ``None`` for an unencrypted one.  The backend keeps no reference to ``dk``:
    the cipher holds its own copy in locked memory, wiped by :meth:`close`; the
    caller may wipe ``dk`` as soon as the constructor returns.

    ``engine``: "auto" (the compiled path when the extension loads and the
    volume has a file descriptor, else the Python path), "compiled" (required),
    or "reference" (the Python path with the pyca reference cipher, for tests).
    :attr:`engine_name` says which one serves.

    Thread-safe: all methods may be called from many threads at once.
    """

    def __init__(self, volume: Volume | str | os.PathLike, dk: Secret | None, *,
                 read_only: bool | None = None, discard: bool, engine: str = "auto"):
        if not isinstance(volume, Volume):
            if read_only is None:
                raise TypeError("DiskBackend(path, ...) needs read_only=True or False")
            volume = FileVolume(volume, read_only=read_only)
        try:
            if read_only is not None and read_only != volume.read_only:
                raise ValueError(f"read_only={read_only} but {volume!r} is opened "
                                 f"{'read-only' if volume.read_only else 'read-write'}")
            if engine not in ENGINES:
                raise ValueError(f"unknown engine {engine!r}; one of {ENGINES}")
            self._init(volume, dk, discard, engine)
        except BaseException:
            self._release()
            volume.close()
            raise

    def _init(self, volume: Volume, dk: Secret | None, discard: bool, engine: str) -> None:
        self.volume = volume
        self.path = volume.name
        self.read_only = volume.read_only
        self.discard = discard
        header = volume.header
        if header.encrypted and dk is None:
            raise errors.InvalidKeyMaterial(
                reason=f"container {self.path} is encrypted and no data key was given; "
                       "attach it through `blockcrypt disk attach`, which unwraps its key")
        if not header.encrypted and dk is not None:
            raise errors.InvalidKeyMaterial(
                reason=f"container {self.path} is not encrypted but a data key was given; "
                       "serve it without a key")
        self.header = header
        self.size_bytes = header.size_bytes
        self.sector_size = header.sector_size
        self.encrypted = header.encrypted
        self._cow = None        # a snapshot being copied (copy-before-write), see nbd/cow.py
        dp = compiled.datapath() if engine != "reference" else None
        raw = volume.raw_file()
        if engine == "compiled" and (dp is None or raw is None):
            raise errors.EnvironmentProblem(
                detail=f"the compiled data path cannot serve {self.path} ("
                       + (compiled.why_missing() if dp is None else "no file descriptor")
                       + "); reinstall blockcrypt with gcc, python3-dev and libssl-dev")
        if engine == "auto" and dp is None:
            compiled.warn_slow("the data path")
        cipher_engine = "reference" if engine == "reference" or dp is None else "compiled"
        self._cipher = (XtsCipher(dk, self.sector_size, engine=cipher_engine)
                        if dk is not None else None)
        if dp is not None and raw is not None:
            fd, data_offset = raw
            self._disk = dp.Disk(fd, data_offset, self.size_bytes, self.sector_size,
                                 self.read_only, self._cipher.xts if self._cipher else None,
                                 self.path)
            self._wiped_error = dp.WipedError
            self.engine_name = "compiled"
            # One C call per request: these bound methods do the range and
            # read-only checks themselves (the same errors as _check_*).
            self.pread_into = self._disk.pread          # shadows the method below
            self._write, self._zero = self._disk.pwrite, self._disk.zero
        else:
            self._disk = None
            self._sectors = PythonSectors(volume, self._cipher, self.sector_size)
            self.engine_name = "python"
            self._write, self._zero = self._python_write, self._python_zero

    # -- public API -------------------------------------------------------------

    def pread_into(self, buf, offset: int) -> None:
        """Fill ``buf`` (writable, any length) with the plaintext at ``offset``."""
        view = memoryview(buf).cast("B")
        self._check_range(len(view), offset)
        if len(view):
            self._sectors.pread(view, offset)

    def pwrite(self, buf, offset: int, fua: bool) -> None:
        """Write ``buf`` (any length) at ``offset``; durable on return if ``fua``."""
        cow = self._cow
        if cow is not None:
            cow.before_write(self.header.data_offset + offset, len(buf))
        self._write(buf, offset)
        if fua:
            self.volume.flush()

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        """Make ``count`` bytes at ``offset`` read as zeros.

        Whole sectors are deallocated when the disk allows discard and the
        client allows it (``may_trim``), which leaks that the range is unused
        (as dm-crypt allow_discards does); otherwise encrypted zeros are
        written, indistinguishable from other data.
        """
        cow = self._cow
        if cow is not None:
            cow.before_write(self.header.data_offset + offset, count)
        self._zero(offset, count, self.discard and may_trim)
        if fua:
            self.volume.flush()

    def zero_is_fast(self, may_trim: bool) -> bool:
        """Whether :meth:`zero` is cheap (a hole punch) rather than a data write."""
        return self.discard and may_trim

    def trim(self, count: int, offset: int, fua: bool) -> None:
        """Discard the range, if this disk allows discard; otherwise do nothing.

        With discard enabled the range then reads as zeros (whole sectors are
        deallocated, partial ones zeroed).  This leaks which ranges are unused,
        like dm-crypt's allow_discards; that is why discard is opt-in.
        """
        self._check_writable()
        self._check_range(count, offset)
        if self.discard:
            self.zero(count, offset, may_trim=True, fua=fua)

    def source_fd(self) -> int:
        """The container file's descriptor (for a snapshot's background copy)."""
        raw = self.volume.raw_file()
        if raw is None:
            raise OSError(errno.ENOTSUP, f"{self.path} is not a file")
        return raw[0]

    def current_cow(self):
        """The :class:`~blockcrypt.storage.chunkcopy.CowCopy` installed, or None."""
        return self._cow

    def set_cow(self, cow) -> None:
        """Install (or, with None, remove) a :class:`~blockcrypt.storage.chunkcopy.CowCopy` whose
        ``before_write`` runs before every change to the container."""
        self._cow = cow

    def flush(self) -> None:
        """Make every write that has returned durable (fdatasync)."""
        self.volume.flush()

    def extents(self, count: int, offset: int) -> list[tuple[int, int, bool]]:
        """``(offset, length, is_hole)`` runs covering the start of the range.

        Holes (SEEK_HOLE) read as zeros by the zero-sector rule.  The answer
        starts at ``offset`` and may end before ``offset + count`` (at most
        :data:`MAX_EXTENTS` runs).
        """
        self._check_range(count, offset)
        return self.volume.extents(offset, count, MAX_EXTENTS)

    def close(self) -> None:
        """Wait for running requests, wipe the cipher's key and close the volume
        (idempotent)."""
        self._release()
        volume = getattr(self, "volume", None)
        if volume is not None:
            volume.close()

    def _release(self) -> None:
        """Close the compiled disk (waits for its running requests) and wipe the key."""
        disk, self._disk = getattr(self, "_disk", None), None
        if disk is not None:
            disk.close()
        cipher, self._cipher = getattr(self, "_cipher", None), None
        if cipher is not None:
            cipher.wipe()
        sectors = getattr(self, "_sectors", None)
        if sectors is not None:
            sectors.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<DiskBackend {self.path} size_bytes={self.size_bytes} "
                f"sector_size={self.sector_size} encrypted={self.encrypted} "
                f"engine={self.engine_name}>")

    # -- helpers ----------------------------------------------------------------

    def _python_write(self, buf, offset: int) -> None:
        self._check_writable()
        view = memoryview(buf).cast("B")
        self._check_range(len(view), offset)
        if len(view):
            self._sectors.pwrite(view, offset)

    def _python_zero(self, offset: int, count: int, deallocate: bool) -> None:
        self._check_writable()
        self._check_range(count, offset)
        if count:
            self._sectors.zero(offset, count, deallocate)

    def _check_range(self, count: int, offset: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size_bytes:
            raise OSError(errno.EINVAL,
                          f"request of {count} bytes at offset {offset} is outside the "
                          f"{self.size_bytes}-byte disk")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"disk {self.path} is served read-only")
