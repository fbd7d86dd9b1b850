"""Client side of a served container's copy-before-write snapshot socket.

Owns the protocol seen from ``blockcrypt snapshot create`` (the server side,
and the protocol itself, are described in :mod:`blockcrypt.nbd.cow`): hand the
snapshot file's descriptor to nbdkit's plugin while I/O is paused, then wait
for the background copy, reporting progress.  It starts no process and knows
nothing of disks or the catalog.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable

from .. import errors

START_TIMEOUT_S = 30.0


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

