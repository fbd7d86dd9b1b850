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

- the compiled engine, ``Xts`` of :mod:`blockcrypt.crypto._datapath` (C,
  libcrypto's EVP API, the GIL released), loaded by :mod:`..compiled`;
- :mod:`.reference`: pyca ``cryptography``, one XTS cipher object per sector,
  the fallback (with a loud warning) when the extension cannot be loaded.

:class:`XtsCipher` (:mod:`.cipher`) checks requests and picks the engine;
:mod:`.params` holds what they share.
"""
from __future__ import annotations

from .cipher import ENGINES, XtsCipher
from .params import CIPHER_NAME, IV_SECTOR_BYTES, KEY_BYTES, MAX_TWEAK
from .reference import ReferenceXts, xts_decrypt_unit, xts_encrypt_unit

__all__ = ["CIPHER_NAME", "ENGINES", "IV_SECTOR_BYTES", "KEY_BYTES", "MAX_TWEAK",
           "ReferenceXts", "XtsCipher", "xts_decrypt_unit", "xts_encrypt_unit"]
