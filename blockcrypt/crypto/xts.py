"""AES-256-XTS sector cipher, compatible with dm-crypt ``aes-xts-plain64``.

Security properties (IEEE 1619-2007 XTS-AES, NIST SP 800-38E):

- Confidentiality only.  XTS has no integrity: a sector can be modified (the
  plaintext becomes 16-byte-block garbage), or replaced by an older copy of
  itself, without detection.  Equal plaintext in the same sector position gives
  equal ciphertext (it is deterministic per sector and 16-byte block).
- The 64-byte data key is K1 (data) || K2 (tweak).  Keys whose halves are equal
  are refused (SP 800-38E, OpenSSL and pyca refuse them too).
- The tweak of a sector is the 512-byte sector number of its first byte, counted
  from the start of the data area, as 64-bit little-endian zero-padded to 16
  bytes: dm-crypt ``plain64`` without ``iv_large_sectors``.  A 4096-byte sector
  is ONE XTS data unit whose tweak is 8*i (not eight 512-byte units).

Two engines compute the same bytes (tests compare them on thousands of random
requests, and both against IEEE/NIST vectors, pyca and the openssl CLI):

- :class:`ReferenceXts`: pyca ``cryptography``, one XTS cipher object per
  sector.  Obviously correct; ~7 us per 4096-byte sector, ~5 us per 512-byte one.
- :class:`OpenSslXts`: the system libcrypto through ctypes.  A request
  borrows a worker (EVP contexts keyed once, scratch buffers) from a pool and
  returns it; per sector only the tweak changes, written straight into the
  context's IV, so one C call per sector (~0.5 us plus the AES work: ~2.5
  GB/s per core at 4096-byte sectors, ~2 us for a single 4 KiB request).
  These short calls keep the GIL: releasing it twice per sector made two
  threads convoy on it (together at half the speed of one).  For requests of
  >= BULK_MIN_SECTORS 512-byte sectors a bulk path (~1.4 GB/s per core
  instead of ~0.7) computes the XTS masks E_K2(tweak) * alpha^j with numpy
  for a chunk of sectors and runs one AES-ECB call over the chunk between
  two XORs; numpy and that long ECB call release the GIL, so concurrent
  requests use both cores.  A numpy bulk path for 4096-byte sectors would be
  slower per core than the per-sector calls.

:class:`XtsCipher` picks OpenSslXts when libcrypto loads, else the reference.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hmac
import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import errors
from ..constants import CIPHER_XTS, DK_BYTES, SECTOR_SIZES, is_sector_size  # noqa: F401
from .secret import Secret

CIPHER_NAME = CIPHER_XTS
KEY_BYTES = DK_BYTES
IV_SECTOR_BYTES = 512          # plain64 counts the tweak in 512-byte units
MAX_TWEAK = 2**64 - 1          # plain64: 64-bit little-endian sector number

# Bulk path for 512-byte sectors, measured on the project machines: below ~48
# sectors (24 KiB) the per-sector EVP loop (~0.7 us/sector) beats the bulk
# path (~20 us fixed + ~0.3 us/sector); chunks of 512 sectors (256 KiB) reach
# ~1.4 GB/s per core and bound the scratch memory to ~0.8 MiB per worker.
BULK_MIN_SECTORS = 48
BULK_CHUNK_SECTORS = 512


def _check_key(key: bytes | bytearray | memoryview) -> memoryview:
    """Refuse keys that are not 64 bytes or whose halves are equal."""
    view = memoryview(key).cast("B")
    if len(view) != KEY_BYTES:
        raise errors.InvalidKeyMaterial(
            reason=f"an {CIPHER_NAME} key is {KEY_BYTES} bytes, got {len(view)}")
    if hmac.compare_digest(view[:32], view[32:]):
        raise errors.InvalidKeyMaterial(
            reason="the two halves of the XTS key are equal; generate a new data key")
    return view


def _unit_cipher(key, tweak16: bytes) -> Cipher:
    if len(tweak16) != 16:
        raise errors.InvalidInput(detail=f"XTS tweak must be 16 bytes, got {len(tweak16)}")
    return Cipher(algorithms.AES(_check_key(key)), modes.XTS(bytes(tweak16)))


def xts_encrypt_unit(key, tweak16: bytes, data) -> bytes:
    """Encrypt one XTS data unit of any length >= 16 (known-answer tests).

    ``key`` is the raw 64-byte K1||K2 (bytes-like), ``tweak16`` the 16-byte tweak.
    """
    enc = _unit_cipher(key, tweak16).encryptor()
    return enc.update(bytes(data)) + enc.finalize()


def xts_decrypt_unit(key, tweak16: bytes, data) -> bytes:
    """Decrypt one XTS data unit (inverse of :func:`xts_encrypt_unit`)."""
    dec = _unit_cipher(key, tweak16).decryptor()
    return dec.update(bytes(data)) + dec.finalize()


# -- reference engine --------------------------------------------------------------

class ReferenceXts:
    """pyca XTS, one Cipher object per sector: slow, obviously correct.

    ``crypt_into(src, dst, nbytes, tweak, encrypt)`` works on buffers already
    validated by :class:`XtsCipher`; ``dst`` may be ``src``.  Stateless apart
    from the key, hence thread-safe.
    """

    name = "reference"

    def __init__(self, key: memoryview, sector_size: int):
        self._key = key
        self._sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES

    def crypt_into(self, src: memoryview, dst: memoryview, nbytes: int, tweak: int,
                   encrypt: bool) -> None:
        key = self._key
        if key is None:
            raise errors.StateError(detail="the XTS cipher has been wiped; open the disk again")
        src, dst = src.cast("B"), dst.cast("B")
        aes = algorithms.AES(key)
        size = self._sector_size
        for offset in range(0, nbytes, size):
            cipher = Cipher(aes, modes.XTS(tweak.to_bytes(16, "little")))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            # Sector-aligned slices: in place (dst is src) reads each sector
            # before it is overwritten.
            ctx.update_into(src[offset:offset + size], dst[offset:offset + size])
            ctx.finalize()
            tweak += self._tweak_step

    def close(self) -> None:
        self._key = None


# -- libcrypto through ctypes ------------------------------------------------------

class _LibCrypto:
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


_LIBCRYPTO: _LibCrypto | None | bool = False   # False = not tried yet


def libcrypto() -> _LibCrypto | None:
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
                lib = _LibCrypto(ctypes.CDLL(name), ctypes.PyDLL(name))
                break
            except (OSError, AttributeError):
                lib = None
        _LIBCRYPTO = lib
    return _LIBCRYPTO


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (stable layout since 3.3)."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_void_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


# Read-only buffers have no ctypes from_buffer(): take their address through the
# C API (PyDLL: called with the GIL held).
_PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
_PyObject_GetBuffer.restype = ctypes.c_int
_PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
_PyBuffer_Release.argtypes = [ctypes.c_void_p]
_PyBuffer_Release.restype = None
_PYBUF_SIMPLE = 0

# Bound once: saves attribute lookups on every request.
_addressof = ctypes.addressof
_char_from_buffer = ctypes.c_char.from_buffer


class _Masks:
    """Shared constants of the bulk mask computation for 512-byte sectors.

    A 512-byte sector has J = 32 blocks; block j's mask is T * x^j with
    T = E_K2(tweak) as a little-endian 128-bit integer (lo, hi).  For s = j in
    0..31:  T * x^s = ((hi << s) | (lo >> 64-s)) : ((lo << s) ^ clmul(c, 0x87))
    with c = hi >> (64-s), the bits shifted out of the top, and clmul(c, 0x87) =
    c ^ c<<1 ^ c<<2 ^ c<<7 (x^128 = x^7 + x^2 + x + 1).  numpy evaluates this
    for every (sector, j) at once, on flat contiguous arrays (numpy's fast
    inner loops); numpy shifts by >= 64 give 0.
    """

    J = 32

    def __init__(self, max_sectors: int):
        s = np.tile(np.arange(self.J, dtype=np.uint64), max_sectors)
        self.left = np.stack([s, s], axis=1)           # (n*J, 2): s for lo and hi
        self.right = np.uint64(64) - self.left          # 64 - s
        self.sector_no = np.arange(max_sectors, dtype=np.uint64)


_MASKS: _Masks | None = None


class _Worker:
    """EVP contexts and scratch buffers for one request at a time (never shared).

    Workers are pooled per cipher, not kept per thread: nbdkit's Python plugin
    gives every callback a fresh Python thread state (PyGILState_Ensure /
    Release around each call), so ``threading.local`` storage lives for one
    request only; per-thread state kept in a registry therefore grew by one
    set of contexts and scratch buffers per request.  The pool holds as many
    workers as requests ever ran at once.

    All contexts are keyed when the worker is made (never later, so never
    from a key that :meth:`XtsCipher.wipe` has overwritten).  ``xts[encrypt]``
    is ``(context, live IV or None)`` (see :meth:`_LibCrypto.live_iv`).
    """

    def __init__(self, lib: _LibCrypto, key_addr: int, bulk: bool):
        self.lib = lib
        self.ctxs: list[int] = []
        self.xts: dict[bool, tuple[int, ctypes.Array | None]] = {}
        self.ecb: dict[str, int] = {}
        self.iv = (ctypes.c_uint64 * 2)()             # iv[1] stays 0 (64-bit tweaks)
        self.iv_addr = ctypes.addressof(self.iv)
        self.outl = ctypes.c_int()
        self.outl_addr = ctypes.addressof(self.outl)
        self.outl_ptr = ctypes.pointer(self.outl)
        # For the fast path (_LibCrypto.update_raw): per direction, the context
        # as a c_void_p, its live IV, and a c_void_p set to each data address.
        self.fast: dict[bool, tuple[ctypes.c_void_p, ctypes.Array, ctypes.c_void_p]] = {}
        self.src_buf = _PyBuffer()
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
            m = n * _Masks.J
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


class OpenSslXts:
    """The fast engine: system libcrypto via ctypes, numpy bulk for 512-byte sectors.

    A request borrows a :class:`_Worker` from the pool (its EVP contexts are
    keyed once; per sector only the IV changes) and gives it back when done.
    Taking and returning are single list operations, atomic under the GIL, so
    the hot path takes no lock.  :meth:`close` frees the idle workers at once
    and a busy one as soon as its request returns it; a request that starts
    after close raises StateError.
    """

    name = "openssl"

    def __init__(self, key: memoryview, sector_size: int, lib: _LibCrypto):
        global _MASKS
        self._lib = lib
        self._key = key                       # view of XtsCipher's own Secret
        self._key_addr = ctypes.addressof(ctypes.c_char.from_buffer(key))
        self._sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES
        self._bulk = sector_size == 512
        if self._bulk and _MASKS is None:
            _MASKS = _Masks(BULK_CHUNK_SECTORS)
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []     # every worker made (tests, accounting)
        self._workers_lock = threading.Lock()
        self._closed = False

    def _new_worker(self) -> _Worker:
        with self._workers_lock:
            if self._closed:
                raise errors.StateError(
                    detail="the XTS cipher has been wiped; open the disk again")
            st = _Worker(self._lib, self._key_addr, self._bulk)
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
                raise errors.StateError(
                    detail="the XTS cipher has been wiped; open the disk again")
            # The memoryviews made by XtsCipher._run pin both buffers (no resize
            # or free) for the whole call, which matters because the bulk
            # path's ECB calls run without the GIL; here we only read their
            # addresses.
            dst_addr = _addressof(_char_from_buffer(dst))
            if src is dst:
                src_addr = dst_addr
            else:
                if not src.readonly:
                    src_addr = _addressof(_char_from_buffer(src))
                else:
                    _PyObject_GetBuffer(src, st.src_buf_addr, _PYBUF_SIMPLE)
                    src_addr = st.src_buf.buf
                    _PyBuffer_Release(st.src_buf_addr)
                if src_addr != dst_addr and (src_addr < dst_addr + nbytes
                                             and dst_addr < src_addr + nbytes):
                    raise errors.InvalidInput(
                        detail="source and destination overlap without being the "
                               "same buffer; use one buffer or two disjoint ones")
            if self._bulk and nbytes >= BULK_MIN_SECTORS * 512:
                self._bulk_512(st, src, dst, dst_addr, nbytes, tweak, encrypt)
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
        addressof, char_from_buffer = _addressof, _char_from_buffer
        engine = self

        def crypt_at(addr, nbytes, sector_index, encrypt):
            try:
                st = idle.pop()
            except IndexError:
                st = new_worker()
            try:
                if engine._closed:
                    raise errors.StateError(
                        detail="the XTS cipher has been wiped; open the disk again")
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
                addr = addressof(char_from_buffer(buf))
            except (TypeError, ValueError):              # read-only or not contiguous
                return fallback(buf, sector_index, encrypt)
            # buf (the caller's memoryview) keeps the memory alive and pinned.
            crypt_at(addr, nbytes, sector_index, encrypt)

        return crypt_in_place, crypt_at

    def _bulk_512(self, st: _Worker, src, dst, dst_addr: int, nbytes: int,
                  first_tweak: int, encrypt: bool) -> None:
        """XTS as XOR(mask) -> AES-ECB -> XOR(mask) over chunks of 512-byte sectors."""
        update, outl_addr = self._lib.update_nogil, st.outl_addr
        ecb_k2 = st.ecb["k2"]
        ecb_k1 = st.ecb["k1-enc" if encrypt else "k1-dec"]
        consts, J = _MASKS, _Masks.J
        chunk_sectors = consts.sector_no.size
        tw, tw_addr, tws, masks, carry, red, tmp = st.bulk_scratch(chunk_sectors)
        src_words = np.frombuffer(src, np.uint64)
        dst_words = np.frombuffer(dst, np.uint64)
        for offset in range(0, nbytes, chunk_sectors * 512):
            n = min(chunk_sectors, (nbytes - offset) // 512)
            m = n * J
            # T_k = E_K2(tweak_k), tweak_k = first + k (512-byte sectors: step 1)
            t = tw[:n]
            np.add(consts.sector_no[:n], np.uint64(first_tweak + offset // 512), out=t[:, 0])
            t[:, 1] = 0
            if update(ecb_k2, tw_addr, outl_addr, tw_addr, n * 16) != 1:
                raise errors.CryptoError(detail="OpenSSL AES-ECB failed (tweak)")
            ts = tws[:n]
            ts[:] = t[:, ::-1]                # (hi, lo): lane-swapped copy
            mv, cv, rv, qv = masks[:m], carry[:m], red[:m], tmp[:m]
            np.left_shift(np.repeat(t, J, axis=0), consts.left[:m], out=mv)
            # cv[:, 0] = hi >> (64-s) (overflow c), cv[:, 1] = lo >> (64-s) (carry)
            np.right_shift(np.repeat(ts, J, axis=0), consts.right[:m], out=cv)
            mv ^= cv                          # lo ^= c, hi |= carry
            c = cv[:, 0]
            np.left_shift(c, 1, out=rv)       # remaining reduction: c<<1 ^ c<<2 ^ c<<7
            rv ^= c
            rv <<= 1
            np.left_shift(c, 7, out=qv)
            rv ^= qv
            mv[:, 0] ^= rv
            flat = mv.reshape(-1)
            words = slice(offset // 8, (offset + n * 512) // 8)
            out = dst_words[words]
            np.bitwise_xor(src_words[words], flat, out=out)
            if update(ecb_k1, dst_addr + offset, outl_addr, dst_addr + offset, n * 512) != 1:
                raise errors.CryptoError(detail="OpenSSL AES-ECB failed (data)")
            out ^= flat

    def close(self) -> None:
        """Free every idle worker's contexts (cleansing key schedules) and masks;
        a worker whose request is still running is freed when it returns."""
        with self._workers_lock:
            self._closed = True
        self._wipe_idle()
        self._key = None


# -- the public cipher ---------------------------------------------------------------

class XtsCipher:
    """AES-256-XTS (dm-crypt aes-xts-plain64) over whole multi-sector buffers.

    ``sector_index`` is the index of the buffer's first sector in units of
    ``sector_size`` from the start of the data area; sector i has tweak
    ``i * (sector_size // 512)``.  ``dst`` may be ``src`` (in place) but must not
    partially overlap it.  Thread-safe.  The cipher keeps its own mlocked copy
    of the key (OpenSSL keeps expanded key schedules, cleansed on wipe);
    :meth:`wipe` overwrites both.  ``engine`` is "auto" (OpenSSL if libcrypto
    loads, else the reference), "openssl" or "reference".
    """

    def __init__(self, key: Secret, sector_size: int, *, engine: str = "auto"):
        if not isinstance(key, Secret):
            raise TypeError("XtsCipher needs the data key as a Secret")
        if key.wiped:
            raise errors.InvalidKeyMaterial(reason="the data key was already wiped")
        if not is_sector_size(sector_size):
            raise errors.InvalidInput(
                detail=f"XTS sector size {sector_size!r} is not supported (use 512 or 4096)")
        if engine not in ("auto", "openssl", "reference"):
            raise errors.InvalidInput(detail=f"unknown XTS engine {engine!r}")
        _check_key(key.view())
        self.sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES
        self._end_sector = MAX_TWEAK // self._tweak_step + 1   # first index out of range
        self._key = Secret(key.view())
        lib = libcrypto() if engine != "reference" else None
        if engine == "openssl" and lib is None:
            self._key.wipe()
            raise errors.EnvironmentProblem(
                detail="the system libcrypto (OpenSSL) cannot be loaded; "
                       "install it with `apt-get install libssl3`")
        if lib is not None:
            self._engine = OpenSslXts(self._key.view(), sector_size, lib)
        else:
            self._engine = ReferenceXts(self._key.view(), sector_size)
        self.engine_name = self._engine.name
        # The per-request path: OpenSslXts binds a lean version of
        # crypt_in_place (an instance attribute, found before the method).
        fast = getattr(self._engine, "fast_paths", None)
        fast = fast(self._checked_crypt_in_place) if fast is not None else None
        if fast is not None:
            self.crypt_in_place, self.crypt_at = fast
        else:
            self.crypt_at = None

    def _run(self, src, dst, sector_index: int, encrypt: bool) -> None:
        try:
            dst_view = memoryview(dst)
            src_view = dst_view if src is dst else memoryview(src)
        except TypeError as exc:
            raise errors.InvalidInput(detail=f"XTS needs bytes-like buffers: {exc}") from None
        nbytes = src_view.nbytes
        ss = self.sector_size
        # One combined test on the hot path; _check names what is wrong.
        if (dst_view.readonly or nbytes % ss or dst_view.nbytes != nbytes
                or not (src_view.c_contiguous and dst_view.c_contiguous)
                or type(sector_index) is not int or sector_index < 0
                or (sector_index + (nbytes // ss or 1) - 1) * self._tweak_step > MAX_TWEAK):
            self._check(src_view, dst_view, sector_index)
            sector_index = int(sector_index)          # an int subclass passed the checks
        self._dispatch(src_view, dst_view, nbytes, sector_index, encrypt)

    def _dispatch(self, src: memoryview, dst: memoryview, nbytes: int, sector_index: int,
                  encrypt: bool) -> None:
        """Hand a checked request to the engine (StateError once wiped)."""
        engine = self._engine
        if engine is None:
            raise errors.StateError(detail="the XTS cipher has been wiped; open the disk again")
        if nbytes:
            engine.crypt_into(src, dst, nbytes, sector_index * self._tweak_step, encrypt)

    def _check(self, src_view: memoryview, dst_view: memoryview, sector_index) -> None:
        """Raise InvalidInput naming the first thing wrong with a request."""
        if dst_view.readonly:
            raise errors.InvalidInput(detail="destination buffer is read-only")
        if not (src_view.c_contiguous and dst_view.c_contiguous):
            raise errors.InvalidInput(detail="XTS buffers must be contiguous")
        nbytes = src_view.nbytes
        if dst_view.nbytes != nbytes:
            raise errors.InvalidInput(
                detail=f"destination is {dst_view.nbytes} bytes, source {nbytes}")
        if isinstance(sector_index, bool) or not isinstance(sector_index, int):
            raise errors.InvalidInput(
                detail=f"sector index must be an int, got {type(sector_index).__name__}")
        if nbytes % self.sector_size:
            raise errors.InvalidInput(
                detail=f"buffer of {nbytes} bytes is not a multiple of the "
                       f"{self.sector_size}-byte sector size")
        if sector_index < 0:
            raise errors.InvalidInput(detail=f"sector index {sector_index} is negative")
        last = sector_index + max(nbytes // self.sector_size, 1) - 1
        if last * self._tweak_step > MAX_TWEAK:
            raise errors.InvalidInput(
                detail=f"sector {last} is beyond the 64-bit plain64 tweak range")

    # -- public API -------------------------------------------------------------

    def encrypt_into(self, src, dst, sector_index: int) -> None:
        """Encrypt ``src`` into ``dst`` (same length; ``dst`` may be ``src``)."""
        self._run(src, dst, sector_index, True)

    def decrypt_into(self, src, dst, sector_index: int) -> None:
        """Decrypt ``src`` into ``dst`` (same length; ``dst`` may be ``src``)."""
        self._run(src, dst, sector_index, False)

    def crypt_in_place(self, buf: memoryview, sector_index: int, encrypt: bool) -> None:
        """Encrypt (or decrypt) whole sectors of ``buf`` in place.

        The same bytes as ``encrypt_into(buf, buf, sector_index)``, for the
        backend's per-request path: ``buf`` must already be a writable,
        contiguous memoryview of bytes (format "B"), which saves making and
        checking views (a measurable part of a 4 KiB request).  Anything else
        raises InvalidInput, as the other methods do.  With the OpenSSL engine
        an instance attribute replaces this method
        (:meth:`OpenSslXts.fast_paths`); both give the same results
        and errors.
        """
        self._checked_crypt_in_place(buf, sector_index, encrypt)

    def _checked_crypt_in_place(self, buf: memoryview, sector_index: int,
                                encrypt: bool) -> None:
        """:meth:`crypt_in_place` through the generic checks and engine call."""
        ss = self.sector_size
        nbytes = len(buf) if type(buf) is memoryview else -1
        if (nbytes % ss or buf.readonly or not buf.c_contiguous or buf.format != "B"
                or type(sector_index) is not int or sector_index < 0
                or sector_index + nbytes // ss > self._end_sector):
            if type(buf) is not memoryview or buf.format != "B":
                raise errors.InvalidInput(
                    detail="crypt_in_place needs a memoryview of bytes (format 'B')")
            self._check(buf, buf, sector_index)
            sector_index = int(sector_index)          # an int subclass passed the checks
        self._dispatch(buf, buf, nbytes, sector_index, encrypt)

    def encrypt(self, data, sector_index: int) -> bytearray:
        out = bytearray(memoryview(data).nbytes)
        self._run(data, out, sector_index, True)
        return out

    def decrypt(self, data, sector_index: int) -> bytearray:
        out = bytearray(memoryview(data).nbytes)
        self._run(data, out, sector_index, False)
        return out

    def wipe(self) -> None:
        """Free OpenSSL contexts (cleansing key schedules) and overwrite the key copy.

        Requests already running in other threads finish with their worker's
        contexts, which are freed as the worker is returned; later calls
        raise StateError.
        """
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        self._key.wipe()

    def __del__(self):
        try:
            self.wipe()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "wiped" if self._engine is None else self.engine_name
        return f"<XtsCipher {CIPHER_NAME} sector_size={self.sector_size} {state}>"
