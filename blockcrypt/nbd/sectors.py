"""The Python request path: sector I/O through any :class:`~blockcrypt.storage.volume.Volume`.

:class:`PythonSectors` implements the request semantics of
:mod:`blockcrypt.nbd.backend` (whole-sector XTS, the zero-sector rule,
read-modify-write of partial sectors under striped sector locks) with Python
calls to the volume and an :class:`~blockcrypt.crypto.xts.XtsCipher`.  It serves
volumes that have no file descriptor to hand to the compiled path, and it is
the reference the compiled path (:mod:`blockcrypt.crypto._datapath`) is tested
against, request for request.  Range and read-only checks are the backend's.
"""
from __future__ import annotations

import contextlib
import mmap
import threading
from collections.abc import Iterator

from ..crypto.xts import XtsCipher
from ..storage.volume import Volume

# Encrypt-and-write and zero-writing work in chunks of this many bytes, so one
# request never needs more than this much scratch memory.
CHUNK_BYTES = 1024 * 1024
_ZEROS = bytes(CHUNK_BYTES)

# Scratch buffers kept for reuse once their request is done; more than this
# many at once (a burst of concurrent requests) are unmapped when returned.
MAX_IDLE_SCRATCH = 16


class SectorLocks:
    """Serialises writers whose sector ranges may overlap; most disjoint ones run in parallel.

    Every write holds the locks of the sector groups it touches (``GROUP``
    consecutive sectors share a group; group ``g`` uses stripe ``g % STRIPES``)
    for its whole duration.  A read-modify-write of a partial sector therefore
    never interleaves with another write of that sector, and the final content
    of the disk after concurrent overlapping writes is that of some serial
    order of them.  Stripes are taken in ascending order, so two writers never
    deadlock.  The compiled path keeps the same scheme in C.
    """

    GROUP = 16
    STRIPES = 64

    def __init__(self) -> None:
        self.stripes = [threading.Lock() for _ in range(self.STRIPES)]

    @contextlib.contextmanager
    def hold(self, first_sector: int, end_sector: int) -> Iterator[None]:
        g0, g1 = first_sector // self.GROUP, (end_sector - 1) // self.GROUP
        if g1 - g0 + 1 >= self.STRIPES:
            held = list(self.stripes)
        else:
            held = [self.stripes[i] for i in sorted({g % self.STRIPES
                                                     for g in range(g0, g1 + 1)})]
        taken = []
        try:
            for lock in held:
                lock.acquire()
                taken.append(lock)
            yield
        finally:
            for lock in reversed(taken):
                lock.release()


class PythonSectors:
    """Requests on a volume in Python; ``cipher`` None for an unencrypted disk."""

    def __init__(self, volume: Volume, cipher: XtsCipher | None, sector_size: int):
        self.volume = volume
        self.sector_size = sector_size
        self._cipher = cipher
        self._locks = SectorLocks()
        self._idle_scratch: list[memoryview] = []     # list.pop/append: atomic

    def pread(self, view: memoryview, offset: int) -> None:
        if self._cipher is None:
            self.volume.pread_into(view, offset)
            return
        ss = self.sector_size
        for pos, sector_no, within, length, whole in self._pieces(len(view), offset):
            if whole:               # straight into the caller's buffer, decrypted in place
                self._read_sectors(view[pos:pos + length], sector_no)
            else:
                sector = memoryview(bytearray(ss))
                self._read_sectors(sector, sector_no)
                view[pos:pos + length] = sector[within:within + length]

    def pwrite(self, view: memoryview, offset: int) -> None:
        if self._cipher is None:
            self.volume.pwrite(view, offset)
            return
        with self._locks.hold(*self._span(len(view), offset)):
            for pos, sector_no, within, length, whole in self._pieces(len(view), offset):
                piece = view[pos:pos + length]
                if whole:
                    self._encrypt_write(piece, sector_no)
                else:
                    self._modify_sector(sector_no, within, piece)

    def zero(self, offset: int, count: int, deallocate: bool) -> None:
        if self._cipher is None:
            if deallocate:
                self.volume.deallocate(offset, count)
            else:
                self.volume.write_zeros(offset, count)
            return
        ss = self.sector_size
        with self._locks.hold(*self._span(count, offset)):
            for _pos, sector_no, within, length, whole in self._pieces(count, offset):
                if not whole:
                    self._modify_sector(sector_no, within, memoryview(_ZEROS)[:length])
                elif deallocate:    # zero-sector rule: holes read as zeros
                    self.volume.deallocate(sector_no * ss, length)
                else:
                    for pos in range(0, length, CHUNK_BYTES):
                        n = min(CHUNK_BYTES, length - pos)
                        self._encrypt_write(memoryview(_ZEROS)[:n], sector_no + pos // ss)

    def close(self) -> None:
        self._idle_scratch.clear()                    # unmaps the scratch buffers

    # -- helpers ----------------------------------------------------------------

    def _span(self, count: int, offset: int) -> tuple[int, int]:
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
        """Read whole sectors into dst and decrypt them in place; a stored
        all-zero sector stays zeros (the zero-sector rule)."""
        ss = self.sector_size
        self.volume.pread_into(dst, sector_no * ss)   # short reads finished, zeros past EOF
        zero = _ZEROS[:ss]
        run = None                                    # first sector of a non-zero run
        for k in range(len(dst) // ss + 1):
            stored_zero = k == len(dst) // ss or dst[k * ss:(k + 1) * ss] == zero
            if stored_zero and run is not None:
                piece = dst[run * ss:k * ss]
                self._cipher.crypt_in_place(piece, sector_no + run, False)
                run = None
            elif not stored_zero and run is None:
                run = k

    def _encrypt_write(self, plain: memoryview, sector_no: int) -> None:
        """Encrypt whole sectors into a scratch buffer and write them."""
        ss = self.sector_size
        try:
            scratch = self._idle_scratch.pop()
        except IndexError:
            # Anonymous mapping: pages are only backed once written.
            scratch = memoryview(mmap.mmap(-1, CHUNK_BYTES))
        try:
            for pos in range(0, len(plain), CHUNK_BYTES):
                piece = plain[pos:pos + CHUNK_BYTES]
                out = scratch[:len(piece)]
                first = sector_no + pos // ss
                self._cipher.encrypt_into(piece, out, first)
                self.volume.pwrite(out, first * ss)
        finally:
            if len(self._idle_scratch) < MAX_IDLE_SCRATCH:
                self._idle_scratch.append(scratch)

    def _modify_sector(self, sector_no: int, within: int, data: memoryview) -> None:
        """Read-modify-write part of one sector (caller holds its range lock)."""
        sector = memoryview(bytearray(self.sector_size))
        self._read_sectors(sector, sector_no)
        sector[within:within + len(data)] = data
        self._encrypt_write(sector, sector_no)
