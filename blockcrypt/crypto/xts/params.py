"""What every XTS engine shares: the cipher's name and sizes, the tweak range,
the data-key check and the "wiped" error.

Owns only constants and the two checks; no engine code, no libcrypto.
"""
from __future__ import annotations

import hmac

from ... import errors
from ...constants import CIPHER_XTS, DK_BYTES

CIPHER_NAME = CIPHER_XTS
KEY_BYTES = DK_BYTES
IV_SECTOR_BYTES = 512          # plain64 counts the tweak in 512-byte units
MAX_TWEAK = 2**64 - 1          # plain64: 64-bit little-endian sector number


def check_key(key: bytes | bytearray | memoryview) -> memoryview:
    """Refuse keys that are not 64 bytes or whose halves are equal."""
    view = memoryview(key).cast("B")
    if len(view) != KEY_BYTES:
        raise errors.InvalidKeyMaterial(
            reason=f"an {CIPHER_NAME} key is {KEY_BYTES} bytes, got {len(view)}")
    if hmac.compare_digest(view[:32], view[32:]):
        raise errors.InvalidKeyMaterial(
            reason="the two halves of the XTS key are equal; generate a new data key")
    return view


def wiped() -> errors.StateError:
    """The error for a request on a cipher whose key has been wiped (callers raise it)."""
    return errors.StateError(detail="the XTS cipher has been wiped; open the disk again")
