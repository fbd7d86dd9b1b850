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
  overlap are serialised (:class:`_SectorLocks`); disjoint requests run in
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

Errors are raised as ``OSError`` (with the errno a client should see) or
:class:`~blockcrypt.errors.BlockcryptError`; :func:`errno_for` gives the NBD
errno for either.  No message carries key bytes.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterator
from typing import Self

import numpy as np

from .. import errors
from ..crypto.secret import Secret
from ..crypto.xts import XtsCipher
from ..storage.volume import FileVolume, Volume

# Encrypt-and-write and zero-writing work in chunks of this many bytes, so one
# request never needs more than this much scratch memory.  nbdkit runs up to
# 16 requests at once per connection (nbdcopy opens 4), so the scratch in use
# at once stays within 64 x 1 MiB even for 32 MiB requests; ordinary requests
# (4 KiB to 256 KiB) touch only their first pages of a buffer.
CHUNK_BYTES = 1024 * 1024
_ZEROS = bytes(CHUNK_BYTES)

# Writes up to this size are copied into the scratch buffer and encrypted in
# place there: cheaper than resolving the address of nbdkit's read-only buffer.
SMALL_WRITE_BYTES = 64 * 1024

# Requests up to this size use the cipher's unchecked fast entry point
# (XtsCipher.crypt_at); larger ones, including the 512-byte-sector bulk path,
# go through the checked crypt_in_place.  Below xts.BULK_MIN_SECTORS * 512.
FAST_CRYPT_BYTES = 16 * 1024

# Scratch buffers kept for reuse once their request is done; more than this
# many at once (a burst of concurrent requests) are unmapped when returned.
MAX_IDLE_SCRATCH = 16

_ZERO_WORD = bytes(8)

# Largest number of extents returned by one extents() call; nbdkit accepts a
# shorter answer and the client asks again from where it ends.
MAX_EXTENTS = 1024

_addressof = ctypes.addressof
_char_from_buffer = ctypes.c_char.from_buffer


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


class _SectorLocks:
    """Serialises writers whose sector ranges may overlap; most disjoint ones run in parallel.

    Every write holds the locks of the sector groups it touches (``GROUP``
    consecutive sectors share a group; group ``g`` uses stripe ``g % STRIPES``)
    for its whole duration.  A read-modify-write of a partial sector therefore
    never interleaves with another write of that sector, and the final content
    of the disk after concurrent overlapping writes is that of some serial
    order of them.  Stripes are taken in ascending order, so two writers never
    deadlock.  A small request touches one group: one uncontended
    ``threading.Lock`` (~0.1 us), whatever the number of requests in flight.
    Disjoint requests whose groups share a stripe wait for each other, which
    costs some parallelism but never correctness.
    """

    GROUP = 16
    STRIPES = 64

    def __init__(self) -> None:
        self.stripes = [threading.Lock() for _ in range(self.STRIPES)]

    def stripe_of(self, first_sector: int, end_sector: int) -> threading.Lock | None:
        """The one lock covering [first_sector, end_sector) if it lies in one group."""
        group = first_sector // self.GROUP
        if (end_sector - 1) // self.GROUP != group:
            return None
        return self.stripes[group % self.STRIPES]

    def acquire(self, first_sector: int, end_sector: int) -> list[threading.Lock]:
        """Take every stripe of [first_sector, end_sector), ascending; return them."""
        g0, g1 = first_sector // self.GROUP, (end_sector - 1) // self.GROUP
        if g1 - g0 + 1 >= self.STRIPES:
            held = list(self.stripes)
        else:
            held = [self.stripes[i] for i in sorted({g % self.STRIPES
                                                     for g in range(g0, g1 + 1)})]
        for n, lock in enumerate(held):
            try:
                lock.acquire()
            except BaseException:
                self.release(held[:n])
                raise
        return held

    @staticmethod
    def release(held: list[threading.Lock]) -> None:
        for lock in reversed(held):
            lock.release()

    @contextlib.contextmanager
    def hold(self, first_sector: int, end_sector: int) -> Iterator[None]:
        held = self.acquire(first_sector, end_sector)
        try:
            yield
        finally:
            self.release(held)


