"""Unix socket names longer than sun_path allows.

Owns :func:`unix_socket_path`, used by both ends of the hand-over socket of a
detached disk's snapshot (``run/.snapshots/<disk id>.sock``, whose full path
under a deep home exceeds the 107 bytes a Unix socket address may have).
"""
from __future__ import annotations

import contextlib
import os
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
