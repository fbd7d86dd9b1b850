"""Client side of a served container's copy-before-write snapshot socket.

Owns the protocol seen from ``blockcrypt snapshot create`` (the server side,
and the protocol itself, are described in :mod:`blockcrypt.nbd.cow`): hand the
snapshot file's descriptor to nbdkit's plugin while I/O is paused, then wait
for the background copy, reporting progress.  For a detached disk,
:class:`HandoffListener` is where a server that starts meanwhile asks for the
copy, and :meth:`CowSession.hand_over` gives it the copy.  It starts no
process and knows nothing of disks or the catalog.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .. import errors
from .unixpath import close_listener, listen_private

START_TIMEOUT_S = 30.0
# How long a server that connected to the hand-over socket may take to say which
# file it serves (it does so at once).
HANDOFF_REQUEST_TIMEOUT_S = 5.0


class CowSession:
    """One snapshot copy by the serving plugin; close() abandons it if unfinished."""

    def __init__(self, sock: socket.socket, what: str):
        self.sock = sock
        self.what = what
        self._buf = b""

    @classmethod
    def connect(cls, path: os.PathLike | str, what: str) -> CowSession | None:
        """Connect, or None when the server has no such socket (an older attach)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(START_TIMEOUT_S)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise errors.StateError(detail=f"cannot reach the server of {what} to start "
                                    f"the snapshot copy: {exc.strerror or exc}") from None
        return cls(sock, what)

    @classmethod
    def hand_over(cls, conn: socket.socket, what: str, dst_fd: int, size_bytes: int,
                  chunk_bytes: int, copied: bytes) -> CowSession:
        """Give the copy (the snapshot file, its size, chunk size and copied
        chunks) to the server on conn (from :meth:`HandoffListener.poll`); returns
        once the server copies before every write.  From the call on, the copy
        is the server's: on any failure the snapshot is lost (StateError)."""
        session = cls(conn, what)
        conn.settimeout(START_TIMEOUT_S)
        try:
            try:
                socket.send_fds(conn, [b"T"], [dst_fd])
                conn.sendall(f"{size_bytes} {chunk_bytes} {len(copied)}\n".encode() + copied)
                reply = conn.recv(1)
            except OSError as exc:
                raise session._fail(exc.strerror or str(exc)) from None
            if reply == b"S":
                return session
            if reply == b"E":
                raise session._fail(session._line())
            raise session._fail("the server (nbdkit) stopped while taking the copy over")
        except BaseException:
            conn.close()
            raise

    def _fail(self, text: str) -> errors.StateError:
        return errors.StateError(detail=f"the snapshot copy of {self.what} failed: {text}; "
                                 "nothing was created, retry `blockcrypt snapshot create`")

    def start(self, dst_fd: int) -> None:
        """Hand over the snapshot file (call with I/O paused); returns once every
        later write copies old data first."""
        try:
            socket.send_fds(self.sock, [b"S"], [dst_fd])
            reply = self.sock.recv(1)
        except OSError as exc:
            raise self._fail(exc.strerror or str(exc)) from None
        if reply == b"S":
            return
        if reply == b"E":
            raise self._fail(self._line())
        raise self._fail("the server closed the connection")

    def _line(self) -> str:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise self._fail("the server (nbdkit) stopped while copying")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode("ascii", "replace")

    def wait(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Until the copy is complete and durable; progress(done_bytes, total_bytes).
        Returns how many bytes writes copied before changing them."""
        self.sock.settimeout(None)
        try:
            while True:
                line = self._line()
                if line.startswith("P"):
                    done, total = (int(x) for x in line[1:].split())
                    if progress is not None:
                        progress(done, total)
                elif line.startswith("D"):
                    return int(line[1:] or 0)
                elif line.startswith("E"):
                    raise self._fail(line[1:])
        except OSError as exc:
            raise self._fail(exc.strerror or str(exc)) from None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> CowSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HandoffListener:
    """The socket where a server that starts while a detached disk's snapshot is
    copied asks to take the copy over (protocol: :mod:`blockcrypt.nbd.cow`)."""

    def __init__(self, path: str):
        self.path = path
        self.sock = listen_private(path, 4)     # replaces a killed create's socket
        self.sock.setblocking(False)

    def poll(self, src_fd: int) -> socket.socket | None:
        """A connection from a server of the very file open as src_fd that wants
        the copy, if one is waiting (never blocks for long).  A server of another
        file (the disk was reset meanwhile) is told ``N`` and serves without it."""
        src = os.fstat(src_fd)
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            conn.setblocking(True)
            conn.settimeout(HANDOFF_REQUEST_TIMEOUT_S)
            try:
                line = b""
                while not line.endswith(b"\n") and len(line) < 128:
                    chunk = conn.recv(128)
                    if not chunk:
                        break
                    line += chunk
                dev, ino = (int(x) for x in line[1:].split())
                if line[:1] == b"T" and (dev, ino) == (src.st_dev, src.st_ino):
                    return conn
                conn.sendall(b"N")
            except (OSError, ValueError):
                pass                     # it died or spoke nonsense: not a taker
            conn.close()

    def close(self) -> None:
        """Stop listening (a server that connects later finds no copy to take)."""
        close_listener(self.sock, self.path)
