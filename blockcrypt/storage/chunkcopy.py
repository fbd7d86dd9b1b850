"""The chunked point-in-time copy of a container file (copy-before-write).

Owns :class:`CowCopy`: the copy of a container into a snapshot file, chunk by
chunk, that stays the image of the instant it started while the container keeps
changing, provided every change first calls :meth:`CowCopy.before_write`.  Two
processes run it: the serving plugin (:mod:`blockcrypt.nbd.cow`, a disk
attached read-write) and ``snapshot create`` itself for a detached disk
(:mod:`blockcrypt.services.snapshot_detached`), which hands an unfinished copy
over to a server that starts meanwhile (:attr:`CowCopy.copied` travels with it).
It knows nothing of sockets, names or the catalog.

Chunks are :data:`CHUNK_BYTES` of the container file (header included).  A
chunk is copied at most once, under a striped lock: the writer or the copier,
whichever comes first; holes in the source stay holes in the copy
(``SEEK_DATA``).  A copied chunk is never touched again, so the copy holds
the container exactly as it was at the start.  Copies are written with
``O_DIRECT`` (in 256 KiB pieces) where the file system allows: gigabytes of
dirty page cache would make every fsync of the live disk wait for their
writeback (measured: 2 s stalls on ext4; 48 ms with O_DIRECT).
"""
from __future__ import annotations

import errno
import mmap
import os
import threading

from .fastcopy import copy_range, data_ranges

CHUNK_BYTES = 1024 * 1024
_LOCK_STRIPES = 256
DIRECT_ALIGN = 4096
# O_DIRECT writes of this size: small enough that a live fsync queued behind one
# waits little
DIRECT_PIECE_BYTES = 256 * 1024
# Test-only (passed on by nbd/launch.py, and read by snapshot create itself):
# seconds the background copier waits after each chunk, ``S``, or ``S:FILE`` to
# wait only until FILE exists (a test lifts the delay once the copy has been slow
# for as long as it needed).
TESTONLY_DELAY_ENV = "BLOCKCRYPT_TESTONLY_COW_CHUNK_DELAY_S"
_delay, _, _TEST_DELAY_UNTIL = (os.environ.get(TESTONLY_DELAY_ENV) or "0").partition(":")
_TEST_DELAY_S = float(_delay)


def _test_delay_lifted() -> bool:
    return bool(_TEST_DELAY_UNTIL) and os.path.exists(_TEST_DELAY_UNTIL)


def handoff_socket(snapshots_dir: str, disk_id: str) -> str:
    """Where ``snapshot create`` of a detached disk waits for a server to take its
    copy over (``run/.snapshots/<disk id>.sock``): the one name both sides use."""
    return os.path.join(snapshots_dir, f"{disk_id}.sock")


