"""The public AES-256-XTS cipher (:class:`XtsCipher`): request checks, engine
choice (the compiled engine, else the reference with a loud warning) and wipe.

Owns the API callers use and the validation of every request; the bytes are
computed by the compiled extension (:mod:`blockcrypt.crypto._datapath`, EVP
through libcrypto) or by :mod:`.reference` (pyca).
"""
from __future__ import annotations

from ... import errors
from ...constants import is_sector_size
from .. import compiled
from ..secret import Secret
from .params import CIPHER_NAME, IV_SECTOR_BYTES, MAX_TWEAK, check_key, wiped
from .reference import ReferenceXts

ENGINES = ("auto", "compiled", "reference")


class XtsCipher:
    """AES-256-XTS (dm-crypt aes-xts-plain64) over whole multi-sector buffers.

    ``sector_index`` is the index of the buffer's first sector in units of
    ``sector_size`` from the start of the data area; sector i has tweak
    ``i * (sector_size // 512)``.  ``dst`` may be ``src`` (in place) but must not
    partially overlap it.  Thread-safe; the compiled engine releases the GIL.

    The compiled engine copies the key straight from ``key`` into a page of its
    own (mlocked, MADV_DONTDUMP, cleansed by :meth:`wipe`) and keys a fresh EVP
    context per request, freed (cleansed) before the request returns; the caller
    may wipe ``key`` as soon as the constructor returns.  ``engine`` is "auto"
    (compiled when it loads, else the reference, with a warning on stderr),
    "compiled" or "reference".
    """

    def __init__(self, key: Secret, sector_size: int, *, engine: str = "auto"):
        if not isinstance(key, Secret):
            raise TypeError("XtsCipher needs the data key as a Secret")
        if key.wiped:
            raise errors.InvalidKeyMaterial(reason="the data key was already wiped")
        if not is_sector_size(sector_size):
            raise errors.InvalidInput(
                detail=f"XTS sector size {sector_size!r} is not supported (use 512 or 4096)")
        if engine not in ENGINES:
            raise errors.InvalidInput(detail=f"unknown XTS engine {engine!r}")
        check_key(key.view())
        self.sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES
        dp = compiled.datapath() if engine != "reference" else None
        if engine == "compiled" and dp is None:
            raise errors.EnvironmentProblem(
                detail=f"the compiled data path cannot be loaded ({compiled.why_missing()}); "
                       "reinstall blockcrypt with gcc, python3-dev and libssl-dev (make install)")
        self._key: Secret | None = None
        self.xts = None              # the compiled cipher (the backend's Disk uses it)
        if dp is not None:
            self.xts = dp.Xts(key.view(), sector_size)
            self._wiped_error = dp.WipedError
            self._engine = self.xts.crypt
            self.engine_name = "compiled"
        else:
            if engine == "auto":
                compiled.warn_slow("AES-256-XTS")
            self._key = Secret(key.view())            # pyca needs the key on every call
            self._reference = ReferenceXts(self._key.view(), sector_size)
            self._wiped_error = ()
            self._engine = self._reference.crypt_into
            self.engine_name = "reference"

    def _run(self, src, dst, sector_index: int, encrypt: bool) -> None:
        try:
            dst_view = memoryview(dst)
            src_view = dst_view if src is dst else memoryview(src)
        except TypeError as exc:
            raise errors.InvalidInput(detail=f"XTS needs bytes-like buffers: {exc}") from None
        nbytes = src_view.nbytes
        ss = self.sector_size
        if (dst_view.readonly or nbytes % ss or dst_view.nbytes != nbytes
                or not (src_view.c_contiguous and dst_view.c_contiguous)
                or type(sector_index) is not int or sector_index < 0
                or (sector_index + (nbytes // ss or 1) - 1) * self._tweak_step > MAX_TWEAK):
            self._check(src_view, dst_view, sector_index)
            sector_index = int(sector_index)          # an int subclass passed the checks
        self._dispatch(src_view, dst_view, sector_index, encrypt)

    def _dispatch(self, src: memoryview, dst: memoryview, sector_index: int,
                  encrypt: bool) -> None:
        """Hand a checked request to the engine (StateError once wiped)."""
        if self._engine is None:
            raise wiped()
        try:
            self._engine(src, dst, sector_index, encrypt)
        except self._wiped_error:
            raise wiped() from None
        except ValueError as exc:     # the compiled engine's checks (partial overlap)
            raise errors.InvalidInput(detail=str(exc)) from None

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
        """Encrypt (or decrypt) whole sectors of ``buf`` in place: the same bytes
        as ``encrypt_into(buf, buf, sector_index)``.  ``buf`` must be a
        writable, contiguous memoryview of bytes (format "B"); anything else
        raises InvalidInput, as the other methods do."""
        if type(buf) is not memoryview or buf.format != "B":
            raise errors.InvalidInput(
                detail="crypt_in_place needs a memoryview of bytes (format 'B')")
        self._run(buf, buf, sector_index, encrypt)

    def encrypt(self, data, sector_index: int) -> bytearray:
        out = bytearray(memoryview(data).nbytes)
        self._run(data, out, sector_index, True)
        return out

    def decrypt(self, data, sector_index: int) -> bytearray:
        out = bytearray(memoryview(data).nbytes)
        self._run(data, out, sector_index, False)
        return out

    @property
    def wiped(self) -> bool:
        return self._engine is None

    def wipe(self) -> None:
        """Cleanse the key (the compiled engine waits for running requests);
        later calls raise StateError."""
        self._engine = None
        if self.xts is not None:
            self.xts.wipe()
        if self._key is not None:
            self._reference.close()
            self._key.wipe()

    def __del__(self):
        try:
            self.wipe()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "wiped" if self._engine is None else self.engine_name
        return f"<XtsCipher {CIPHER_NAME} sector_size={self.sector_size} {state}>"

