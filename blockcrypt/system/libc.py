"""The C library, loaded once for the few calls Python does not wrap
(mlock/munlock/madvise for key memory, fallocate for hole punching)."""
from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc with ``use_errno``; None if it cannot be loaded.

    By soname, not ``ctypes.util.find_library``: that forks ldconfig, which
    inside nbdkit shows up as a second nbdkit process.
    """
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - no glibc
        return None
