"""A small type for key material: data keys, CMK material, passphrases.

Python gives no reliable way to wipe memory (see pyca/cryptography's
limitations): immutable ``bytes`` copies may be made by libraries we call.  This
type does what can be done: it keeps the secret in one mutable ``bytearray``,
locks those pages in memory with ``mlock`` where the system allows (so they are
not swapped out) and marks them ``MADV_DONTDUMP`` (left out of core dumps),
redacts itself in ``repr``/``str`` (so a traceback or a log line never shows
it), and overwrites the buffer on :meth:`wipe` (also at exit of a ``with``
block and on garbage collection).

Pass ``secret.view()`` (a memoryview over the buffer) to primitives that accept
bytes-like objects, so no extra immutable copy is made on our side.
"""
from __future__ import annotations

import collections
import ctypes
import hmac
import mmap
import os
import threading

from ..system.libc import libc

# mlock/munlock work on whole pages and do not nest: one munlock unlocks a page
# however many secrets share it.  So locks are counted per page, and a page is
# unlocked only when the last secret on it is wiped.
_PAGE = mmap.PAGESIZE
MADV_DONTDUMP, MADV_DODUMP = 16, 17          # <asm-generic/mman-common.h>
_page_locks: dict[int, int] = {}
_page_locks_mutex = threading.Lock()
# Pages of wiped secrets whose munlock accounting waits for the mutex.  A wipe
# never blocks on the mutex: wipes also run from finalizers (__del__ of a
# Secret or of an object holding one), which the garbage collector can start
# inside the mutex's own critical section in the same thread, where a blocking
# acquire of this non-reentrant lock would deadlock (it hung a test run once).
# Such a wipe zeroes the bytes at once and queues its pages here; the next
# holder of the mutex settles them.  deque append/popleft are atomic.
_pending_unlocks: collections.deque[list[int]] = collections.deque()


def _settle_pending_unlocks(libc) -> None:
    """Count down the pages of wiped secrets; munlock those no secret uses.
    Caller holds _page_locks_mutex."""
    while _pending_unlocks:
        try:
            pages = _pending_unlocks.popleft()
        except IndexError:                   # emptied by a nested call
            return
        for p in pages:
            n = _page_locks.get(p, 0) - 1
            if n > 0:
                _page_locks[p] = n
            else:
                _page_locks.pop(p, None)
                if libc:
                    libc.munlock(ctypes.c_void_p(p), ctypes.c_size_t(_PAGE))
                    libc.madvise(ctypes.c_void_p(p), ctypes.c_size_t(_PAGE), MADV_DODUMP)


def _get_libc():
    """libc, or False when it cannot be loaded (then nothing is mlocked)."""
    return libc() or False


def _address(buf: bytearray) -> int:
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


def _pages(buf: bytearray) -> list[int]:
    """Start addresses of the pages buf's bytes occupy."""
    start = _address(buf)
    first = start - start % _PAGE
    return list(range(first, start + len(buf), _PAGE))


def disable_core_dumps() -> None:
    """Make this process non-dumpable (no core file, no ptrace by other uids).

    Called by every process that holds a plaintext key: the nbdkit plugin and the
    CLI.  PR_SET_DUMPABLE = 4.
    """
    libc = _get_libc()
    if libc:
        libc.prctl(4, 0, 0, 0, 0)


class Secret:
    """Secret bytes with a redacted repr, mlock, and wipe()."""

    __slots__ = ("_buf", "_locked", "__weakref__")

    def __init__(self, data: bytes | bytearray | memoryview | int):
        if isinstance(data, int):
            self._buf = bytearray(data)
        else:
            self._buf = bytearray(data)
        self._locked = False
        self._lock()

    @classmethod
    def random(cls, n: int) -> "Secret":
        s = cls(n)
        s._buf[:] = os.urandom(n)
        return s

    @classmethod
    def read_exact_fd(cls, fd: int, n: int) -> "Secret":
        """Read exactly n bytes from fd into a fresh secret (for key hand-over pipes)."""
        s = cls(n)
        view = memoryview(s._buf)
        got = 0
        while got < n:
            k = os.readv(fd, [view[got:]])
            if k == 0:
                s.wipe()
                raise EOFError(f"key descriptor closed after {got} of {n} bytes")
            got += k
        return s

    def _lock(self) -> None:
        libc = _get_libc()
        if not libc or not len(self._buf):
            return
        with _page_locks_mutex:
            _settle_pending_unlocks(libc)
            pages = _pages(self._buf)
            new = [p for p in pages if p not in _page_locks]
            for p in new:
                if libc.mlock(ctypes.c_void_p(p), ctypes.c_size_t(_PAGE)) != 0:
                    for q in new[:new.index(p)]:
                        libc.munlock(ctypes.c_void_p(q), ctypes.c_size_t(_PAGE))
                    return  # not allowed (RLIMIT_MEMLOCK): stay unlocked
            for p in new:     # and out of core dumps (the process is non-dumpable too)
                libc.madvise(ctypes.c_void_p(p), ctypes.c_size_t(_PAGE), MADV_DONTDUMP)
            for p in pages:
                _page_locks[p] = _page_locks.get(p, 0) + 1
            self._locked = True

    def _unlock(self, buf: bytearray) -> None:
        """Drop this secret's page locks, or queue them if the mutex is busy."""
        _pending_unlocks.append(_pages(buf))
        if _page_locks_mutex.acquire(blocking=False):
            try:
                _settle_pending_unlocks(_get_libc())
            finally:
                _page_locks_mutex.release()

    def __len__(self) -> int:
        return len(self._buf)

    def view(self) -> memoryview:
        """A memoryview of the secret bytes (no copy)."""
        if self.wiped:
            raise ValueError("secret has been wiped")
        return memoryview(self._buf)

    def reveal(self) -> bytes:
        """An immutable copy; only for APIs that insist on bytes. Avoid."""
        return bytes(self.view())

    @property
    def wiped(self) -> bool:
        return self._buf is None

    def wipe(self) -> None:
        buf = self._buf
        if buf is None:
            return
        n = len(buf)
        if n:
            ctypes.memset(_address(buf), 0, n)
            if self._locked:
                self._unlock(buf)
        self._buf = None

    def __eq__(self, other) -> bool:
        if isinstance(other, Secret):
            other = other.view()
        if isinstance(other, (bytes, bytearray, memoryview)):
            return hmac.compare_digest(self.view(), other)
        return NotImplemented

    __hash__ = None

    def __enter__(self) -> "Secret":
        return self

    def __exit__(self, *exc) -> None:
        self.wipe()

    def __del__(self):
        try:
            self.wipe()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "wiped" if self.wiped else f"{len(self._buf)} bytes"
        return f"<Secret {state} redacted>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("Secret objects cannot be pickled")
