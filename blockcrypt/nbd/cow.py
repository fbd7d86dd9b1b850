"""Copy-before-write snapshots of a container that is being served.

Owns the serving side of a snapshot on a file system without reflink: the
background copy of the container into the snapshot file, the copy-before-write
of ranges a write is about to change, and the control socket through which
``blockcrypt snapshot create`` starts it.  It knows nothing of the catalog or
of names: the CLI creates the snapshot file, hands over its descriptor, and
publishes it once this module reports it complete.

The protocol (one Unix stream connection per snapshot, on the socket named by
the plugin's ``cowctl=`` parameter):

1. the client sends ``S`` with the snapshot file's descriptor (SCM_RIGHTS),
   while I/O is paused through the pause filter (no request in flight);
2. the server records the snapshot as started (:class:`CowCopy`: every later
   write first copies the old contents of the chunks it touches) and answers
   ``S``; the client resumes I/O;
3. a background thread copies every chunk not yet copied, answering
   ``P<done> <total>\\n`` now and then and ``D\\n`` once the copy is complete
   and fsynced (or ``E<text>\\n`` on failure); copy-before-write stops then.

If the client disconnects before ``D`` (it died, or gave up) the copy stops
and the half-written file is the client's to discard.  If the server dies, the
client sees the connection close and discards it.  Neither can lose a write:
copy-before-write only ever *reads* the container, before the write proceeds.

Chunks are :data:`CHUNK_BYTES` of the container file (header included).  A
chunk is copied at most once, under a striped lock: the writer or the copier,
whichever comes first; holes in the source stay holes in the copy
(``SEEK_DATA``).  A copied chunk is never touched again, so the copy holds
the container exactly as it was at step 1.  Copies are written with
``O_DIRECT`` (in 256 KiB pieces) where the file system allows: gigabytes of
dirty page cache would make every fsync of the live disk wait for their
writeback (measured: 2 s stalls on ext4; 48 ms with O_DIRECT).
"""
from __future__ import annotations

import errno
import mmap
import os
import select
import socket
import threading

from ..storage.fastcopy import copy_range, data_ranges

CHUNK_BYTES = 1024 * 1024
_LOCK_STRIPES = 256
DIRECT_ALIGN = 4096
# O_DIRECT writes of this size: small enough that a live fsync queued behind one
# waits little
DIRECT_PIECE_BYTES = 256 * 1024
PROGRESS_INTERVAL_S = 0.5
REQUEST_TIMEOUT_S = 30.0
# Test-only (passed by nbd/launch.py): seconds the copier waits after each chunk.
_TEST_DELAY_S = float(os.environ.get("BLOCKCRYPT_TESTONLY_COW_CHUNK_DELAY_S") or 0)


class CowCopy:
    """One snapshot being copied from src_fd (the container) to dst_fd."""

    def __init__(self, src_fd: int, dst_fd: int, chunk_bytes: int = CHUNK_BYTES):
        # a description of our own: SEEK_DATA moves its offset, not the server's
        self.src_fd = os.open(f"/proc/self/fd/{src_fd}", os.O_RDONLY | os.O_CLOEXEC)
        self.dst_fd = dst_fd
        self.chunk_bytes = chunk_bytes
        self.size_bytes = os.fstat(self.src_fd).st_size
        os.ftruncate(dst_fd, self.size_bytes)
        self.chunks = -(-self.size_bytes // chunk_bytes)
        self.copied = bytearray(self.chunks)
        self.done_chunks = 0
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

    def _copy_chunk(self, index: int) -> bool:
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
                if self._copy_chunk(index):
                    with self._count_lock:
                        self.before_write_chunks += 1
        except Exception as exc:  # noqa: BLE001 - the snapshot fails, never the write
            self.error = exc
            self.stopped.set()

    def run(self) -> None:
        """The background copier: every chunk in order (a hole costs one
        ``SEEK_DATA``), then fsync."""
        try:
            for index in range(self.chunks):
                if self.stopped.is_set():
                    return
                if self._copy_chunk(index) and _TEST_DELAY_S:
                    self.stopped.wait(_TEST_DELAY_S)
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


class CowServer:
    """The control socket of one served container.

    ``backend`` has ``source_fd()`` (the container's descriptor) and
    ``set_cow(copy_or_None)`` (installs the hook its writes call).  One
    snapshot at a time; a second connection waits in the listen queue.
    """

    def __init__(self, path: str, backend):
        self.path = path
        self.backend = backend
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, name="blockcrypt-cow", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                       # closed
            with conn:
                try:
                    self._session(conn)
                except OSError:
                    pass                     # the client went away: copy abandoned

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)  # a silent client must not hold the socket
        msg, fds, _flags, _addr = socket.recv_fds(conn, 1, 1)
        if msg != b"S" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            conn.sendall(b"Eexpected S and one descriptor\n")
            return
        try:
            copy = CowCopy(self.backend.source_fd(), fds[0])
        except OSError as exc:
            os.close(fds[0])
            conn.sendall(f"Ecannot start the copy: {exc.strerror or exc}\n".encode())
            return
        self.backend.set_cow(copy)
        worker = threading.Thread(target=copy.run, name="blockcrypt-cow-copy", daemon=True)
        try:
            conn.sendall(b"S")
            worker.start()
            while not copy.finished.wait(PROGRESS_INTERVAL_S):
                ready, _, _ = select.select([conn], [], [], 0)
                if ready and not conn.recv(1):
                    return               # client gone: finally stops the copy
                conn.sendall(f"P{copy.done_bytes} {copy.size_bytes}\n".encode())
            if copy.error is not None or copy.stopped.is_set():
                exc = copy.error
                text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                conn.sendall(f"Ecopy failed: {text}\n".encode())
            else:
                self.backend.set_cow(None)
                cow_bytes = copy.before_write_chunks * copy.chunk_bytes
                conn.sendall(f"P{copy.size_bytes} {copy.size_bytes}\nD{cow_bytes}\n".encode())
        finally:
            copy.stopped.set()
            self.backend.set_cow(None)
            if worker.is_alive():
                worker.join()
            copy.close()

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

