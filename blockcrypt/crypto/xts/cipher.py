"""The public AES-256-XTS cipher (:class:`XtsCipher`): request checks, engine
choice (OpenSSL when libcrypto loads, else the reference) and wipe.

Owns the API the data path calls and the validation of every request; the
bytes are computed by an engine (:mod:`.openssl` or :mod:`.reference`).
"""
from __future__ import annotations

from ... import errors
from ...constants import is_sector_size
from ..secret import Secret
from .evp import libcrypto
from .openssl import OpenSslXts
from .params import CIPHER_NAME, IV_SECTOR_BYTES, MAX_TWEAK, check_key, wiped
from .reference import ReferenceXts


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
        check_key(key.view())
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
            raise wiped()
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
