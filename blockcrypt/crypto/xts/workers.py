"""One request's OpenSSL state: keyed EVP contexts and scratch buffers, pooled
by the engine (:class:`~.openssl.OpenSslXts`), never shared by two requests.

Owns the contexts' lifetime (made keyed, freed cleansed) and the bulk scratch.
"""
from __future__ import annotations

import ctypes

import numpy as np

from .buffers import PyBuffer
from .bulk import Masks
from .evp import LibCrypto


class Worker:
    """EVP contexts and scratch buffers for one request at a time (never shared).

    Workers are pooled per cipher, not kept per thread: nbdkit's Python plugin
    gives every callback a fresh Python thread state (PyGILState_Ensure /
    Release around each call), so ``threading.local`` storage lives for one
    request only; per-thread state kept in a registry therefore grew by one
    set of contexts and scratch buffers per request.  The pool holds as many
    workers as requests ever ran at once.

    All contexts are keyed when the worker is made (never later, so never
    from a key that :meth:`XtsCipher.wipe` has overwritten).  ``xts[encrypt]``
    is ``(context, live IV or None)`` (see :meth:`LibCrypto.live_iv`).
    """

    def __init__(self, lib: LibCrypto, key_addr: int, bulk: bool):
        self.lib = lib
        self.ctxs: list[int] = []
        self.xts: dict[bool, tuple[int, ctypes.Array | None]] = {}
        self.ecb: dict[str, int] = {}
        self.iv = (ctypes.c_uint64 * 2)()             # iv[1] stays 0 (64-bit tweaks)
        self.iv_addr = ctypes.addressof(self.iv)
        self.outl = ctypes.c_int()
        self.outl_addr = ctypes.addressof(self.outl)
        self.outl_ptr = ctypes.pointer(self.outl)
        # For the fast path (LibCrypto.update_raw): per direction, the context
        # as a c_void_p, its live IV, and a c_void_p set to each data address.
        self.fast: dict[bool, tuple[ctypes.c_void_p, ctypes.Array, ctypes.c_void_p]] = {}
        self.src_buf = PyBuffer()
        self.src_buf_addr = ctypes.addressof(self.src_buf)
        self.scratch = None
        try:
            for encrypt in (True, False):
                ctx = self._new(lib.aes_256_xts, key_addr, encrypt)
                live_iv = lib.live_iv(ctx)
                if live_iv is not None:
                    live_iv[1] = 0                    # tweaks are 64-bit: word 1 stays 0
                self.xts[encrypt] = (ctx, live_iv)
                if live_iv is not None:
                    self.fast[encrypt] = (ctypes.c_void_p(ctx), live_iv, ctypes.c_void_p())
            if bulk:
                self.ecb["k2"] = self._new(lib.aes_256_ecb, key_addr + 32, True)
                self.ecb["k1-enc"] = self._new(lib.aes_256_ecb, key_addr, True)
                self.ecb["k1-dec"] = self._new(lib.aes_256_ecb, key_addr, False)
        except BaseException:
            self.wipe()
            raise

    def _new(self, cipher: int, key_addr: int, encrypt: bool) -> int:
        ctx = self.lib.new_ctx(cipher, key_addr, encrypt)
        self.ctxs.append(ctx)
        return ctx

    def bulk_scratch(self, n: int):
        if self.scratch is None:
            m = n * Masks.J
            tw = np.zeros((n, 2), np.uint64)
            self.scratch = (tw, tw.ctypes.data, np.zeros((n, 2), np.uint64),
                            np.zeros((m, 2), np.uint64), np.zeros((m, 2), np.uint64),
                            np.zeros(m, np.uint64), np.zeros(m, np.uint64))
        return self.scratch

    def wipe(self) -> None:
        """Free the contexts (cleansing key schedules) and zero the masks."""
        self.xts.clear()                          # the live IVs point into the contexts
        self.fast.clear()
        self.ecb.clear()
        for ctx in self.ctxs:
            self.lib.free_ctx(ctx)
        self.ctxs.clear()
        if self.scratch is not None:   # masks derive from K2: do not leave them
            for arr in self.scratch:
                if isinstance(arr, np.ndarray):
                    arr.fill(0)
            self.scratch = None