class DiskBackend:
    """Serve the virtual disk kept in one :class:`~blockcrypt.storage.volume.Volume`.

    ``volume`` is an open Volume, or the path of a container file, which is
    opened as a :class:`~blockcrypt.storage.volume.FileVolume` with
    ``read_only`` (required then; with a Volume it may be omitted, and must
    match the volume's if given).  The backend owns the volume from the call
    on: :meth:`close` closes it, and so does a constructor that fails.

    ``dk`` is the plaintext data key for an encrypted disk and must be
    ``None`` for an unencrypted one.  The backend keeps no reference to ``dk``:
    the cipher holds its own mlocked copy, wiped by :meth:`close`; the caller
    may wipe ``dk`` as soon as the constructor returns.

    Thread-safe: all methods may be called from many threads at once.
    """

    def __init__(self, volume: Volume | str | os.PathLike, dk: Secret | None, *,
                 read_only: bool | None = None, discard: bool):
        if not isinstance(volume, Volume):
            if read_only is None:
                raise TypeError("DiskBackend(path, ...) needs read_only=True or False")
            volume = FileVolume(volume, read_only=read_only)
        try:
            if read_only is not None and read_only != volume.read_only:
                raise ValueError(f"read_only={read_only} but {volume!r} is opened "
                                 f"{'read-only' if volume.read_only else 'read-write'}")
            self._init(volume, dk, discard)
        except BaseException:
            volume.close()
            raise

    def _init(self, volume: Volume, dk: Secret | None, discard: bool) -> None:
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
        self._sector_locks = _SectorLocks()
        self._idle_scratch: list[tuple[memoryview, int]] = []   # list.pop/append: atomic
        # The volume's per-request methods, bound once (no lookup per request).
        self._pread, self._pwrite = volume.pread_into, volume.pwrite
        self._cipher = XtsCipher(dk, self.sector_size) if dk is not None else None
        # The cipher's unchecked per-request entry point (None without the
        # OpenSSL fast path); requests are validated here before it is used.
        self._crypt_at = self._cipher.crypt_at if self._cipher is not None else None

    # -- public API -------------------------------------------------------------

    def pread_into(self, buf, offset: int) -> None:
        """Fill ``buf`` (writable, any length) with the plaintext at ``offset``."""
        view = memoryview(buf).cast("B")
        count = len(view)
        if offset < 0 or offset + count > self.size_bytes:
            self._check_range(count, offset)
        if self._cipher is None:
            self._pread(view, offset)
            return
        ss = self.sector_size
        if not (offset % ss or count % ss):        # whole sectors: the common case
            if count:
                self._read_sectors(view, offset // ss)
            return
        # A partial head and/or tail sector: decrypt those through a scratch sector.
        for pos, sector_no, within, length, whole in self._pieces(count, offset):
            if whole:  # straight into the caller's buffer, decrypted in place
                self._read_sectors(view[pos:pos + length], sector_no)
            else:
                sector = memoryview(bytearray(ss))
                self._read_sectors(sector, sector_no)
                view[pos:pos + length] = sector[within:within + length]

    def pwrite(self, buf, offset: int, fua: bool) -> None:
        """Write ``buf`` (any length) at ``offset``; durable on return if ``fua``."""
        if self.read_only:
            self._check_writable()
        view = memoryview(buf).cast("B")
        count = len(view)
        if offset < 0 or offset + count > self.size_bytes:
            self._check_range(count, offset)
        if count == 0:
            return
        if self._cipher is None:
            self._pwrite(view, offset)
        else:
            ss = self.sector_size
            first, end = offset // ss, -(-(offset + count) // ss)
            aligned = not (offset % ss or count % ss)
            stripe = self._sector_locks.stripe_of(first, end)
            if stripe is not None and aligned:      # the common case: one lock
                with stripe:
                    self._encrypt_write(view, first)
            else:
                with self._sector_locks.hold(first, end):
                    if aligned:                     # whole sectors: no read-modify-write
                        self._encrypt_write(view, first)
                    else:
                        for pos, sector_no, within, length, whole in self._pieces(count,
                                                                                   offset):
                            piece = view[pos:pos + length]
                            if whole:
                                self._encrypt_write(piece, sector_no)
                            else:
                                self._modify_sector(sector_no, within, piece)
        if fua:
            self.volume.flush()

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool) -> None:
        """Make ``count`` bytes at ``offset`` read as zeros.

        Whole sectors are deallocated when the disk allows discard and the
        client allows it (``may_trim``), which leaks that the range is unused
        (as dm-crypt allow_discards does); otherwise encrypted zeros are
        written, indistinguishable from other data.
        """
        self._check_writable()
        self._check_range(count, offset)
        if count == 0:
            return
        deallocate = self.discard and may_trim
        if self._cipher is None:
            if deallocate:
                self.volume.deallocate(offset, count)
            else:
                self.volume.write_zeros(offset, count)
        else:
            ss = self.sector_size
            with self._sector_locks.hold(*self._sector_span(count, offset)):
                for _pos, sector_no, within, length, whole in self._pieces(count, offset):
                    if not whole:
                        self._modify_sector(sector_no, within, memoryview(_ZEROS)[:length])
                    elif deallocate:  # zero-sector rule: holes read as zeros
                        self.volume.deallocate(sector_no * ss, length)
                    else:
                        self._encrypt_zeros(sector_no, length)
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
        """Wipe the cipher's key and close the volume (idempotent)."""
        cipher, self._cipher = getattr(self, "_cipher", None), None
        if cipher is not None:
            cipher.wipe()
        getattr(self, "_idle_scratch", []).clear()   # unmaps the scratch buffers
        volume = getattr(self, "volume", None)
        if volume is not None:
            volume.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<DiskBackend {self.path} size_bytes={self.size_bytes} "
                f"sector_size={self.sector_size} encrypted={self.encrypted}>")

    # -- helpers ----------------------------------------------------------------

    def _check_range(self, count: int, offset: int) -> None:
        if offset < 0 or count < 0 or offset + count > self.size_bytes:
            raise OSError(errno.EINVAL,
                          f"request of {count} bytes at offset {offset} is outside the "
                          f"{self.size_bytes}-byte disk")

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, f"disk {self.path} is served read-only")

    def _sector_span(self, count: int, offset: int) -> tuple[int, int]:
        ss = self.sector_size
        return offset // ss, -(-(offset + count) // ss)

    def _pieces(self, count: int, offset: int) -> Iterator[tuple[int, int, int, int, bool]]:
        """Split a request into at most three pieces: partial head, whole sectors, partial tail.

        Yields ``(pos, sector_no, within, length, whole)``: ``pos`` is the
        offset in the request, ``within`` the offset inside sector ``sector_no``;
        ``whole`` pieces start at a sector boundary and span whole sectors.
        """
        ss = self.sector_size
        pos = 0
        while pos < count:
            sector_no, within = divmod(offset + pos, ss)
            if within or count - pos < ss:
                length = min(ss - within, count - pos)
                yield pos, sector_no, within, length, False
            else:
                length = (count - pos) // ss * ss
                yield pos, sector_no, 0, length, True
            pos += length

    def _read_sectors(self, dst: memoryview, sector_no: int) -> None:
        """Read whole sectors into dst and decrypt them in place (zero-sector rule)."""
        ss = self.sector_size
        self._pread(dst, sector_no * ss)         # short reads finished, zeros past EOF
        # Zero-sector rule, fast test: a stored sector whose first 8 bytes are
        # not all zero is not an all-zero sector.  Ciphertext starts with 8
        # zero bytes with probability 2^-64; such a sector, and holes, take
        # the exact per-sector test below.
        step = ss // 8
        if len(dst) == ss:                       # one sector (4 KiB requests)
            heads_nonzero = dst[:8] != _ZERO_WORD
        elif len(dst) <= 64 * ss:                # a few sectors: cheaper than numpy
            heads_nonzero = all(dst.cast("Q")[::step].tolist())
        else:
            heads_nonzero = bool(np.frombuffer(dst, dtype=np.uint64)[::step].all())
        if heads_nonzero:
            if self._crypt_at is not None and len(dst) <= FAST_CRYPT_BYTES:
                self._crypt_at(_addressof(_char_from_buffer(dst)), len(dst), sector_no, False)
            else:
                self._cipher.crypt_in_place(dst, sector_no, False)
            return
        words = np.frombuffer(dst, dtype=np.uint64)
        stored_nonzero = words.reshape(-1, step).any(axis=1)
        if stored_nonzero.all():
            self._cipher.decrypt_into(dst, dst, sector_no)
            return
        # Decrypt each run of stored non-zero sectors with one call.
        edges = np.flatnonzero(np.diff(stored_nonzero, prepend=False, append=False))
        for first, end in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            run = dst[first * ss:end * ss]
            self._cipher.decrypt_into(run, run, sector_no + first)

    def _encrypt_write(self, plain: memoryview, sector_no: int) -> None:
        """Encrypt whole sectors into a scratch buffer and write them."""
        ss = self.sector_size
        try:
            slot = self._idle_scratch.pop()
        except IndexError:
            # Anonymous mapping: pages are only backed once written, so a 4 KiB
            # request costs 4 KiB of memory, not CHUNK_BYTES.  Its address is
            # kept with it for the cipher's unchecked entry point.
            scratch = memoryview(mmap.mmap(-1, CHUNK_BYTES))
            slot = (scratch, _addressof(_char_from_buffer(scratch)))
        scratch = slot[0]
        try:
            count = len(plain)
            if count <= SMALL_WRITE_BYTES:
                out = scratch[:count]
                out[:] = plain
                if self._crypt_at is not None and count <= FAST_CRYPT_BYTES:
                    self._crypt_at(slot[1], count, sector_no, True)
                else:
                    self._cipher.crypt_in_place(out, sector_no, True)
                self._pwrite(out, sector_no * ss)
                return
            for pos in range(0, count, CHUNK_BYTES):
                piece = plain[pos:pos + CHUNK_BYTES]
                out = scratch[:len(piece)]
                first = sector_no + pos // ss
                self._cipher.encrypt_into(piece, out, first)
                self._pwrite(out, first * ss)
        finally:
            if len(self._idle_scratch) < MAX_IDLE_SCRATCH:
                self._idle_scratch.append(slot)

    def _encrypt_zeros(self, sector_no: int, length: int) -> None:
        ss = self.sector_size
        for pos in range(0, length, CHUNK_BYTES):
            n = min(CHUNK_BYTES, length - pos)
            self._encrypt_write(memoryview(_ZEROS)[:n], sector_no + pos // ss)

    def _modify_sector(self, sector_no: int, within: int, data: memoryview) -> None:
        """Read-modify-write part of one sector (caller holds its range lock)."""
        sector = memoryview(bytearray(self.sector_size))
        self._read_sectors(sector, sector_no)
        sector[within:within + len(data)] = data
        self._encrypt_write(sector, sector_no)
