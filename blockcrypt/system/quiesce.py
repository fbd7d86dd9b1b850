"""Quiesce an attached disk's I/O through nbdkit's ``pause`` filter.

Owns the client side of the filter's control socket; it starts no process and
knows nothing of disks, the catalog or containers.

nbdkit is always started with ``--filter=pause pause-control=SOCKET`` (see
:func:`blockcrypt.system.commands.nbdkit_argv`).  The control protocol
(nbdkit-pause-filter(1)) is one byte each way: ``p`` pauses and is answered
``P`` only once every request received before it has completed; ``r`` resumes
and is answered ``R``.  Requests arriving while paused wait inside nbdkit
(flush requests are not held, and do not change the file's contents).

What a pause guarantees: every write the server has acknowledged has been
``pwrite``-n to the container file by the plugin, so it is in the file (page
cache) and a copy made now contains it, and nothing changes the file until
resume.  That is a crash-consistent image: the state a power cut at that
instant would leave if every acknowledged write had reached the disk.
Durability of the original (FUA, flush) is a separate matter.

Robustness (from the filter's implementation in nbdkit 1.32):

- The filter serves one control connection at a time; others wait in the
  listen queue and are handled in order.  So two pausers never interleave,
  and sending ``r`` is always safe: it is read only after any client that
  holds the pause has disconnected.
- A client that dies while paused does *not* resume I/O (the filter ignores
  the disconnect).  :func:`paused` resumes in ``finally``, so only a SIGKILL
  can leave the disk paused; the next :func:`paused`, :func:`resume` or
  :func:`nudge_resume` on the same socket ends it, and every disk command
  nudges the disks it finds attached.
- Kernel NBD clients time out if a pause lasts long (nbd-client's timeout),
  so keep the work inside :func:`paused` short: a snapshot does a reflink or
  starts the plugin's copy-before-write there, never the copy itself
  (:mod:`blockcrypt.services.snapshot_copy`).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from .. import errors

# A pause waits for in-flight requests; a 64 MiB write on a slow disk can
# take seconds, and another pauser may hold the control connection briefly.
PAUSE_TIMEOUT_S = 60.0
RESUME_TIMEOUT_S = 60.0


def _exchange(sock: socket.socket, command: bytes, timeout_s: float, what: str) -> None:
    """Send one command byte and wait for its upper-case echo."""
    sock.settimeout(timeout_s)
    try:
        sock.sendall(command)
        while True:
            reply = sock.recv(1)
            if reply == command.upper():
                return
            if not reply:
                raise errors.StateError(detail=f"the nbdkit pause control socket closed "
                                        f"while waiting to {what}")
            if reply == b"X":
                raise errors.StateError(detail=f"nbdkit's pause filter did not understand "
                                        f"the request to {what}")
    except socket.timeout:
        raise errors.StateError(detail=f"nbdkit did not {what} within {timeout_s:g} s; "
                                "the disk may be busy, retry later") from None
    except OSError as exc:
        raise errors.StateError(detail=f"cannot {what} through the nbdkit pause control "
                                f"socket: {exc.strerror or exc}") from None


def _connect(ctl_socket: os.PathLike | str, timeout_s: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout_s)
    try:
        sock.connect(os.fspath(ctl_socket))
    except OSError as exc:
        sock.close()
        raise errors.StateError(detail=f"cannot reach the nbdkit pause control socket "
                                f"{os.fspath(ctl_socket)}: {exc.strerror or exc}; is the "
                                "disk still attached?") from None
    return sock


@contextlib.contextmanager
def paused(ctl_socket: os.PathLike | str, *,
           timeout_s: float = PAUSE_TIMEOUT_S) -> Iterator[None]:
    """Hold the disk's I/O paused for the duration of the block.

    Returns into the block only after nbdkit confirmed that every request
    received before the pause has completed.  Always resumes on the way out
    (also on exceptions); if resuming fails the error is raised after the
    block's own exception, if any.
    """
    sock = _connect(ctl_socket, timeout_s)
    try:
        try:
            _exchange(sock, b"p", timeout_s, "pause I/O")
        except errors.StateError:
            # Our 'p' may still be queued (another pauser holds the control
            # connection, or requests are slow to drain): queue an 'r' behind
            # it so the filter, which reads our bytes even after we close,
            # never stays paused on our account.
            with contextlib.suppress(OSError):
                sock.sendall(b"r")
            raise
        try:
            yield
        finally:
            _exchange(sock, b"r", RESUME_TIMEOUT_S, "resume I/O")
    finally:
        sock.close()


def nudge_resume(ctl_socket: os.PathLike | str) -> bool:
    """Queue a resume without waiting for it; True if the socket took it.

    The filter reads the ``r`` once no other client holds the control
    connection, so a live pauser is never disturbed, while a pause left by a
    killed pauser ends at once.  Cheap enough for every command that looks at
    an attached disk (``blockcrypt.services.attach`` calls it when it checks attachments).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(1.0)
    try:
        sock.connect(os.fspath(ctl_socket))
        sock.sendall(b"r")
        return True
    except OSError:
        return False
    finally:
        sock.close()


def resume(ctl_socket: os.PathLike | str, *, timeout_s: float = RESUME_TIMEOUT_S) -> None:
    """Resume I/O (recovery after a pauser was killed); harmless if not paused."""
    sock = _connect(ctl_socket, timeout_s)
    try:
        _exchange(sock, b"r", timeout_s, "resume I/O")
    finally:
        sock.close()
