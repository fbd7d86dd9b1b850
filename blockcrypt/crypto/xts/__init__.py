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

- :mod:`.reference`: pyca ``cryptography``, one XTS cipher object per sector.
- :mod:`.openssl`: the system libcrypto through ctypes (:mod:`.evp`), pooled
  keyed workers (:mod:`.workers`), and for large 512-byte-sector requests a
  numpy bulk path (:mod:`.bulk`).

:class:`XtsCipher` (:mod:`.cipher`) checks requests and picks OpenSslXts when
libcrypto loads, else the reference.  :mod:`.params` holds what they share.
The issue on the compiled data path replaces these engines; until then they
are kept as they were measured, not reworked.
"""
from __future__ import annotations

from .cipher import XtsCipher
from .evp import libcrypto
from .openssl import OpenSslXts
from .params import (
    BULK_CHUNK_SECTORS,
    BULK_MIN_SECTORS,
    CIPHER_NAME,
    IV_SECTOR_BYTES,
    KEY_BYTES,
    MAX_TWEAK,
)
from .reference import ReferenceXts, xts_decrypt_unit, xts_encrypt_unit

__all__ = ["BULK_CHUNK_SECTORS", "BULK_MIN_SECTORS", "CIPHER_NAME", "IV_SECTOR_BYTES",
           "KEY_BYTES", "MAX_TWEAK", "OpenSslXts", "ReferenceXts", "XtsCipher", "libcrypto",
           "xts_decrypt_unit", "xts_encrypt_unit"]
