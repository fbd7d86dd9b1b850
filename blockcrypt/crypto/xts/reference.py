"""The reference XTS engine: pyca ``cryptography``, one XTS cipher object per
sector (~7 us per 4096-byte sector, ~5 us per 512-byte one), obviously correct;
plus the unit-level functions known-answer tests use.

Owns nothing but pyca calls; never touches libcrypto through ctypes.
"""
from __future__ import annotations

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ... import errors
from .params import IV_SECTOR_BYTES, check_key, wiped


def _unit_cipher(key, tweak16: bytes) -> Cipher:
    if len(tweak16) != 16:
        raise errors.InvalidInput(detail=f"XTS tweak must be 16 bytes, got {len(tweak16)}")
    return Cipher(algorithms.AES(check_key(key)), modes.XTS(bytes(tweak16)))


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


class ReferenceXts:
    """pyca XTS, one Cipher object per sector: slow, obviously correct.

    ``crypt_into(src, dst, sector_index, encrypt)`` works on buffers already
    validated by :class:`~.cipher.XtsCipher`; ``dst`` may be ``src``.  Stateless
    apart from the key, hence thread-safe.
    """

    name = "reference"

    def __init__(self, key: memoryview, sector_size: int):
        self._key = key
        self._sector_size = sector_size
        self._tweak_step = sector_size // IV_SECTOR_BYTES

    def crypt_into(self, src: memoryview, dst: memoryview, sector_index: int,
                   encrypt: bool) -> None:
        key = self._key
        if key is None:
            raise wiped()
        src, dst = src.cast("B"), dst.cast("B")
        nbytes = src.nbytes
        tweak = sector_index * self._tweak_step
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
