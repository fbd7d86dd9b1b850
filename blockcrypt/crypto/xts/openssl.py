"""The fast XTS engine: the system libcrypto through ctypes, a pool of keyed
workers, and the numpy bulk path for large 512-byte-sector requests.

A request borrows a worker (EVP contexts keyed once, scratch buffers) from the
pool and returns it; per sector only the tweak changes, written straight into
the context's IV, so one C call per sector (~0.5 us plus the AES work: ~2.5
GB/s per core at 4096-byte sectors, ~2 us for a single 4 KiB request).  These
short calls keep the GIL: releasing it twice per sector made two threads convoy
on it (together at half the speed of one).  Requests of >= BULK_MIN_SECTORS
512-byte sectors take :mod:`.bulk`.

Owns the pool, request dispatch and the per-request fast entry points; the
checks of a request's buffers and indexes are :class:`~.cipher.XtsCipher`'s.
"""
from __future__ import annotations

import ctypes
import threading

from ... import errors
from . import bulk
from .buffers import (
    PYBUF_SIMPLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
    addressof,
    char_from_buffer,
)
from .evp import LibCrypto
from .params import BULK_MIN_SECTORS, IV_SECTOR_BYTES, MAX_TWEAK, wiped
from .workers import Worker


class OpenSslXts:
    """The fast engine: system libcrypto via ctypes, numpy bulk for 512-byte sectors.

    A request borrows a :class:`Worker` from the pool (its EVP contexts are
    keyed once; per sector only the IV changes) and gives it back when done.
    Taking and returning are single list operations, atomic under the GIL, so
    the hot path takes no lock.  :meth:`close` frees the idle workers at once
    and a busy one as soon as its request returns it; a request that starts
    after close raises StateError.
    """

    name = "openssl"

    def __init__(self, key: memoryview, sector_size: int, lib: LibCrypto):
        self._lib = lib
        self._key = key                       # view of XtsCipher's own Secret
        self._key_addr = ctypes.addressof(ctypes.c_char.from_buffer(key))
        self._sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES
        self._bulk = sector_size == 512
        if self._bulk:
            bulk.ensure_masks()
        self._idle: list[Worker] = []
        self._workers: list[Worker] = []     # every worker made (tests, accounting)
        self._workers_lock = threading.Lock()
        self._closed = False

    def _new_worker(self) -> Worker:
        with self._workers_lock:
            if self._closed:
                raise wiped()
            st = Worker(self._lib, self._key_addr, self._bulk)
            self._workers.append(st)
        return st

    def _wipe_idle(self) -> None:
        idle = self._idle
        while idle:
            try:
                st = idle.pop()
            except IndexError:                # another thread emptied it meanwhile
                return
            st.wipe()

    def crypt_into(self, src: memoryview, dst: memoryview, nbytes: int, tweak: int,
                   encrypt: bool) -> None:
        try:
            st = self._idle.pop()
        except IndexError:
            st = self._new_worker()
        try:
            if self._closed:
                raise wiped()
            # The memoryviews made by XtsCipher._run pin both buffers (no resize
            # or free) for the whole call, which matters because the bulk
            # path's ECB calls run without the GIL; here we only read their
            # addresses.
            dst_addr = addressof(char_from_buffer(dst))
            if src is dst:
                src_addr = dst_addr
            else:
                if not src.readonly:
                    src_addr = addressof(char_from_buffer(src))
                else:
                    PyObject_GetBuffer(src, st.src_buf_addr, PYBUF_SIMPLE)
                    src_addr = st.src_buf.buf
                    PyBuffer_Release(st.src_buf_addr)
                if src_addr != dst_addr and (src_addr < dst_addr + nbytes
                                             and dst_addr < src_addr + nbytes):
                    raise errors.InvalidInput(
                        detail="source and destination overlap without being the "
                               "same buffer; use one buffer or two disjoint ones")
            if self._bulk and nbytes >= BULK_MIN_SECTORS * 512:
                bulk.bulk_512(self._lib, st, src, dst, dst_addr, nbytes, tweak, encrypt)
                return
            # One EVP XTS update per sector on the worker's context; only the
            # IV (the tweak in word 0; word 1 stays 0: tweaks are 64-bit) changes.
            ctx, live_iv = st.xts[encrypt]
            update, outl_addr = self._lib.update, st.outl_addr
            size = self._sector_size
            if live_iv is not None:           # the tweak written into the context's IV
                if nbytes == size:            # one sector (4 KiB requests): no loop
                    live_iv[0] = tweak
                    if update(ctx, dst_addr, outl_addr, src_addr, size) != 1:
                        raise errors.CryptoError(detail=f"OpenSSL XTS failed on tweak {tweak}")
                    return
                step = self._tweak_step
                for offset in range(0, nbytes, size):
                    live_iv[0] = tweak
                    if update(ctx, dst_addr + offset, outl_addr, src_addr + offset,
                              size) != 1:
                        raise errors.CryptoError(detail=f"OpenSSL XTS failed on tweak {tweak}")
                    tweak += step
                return
            init, iv, iv_addr = self._lib.init, st.iv, st.iv_addr
            step = self._tweak_step
            for offset in range(0, nbytes, size):
                iv[0] = tweak
                if (init(ctx, None, None, None, iv_addr, -1) != 1
                        or update(ctx, dst_addr + offset, outl_addr, src_addr + offset,
                                  size) != 1):
                    raise errors.CryptoError(detail=f"OpenSSL XTS failed on tweak {tweak}")
                tweak += step
        finally:
            self._idle.append(st)
            if self._closed:                  # close() ran meanwhile: free it now
                self._wipe_idle()

    def fast_paths(self, fallback):
        """``(crypt_in_place, crypt_at)`` for the per-request path, or None.

        ``crypt_in_place(buf, sector_index, encrypt)`` replaces
        :meth:`XtsCipher.crypt_in_place`; ``crypt_at(addr, nbytes,
        sector_index, encrypt)`` does the same on memory the caller owns and
        keeps alive (the backend's scratch buffers, whose addresses it keeps),
        without any check: ``nbytes`` must be a positive multiple of the
        sector size below the bulk threshold and the sectors within the tweak
        range.

        The backend calls these once per request, so everything they need is
        bound in the closure (no attribute lookups, no bound-method objects)
        and the OpenSSL call takes ctypes objects made once per worker.
        crypt_in_place checks only what the C call does not check itself:
        whole sectors, an int sector index in range, bytes format; ctypes'
        ``from_buffer`` refuses read-only and non-contiguous buffers.  Anything
        unusual, and requests for the bulk path, go to ``fallback`` (the
        checked generic path), which raises the precise error.  None when the
        live-IV technique is not available on this libcrypto (then every
        request takes the generic path).
        """
        if not self._lib.live_iv_works:
            return None
        idle, new_worker = self._idle, self._new_worker
        ss, step = self._sector_size, self._tweak_step
        fast_max = BULK_MIN_SECTORS * 512 - 1 if self._bulk else 1 << 62
        end_sector = MAX_TWEAK // step + 1               # first index out of range
        update = self._lib.update_raw
        addr_of, char_from_buf = addressof, char_from_buffer
        engine = self

        def crypt_at(addr, nbytes, sector_index, encrypt):
            try:
                st = idle.pop()
            except IndexError:
                st = new_worker()
            try:
                if engine._closed:
                    raise wiped()
                ctx, live_iv, ptr = st.fast[encrypt]
                outl = st.outl_ptr
                tweak = sector_index * step
                if nbytes == ss:                         # one sector: no loop
                    live_iv[0] = tweak
                    ptr.value = addr
                    if update(ctx, ptr, outl, ptr, ss) != 1:
                        raise errors.CryptoError(detail=f"OpenSSL XTS failed on tweak {tweak}")
                    return
                for a in range(addr, addr + nbytes, ss):
                    live_iv[0] = tweak
                    ptr.value = a
                    if update(ctx, ptr, outl, ptr, ss) != 1:
                        raise errors.CryptoError(detail=f"OpenSSL XTS failed on tweak {tweak}")
                    tweak += step
            finally:
                idle.append(st)
                if engine._closed:                       # close() ran meanwhile: free it now
                    engine._wipe_idle()

        def crypt_in_place(buf, sector_index, encrypt):
            if type(buf) is not memoryview or type(sector_index) is not int:
                return fallback(buf, sector_index, encrypt)
            nbytes = buf.nbytes
            if (nbytes % ss or not 0 < nbytes <= fast_max or buf.format != "B"
                    or sector_index < 0 or sector_index + nbytes // ss > end_sector):
                return fallback(buf, sector_index, encrypt)
            try:
                addr = addr_of(char_from_buf(buf))
            except (TypeError, ValueError):              # read-only or not contiguous
                return fallback(buf, sector_index, encrypt)
            # buf (the caller's memoryview) keeps the memory alive and pinned.
            crypt_at(addr, nbytes, sector_index, encrypt)

        return crypt_in_place, crypt_at

    def close(self) -> None:
        """Free every idle worker's contexts (cleansing key schedules) and masks;
        a worker whose request is still running is freed when it returns."""
        with self._workers_lock:
            self._closed = True
        self._wipe_idle()
        self._key = None

