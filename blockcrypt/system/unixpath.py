"""Unix sockets of the snapshot copy: names longer than sun_path allows, and the
private listening sockets both copy servers open.

Owns :func:`unix_socket_path`, used by both ends of the hand-over socket of a
detached disk's snapshot (``run/.snapshots/<disk id>.sock``, whose full path
under a deep home exceeds the 107 bytes a Unix socket address may have), and
:func:`listen_private` / :func:`close_listener`, used by the server's copy
socket (:mod:`blockcrypt.nbd.cow`) and by ``snapshot create``'s hand-over
listener (:mod:`blockcrypt.system.cowclient`).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

# sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX_BYTES = 107


@contextlib.contextmanager
def unix_socket_path(path: str) -> Iterator[str]:
    """A name for bind()/connect() of the Unix socket ``path`` that fits sun_path:
    ``path`` itself, or, when longer, the same file reached through an
    ``O_PATH`` descriptor of its folder (``/proc/self/fd/N/NAME``), open for the
    block.  FileNotFoundError if the folder does not exist."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX_BYTES:
        yield path
        return
    folder, name = os.path.split(path)
    dfd = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dfd}/{name}"
    finally:
        os.close(dfd)


def listen_private(path: str, backlog: int) -> socket.socket:
    """A Unix stream socket listening at ``path`` that only its owner may connect to
    (bound under umask 077), in place of a stale socket file a killed process left."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o077)
        try:
            with unix_socket_path(path) as short:
                sock.bind(short)
        finally:
            os.umask(old)
        sock.listen(backlog)
    except BaseException:
        close_listener(sock, path)
        raise
    return sock


def close_listener(sock: socket.socket, path: str) -> None:
    """Stop listening and remove the socket file (a later client finds nobody)."""
    sock.close()
    with contextlib.suppress(OSError):
        os.unlink(path)
