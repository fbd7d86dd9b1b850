"""ctypes bindings to the system libcrypto (OpenSSL 3 / 1.1): the few EVP
functions the OpenSSL engine calls, with exact C signatures, loaded once.

Owns the library handle, the EVP context lifecycle and the live-IV probe;
knows nothing about sectors, workers or buffers.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from ... import errors
from .params import KEY_BYTES


class LibCrypto:
    """The few EVP functions we call, with exact C signatures."""

    def __init__(self, lib: ctypes.CDLL, lib_gil: ctypes.PyDLL):
        vp, i = ctypes.c_void_p, ctypes.c_int
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_new.restype = vp
        lib.EVP_CIPHER_CTX_reset.argtypes = [vp]
        lib.EVP_CIPHER_CTX_reset.restype = i
        lib.EVP_CIPHER_CTX_free.argtypes = [vp]
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [vp, i]
        lib.EVP_CIPHER_CTX_set_padding.restype = i
        # int EVP_CipherInit_ex(ctx, const EVP_CIPHER *, ENGINE *, key, iv, int enc)
        lib.EVP_CipherInit_ex.argtypes = [vp, vp, vp, vp, vp, i]
        lib.EVP_CipherInit_ex.restype = i
        # int EVP_CipherUpdate(ctx, unsigned char *out, int *outl, const unsigned char *in, int inl)
        lib.EVP_CipherUpdate.argtypes = [vp, vp, vp, vp, i]
        lib.EVP_CipherUpdate.restype = i
        lib.EVP_aes_256_xts.argtypes = []
        lib.EVP_aes_256_xts.restype = vp
        lib.EVP_aes_256_ecb.argtypes = []
        lib.EVP_aes_256_ecb.restype = vp
        # Per-sector calls keep the GIL (PyDLL): releasing and re-taking it twice
        # per ~1 us sector makes concurrent threads convoy on the GIL (measured:
        # two threads together at half the speed of one).  Bulk ECB calls over
        # whole chunks release it (CDLL), so other threads run meanwhile.
        lib_gil.EVP_CipherInit_ex.argtypes = lib.EVP_CipherInit_ex.argtypes
        lib_gil.EVP_CipherInit_ex.restype = i
        lib_gil.EVP_CipherUpdate.argtypes = lib.EVP_CipherUpdate.argtypes
        lib_gil.EVP_CipherUpdate.restype = i
        self.lib = lib
        self.init = lib_gil.EVP_CipherInit_ex
        self.update = lib_gil.EVP_CipherUpdate
        self.update_nogil = lib.EVP_CipherUpdate
        # The same function once more, without argtypes, for the per-request
        # fast path: it is called with ctypes objects only (c_void_p, a
        # pointer, and an int that fits C int), which ctypes passes without
        # the from_param conversion of every argument (~0.1 us per call).
        self.update_raw = lib_gil._FuncPtr(("EVP_CipherUpdate", lib_gil))
        self.update_raw.restype = i
        self.aes_256_xts = lib.EVP_aes_256_xts()
        self.aes_256_ecb = lib.EVP_aes_256_ecb()
        if not (self.aes_256_xts and self.aes_256_ecb):
            raise OSError("libcrypto has no AES-256-XTS/ECB")
        # unsigned char *EVP_CIPHER_CTX_iv_noconst(EVP_CIPHER_CTX *): see live_iv()
        try:
            lib.EVP_CIPHER_CTX_iv_noconst.argtypes = [vp]
            lib.EVP_CIPHER_CTX_iv_noconst.restype = vp
            self.iv_noconst = lib.EVP_CIPHER_CTX_iv_noconst
        except AttributeError:
            self.iv_noconst = None
        self.live_iv_works = self.iv_noconst is not None and self._live_iv_self_test()

    def new_ctx(self, cipher: int, key_addr: int, encrypt: bool) -> int:
        ctx = self.lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        if self.lib.EVP_CipherInit_ex(ctx, cipher, None, key_addr, None, int(encrypt)) != 1:
            self.free_ctx(ctx)
            raise errors.CryptoError(detail="OpenSSL refused the AES key")
        self.lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
        return ctx

    def live_iv(self, ctx: int):
        """The IV the XTS context encrypts with, as a writable 2 x uint64 array, or None.

        EVP_CIPHER_CTX_iv_noconst() returns the cipher's own IV buffer (OpenSSL
        3 asks the provider for OSSL_CIPHER_PARAM_UPDATED_IV as an octet
        pointer, which the generic cipher code answers with its ``iv`` field;
        1.1 returns ``ctx->iv``), and XTS reads that buffer as the tweak on
        every EVP_CipherUpdate without changing it.  Writing the next sector's
        tweak there replaces an EVP_CipherInit_ex call per sector (~0.6 us).
        Used only when :meth:`_live_iv_self_test` proved it on this libcrypto
        at load time; otherwise None (the caller sets the IV per sector).
        The array is valid until the context is freed.
        """
        return self._live_iv_array(ctx) if self.live_iv_works else None

    def _live_iv_array(self, ctx: int):
        zero_iv = (ctypes.c_uint64 * 2)()       # also marks the IV as set
        if self.init(ctx, None, None, None, ctypes.addressof(zero_iv), -1) != 1:
            return None
        addr = self.iv_noconst(ctx)
        return (ctypes.c_uint64 * 2).from_address(addr) if addr else None

    def _live_iv_self_test(self) -> bool:
        """Whether tweaks written through the live IV give the EVP_CipherInit_ex
        results, both directions, on a throwaway random key."""
        key = (ctypes.c_char * KEY_BYTES).from_buffer_copy(os.urandom(KEY_BYTES))
        data = (ctypes.c_char * 64).from_buffer_copy(os.urandom(64))
        out = (ctypes.c_char * 64)()
        outl = ctypes.c_int()
        iv = (ctypes.c_uint64 * 2)()
        ctxs = []
        try:
            for encrypt in (True, False):
                ref_ctx = self.new_ctx(self.aes_256_xts, ctypes.addressof(key), encrypt)
                ctxs.append(ref_ctx)
                ctx = self.new_ctx(self.aes_256_xts, ctypes.addressof(key), encrypt)
                ctxs.append(ctx)
                live = self._live_iv_array(ctx)
                if live is None:
                    return False
                for tweak in (1, 2**40 + 3, 7):      # changes between updates too
                    iv[0] = tweak
                    if (self.init(ref_ctx, None, None, None, ctypes.addressof(iv), -1) != 1
                            or self.update(ref_ctx, out, ctypes.byref(outl), data, 64) != 1):
                        return False
                    want = out.raw
                    live[0] = tweak
                    if (self.update(ctx, out, ctypes.byref(outl), data, 64) != 1
                            or out.raw != want):
                        return False
            return True
        except (errors.BlockcryptError, MemoryError):
            return False
        finally:
            for ctx in ctxs:
                self.free_ctx(ctx)

    def free_ctx(self, ctx: int) -> None:
        # reset cleanses the expanded key schedule; free releases the context.
        self.lib.EVP_CIPHER_CTX_reset(ctx)
        self.lib.EVP_CIPHER_CTX_free(ctx)


_LIBCRYPTO: LibCrypto | None | bool = False   # False = not tried yet


def libcrypto() -> LibCrypto | None:
    """The system libcrypto (OpenSSL 3 / 1.1), or None if it cannot be loaded."""
    global _LIBCRYPTO
    if _LIBCRYPTO is False:
        lib = None
        names = ("libcrypto.so.3", lambda: ctypes.util.find_library("crypto"))
        for name in names:            # find_library runs ldconfig: only if needed
            name = name() if callable(name) else name
            if not name:
                continue
            try:
                lib = LibCrypto(ctypes.CDLL(name), ctypes.PyDLL(name))
                break
            except (OSError, AttributeError):
                lib = None
        _LIBCRYPTO = lib
    return _LIBCRYPTO

