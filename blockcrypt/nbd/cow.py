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

Taking over a detached disk's snapshot (:func:`take_over`, called by the plugin
at start-up with the container locked, before it serves a request): ``snapshot
create`` of a detached disk fixes the instant under the container's lock, then
copies in the background with the lock released, listening on
``run/.snapshots/<disk id>.sock`` (the plugin's ``snapdir=``).  A read-write
server that opens the container meanwhile connects there first:

1. the server sends ``T<st_dev> <st_ino>\\n`` of the container it opened;
2. ``snapshot create`` answers ``N`` (no copy of that file: a reset replaced
   it, or the copy just finished) or, between two chunks, stops copying and
   answers ``T`` with the snapshot file's descriptor, then
   ``<size_bytes> <chunk_bytes> <chunks>\\n`` and one byte per chunk (1:
   copied);
3. the server installs the copy (every later write copies first), answers
   ``S`` and continues it exactly as in step 3 above, on this connection.

A refused or closed connection means no copy is running (its creator is gone
or done): the server serves without copying.  The copy itself (chunks,
``O_DIRECT``, holes) is :class:`~blockcrypt.storage.chunkcopy.CowCopy`.
"""
from __future__ import annotations

import os
import select
import socket
import threading

from ..storage.chunkcopy import CowCopy
from ..system.unixpath import close_listener, listen_private, unix_socket_path

__all__ = ["CowCopy", "CowServer", "take_over"]

PROGRESS_INTERVAL_S = 0.5
REQUEST_TIMEOUT_S = 30.0
# How long a starting server waits for ``snapshot create`` of a detached disk to
# hand its copy over (it answers between two chunks: milliseconds).
TAKE_OVER_TIMEOUT_S = 30.0


class CowServer:
    """The control socket of one served container.

    ``backend`` has ``source_fd()`` (the container's descriptor) and
    ``set_cow(copy_or_None)`` (installs the hook its writes call).  One
    snapshot at a time; a second connection waits in the listen queue.
    """

    def __init__(self, path: str, backend):
        self.path = path
        self.backend = backend
        self.sock = listen_private(path, 4)
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
        if self.backend.current_cow() is not None:
            os.close(fds[0])
            conn.sendall(b"Ea snapshot of this disk is already being copied\n")
            return
        try:
            copy = CowCopy(self.backend.source_fd(), fds[0])
        except OSError as exc:
            os.close(fds[0])
            conn.sendall(f"Ecannot start the copy: {exc.strerror or exc}\n".encode())
            return
        self.backend.set_cow(copy)
        try:
            conn.sendall(b"S")
        except OSError:
            self.backend.set_cow(None)
            copy.close()
            raise
        run_copy(conn, copy, self.backend)

    def close(self) -> None:
        close_listener(self.sock, self.path)


def run_copy(conn: socket.socket, copy: CowCopy, backend) -> None:
    """Run the background copier of an installed copy and report on conn
    (``P``, then ``D`` or ``E``); stop copying before writes when it ends or
    the client goes away."""
    worker = threading.Thread(target=copy.run, name="blockcrypt-cow-copy", daemon=True)
    try:
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
            backend.set_cow(None)
            cow_bytes = copy.before_write_chunks * copy.chunk_bytes
            conn.sendall(f"P{copy.size_bytes} {copy.size_bytes}\nD{cow_bytes}\n".encode())
    except OSError:
        pass                         # the client went away: copy abandoned
    finally:
        copy.stopped.set()
        backend.set_cow(None)
        if worker.is_alive():
            worker.join()
        copy.close()


def _read_line(conn: socket.socket, buf: bytearray, limit: int = 256) -> bytes:
    while b"\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk or len(buf) > limit:
            raise EOFError
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line


def _read_exact(conn: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = conn.recv(max(4096, n - len(buf)))
        if not chunk:
            raise EOFError
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


def take_over(path: str, backend) -> threading.Thread | None:
    """Continue the copy of a snapshot of this (detached until now) container
    that ``snapshot create`` is making, if there is one (see the module doc);
    returns the thread that runs it, or None.  Call before serving.

    RuntimeError (the server does not start) if ``snapshot create`` does not
    answer within :data:`TAKE_OVER_TIMEOUT_S`: serving without the copy could
    change ranges it has not copied yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(TAKE_OVER_TIMEOUT_S)
    try:
        with unix_socket_path(path) as short:
            sock.connect(short)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        sock.close()
        return None                      # no copy running, or its creator is gone
    try:
        st = os.fstat(backend.source_fd())
        sock.sendall(f"T{st.st_dev} {st.st_ino}\n".encode())
        msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
        if msg != b"T" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.close()
            return None                  # N, or closed: the copy is done or abandoned
    except TimeoutError:
        sock.close()
        raise RuntimeError(f"a snapshot being copied from this disk ({path}) did not "
                           f"answer within {TAKE_OVER_TIMEOUT_S:g} s; retry") from None
    except (ConnectionError, EOFError):
        sock.close()
        return None                      # its creator died: nothing will be published
    dst_fd = fds[0]
    try:
        buf = bytearray()
        size_bytes, chunk_bytes, chunks = (int(x) for x in _read_line(sock, buf).split())
        copied = _read_exact(sock, buf, chunks)
        copy = CowCopy(backend.source_fd(), dst_fd, chunk_bytes, size_bytes=size_bytes,
                       copied=copied)
    except (OSError, EOFError, ValueError) as exc:
        os.close(dst_fd)
        try:
            sock.sendall(f"Ecannot continue the copy: {exc}\n".encode())
        except OSError:
            pass
        sock.close()
        return None              # snapshot create gives up: nothing will be published
    backend.set_cow(copy)
    try:
        sock.sendall(b"S")
    except OSError:
        backend.set_cow(None)    # its creator died: nothing will be published
        copy.close()
        sock.close()
        return None
    sock.settimeout(None)

    def report() -> None:
        with sock:
            run_copy(sock, copy, backend)
    thread = threading.Thread(target=report, name="blockcrypt-cow-takeover", daemon=True)
    thread.start()
    return thread