class CowCopy:
    """One snapshot being copied from src_fd (the container) to dst_fd.

    ``size_bytes``: how much of the container the snapshot holds (default: its
    length now); ``copied``: the chunks already copied by a previous holder of
    this copy (a hand-over), else none.
    """

    def __init__(self, src_fd: int, dst_fd: int, chunk_bytes: int = CHUNK_BYTES, *,
                 size_bytes: int | None = None, copied: bytes | None = None):
        # a description of our own: SEEK_DATA moves its offset, not the server's
        self.src_fd = os.open(f"/proc/self/fd/{src_fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.dst_fd = dst_fd
            self.chunk_bytes = chunk_bytes
            self.size_bytes = os.fstat(self.src_fd).st_size if size_bytes is None \
                else size_bytes
            os.ftruncate(dst_fd, self.size_bytes)
            self.chunks = -(-self.size_bytes // chunk_bytes)
            if copied is not None and len(copied) != self.chunks:
                raise ValueError(f"{len(copied)} chunk flags for {self.chunks} chunks")
            self.copied = bytearray(copied if copied is not None else self.chunks)
        except BaseException:
            os.close(self.src_fd)
            raise
        self.done_chunks = sum(self.copied)
        self.before_write_chunks = 0     # chunks a write copied first (not the copier)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._count_lock = threading.Lock()
        self.error: BaseException | None = None
        self.stopped = threading.Event()
        self.finished = threading.Event()
        self.closed = False
        # Copies into the snapshot are written with O_DIRECT where possible: a buffered
        # copy of gigabytes fills the page cache with dirty pages of the
        # snapshot, and every fsync of the live disk (a journal commit of the
        # same file system) then waits for their writeback: seconds of stall.
        try:
            self.direct_fd = os.open(f"/proc/self/fd/{dst_fd}",
                                     os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self.direct_fd = None
        self._bufs = threading.local()      # an aligned (mmap) buffer per thread
        self._all_bufs: list[mmap.mmap] = []

    def copy_chunk(self, index: int) -> bool:
        """Copy chunk index (its data ranges) unless already copied; True if
        this call copied it.  O_DIRECT where possible (see __init__)."""
        if self.copied[index]:
            return False
        with self._locks[index % _LOCK_STRIPES]:
            if self.copied[index] or self.closed:
                return False    # closed: an abandoned copy, the write just proceeds
            start = index * self.chunk_bytes
            end = min(start + self.chunk_bytes, self.size_bytes)
            for offset, run in data_ranges(self.src_fd, end, start=start):
                if not self._direct_copy(offset, run):
                    copy_range(self.src_fd, self.dst_fd, offset, run, 0)
            self.copied[index] = 1
        with self._count_lock:
            self.done_chunks += 1
        return True

    def _direct_copy(self, offset: int, length: int) -> bool:
        """Copy with a buffered read and an O_DIRECT write; False if the range
        cannot go that way (alignment, file system): then the caller copies it."""
        if self.direct_fd is None or offset % DIRECT_ALIGN or length % DIRECT_ALIGN:
            return False
        buf = getattr(self._bufs, "buf", None)
        if buf is None:
            buf = self._bufs.buf = mmap.mmap(-1, self.chunk_bytes)
            self._all_bufs.append(buf)
        done = 0
        with memoryview(buf) as whole:
            while done < length:
                n = min(DIRECT_PIECE_BYTES, length - done)
                view = whole[:n]
                try:
                    if os.preadv(self.src_fd, [view], offset + done) != n:
                        return False
                    written = 0
                    while written < n:
                        written += os.pwritev(self.direct_fd, [view[written:]],
                                              offset + done + written)
                except OSError as exc:
                    if exc.errno == errno.EINVAL and done == 0:
                        return False
                    raise
                finally:
                    view.release()
                done += n
        return True

    def before_write(self, file_offset: int, length: int) -> None:
        """Called before the container's [file_offset, +length) changes."""
        if length <= 0:
            return
        first = file_offset // self.chunk_bytes
        last = min((file_offset + length - 1) // self.chunk_bytes, self.chunks - 1)
        try:
            for index in range(first, last + 1):
                if self.copy_chunk(index):
                    with self._count_lock:
                        self.before_write_chunks += 1
        except Exception as exc:  # noqa: BLE001 - the snapshot fails, never the write
            self.error = exc
            self.stopped.set()

    def step(self, index: int) -> None:
        """The background copier's work on chunk index (a hole costs one
        ``SEEK_DATA``), slowed down by the test-only delay."""
        if self.copy_chunk(index) and _TEST_DELAY_S and not _test_delay_lifted():
            self.stopped.wait(_TEST_DELAY_S)

    def run(self) -> None:
        """The background copier: every chunk in order, then fsync."""
        try:
            for index in range(self.chunks):
                if self.stopped.is_set():
                    return
                self.step(index)
            if self.error is None:
                os.fsync(self.dst_fd)
        except BaseException as exc:  # noqa: BLE001 - reported to the client
            self.error = exc
        finally:
            self.finished.set()

    @property
    def done_bytes(self) -> int:
        return min(self.done_chunks * self.chunk_bytes, self.size_bytes)

    def close(self) -> None:
        """Close both descriptors once no chunk copy is running (idempotent)."""
        for lock in self._locks:
            lock.acquire()
        try:
            if self.closed:
                return
            self.closed = True
        finally:
            for lock in self._locks:
                lock.release()
        for buf in self._all_bufs:
            buf.close()
        for fd in (self.src_fd, self.dst_fd, self.direct_fd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
