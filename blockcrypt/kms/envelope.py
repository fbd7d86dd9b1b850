"""Envelope encryption: the wrapped data-key blob, and wrap / unwrap under a CMK version.

A data key (DK) is 64 random bytes (AES-256-XTS: K1 || K2, halves always
different).  It is stored only as a *wrapped blob*: AES-256-GCM under one version
of a customer master key (CMK), whose material never leaves the key store.

Layout (integers big-endian; the blob describes itself, so a future format or
algorithm can be told apart and refused with a clear error)::

    offset   size  field
    0        4     magic  b"BCWK"  (BlockCrypt Wrapped Key)
    4        1     format version   = 1
    5        1     algorithm id     = 1  (AES-256-GCM over a 64-byte DK, by the
                                          ``local`` provider in software)
                                     = 2  (the same AES-256-GCM, computed inside a
                                          PKCS#11 token by a ``pkcs11`` provider)
                                     = 3  (the same AES-256-GCM, computed by a KMIP
                                          server for a ``kmip`` provider)
    6        1     key id length L  (1..64)
    7        L     key id           (ASCII: A-Z a-z 0-9 . _ -)
    7+L      4     key version      (>= 1)
    11+L     12    nonce            (random; at most a few wraps per disk, far
                                     below GCM's 2^32 random-nonce bound per key)
    23+L     80    ciphertext (64) || GCM tag (16)
    total    103 + L bytes

Algorithm 3 (``kmip``) inserts, after the key version, the server's name for the
version's key object, so that any host the server authorises can unwrap the blob
with nothing but the blob (``blockcrypt disk import``)::

    11+L     1     server uid length U (1..128)
    12+L     U     server uid         (the KMIP Unique Identifier, printable ASCII)
    12+L+U   12    nonce
    24+L+U   80    ciphertext (64) || GCM tag (16)
    total    104 + L + U bytes

The *header* is bytes ``[0, 11+L)`` (``[0, 12+L+U)`` for algorithm 3).  Associated data = header || canonical JSON
of the encryption context (keys sorted, no whitespace, UTF-8).  The header is
self-delimiting, so the concatenation is unambiguous.  Hence changing the key id,
the key version, the format/algorithm bytes, or any context entry makes unwrap
fail authentication; the caller binds the DK to the container it protects by
putting the container's identity in the context.  The algorithm id names the kind
of provider that made the blob and the key id names the key, whose catalog entry
names its provider (:mod:`blockcrypt.kms.providers_schema`); both are authenticated.
"""
from __future__ import annotations

import hmac
import json
import os
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import errors
from ..constants import DK_BYTES
from ..crypto.secret import Secret

MAGIC = b"BCWK"
FORMAT_VERSION = 1
ALG_AES256GCM_DK64 = 1
ALG_PKCS11_AES256GCM_DK64 = 2
ALG_KMIP_AES256GCM_DK64 = 3
ALGORITHMS = (ALG_AES256GCM_DK64, ALG_PKCS11_AES256GCM_DK64, ALG_KMIP_AES256GCM_DK64)
MAX_SERVER_REF_BYTES = 128
CMK_BYTES = 32            # AES-256-GCM key per CMK version
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_KEY_ID_BYTES = 64
MAX_CONTEXT_BYTES = 4096  # canonical JSON; a container context is ~300 bytes

_FIXED = len(MAGIC) + 1 + 1 + 1          # magic, version, algorithm, key id length
_VERSION_FMT = ">I"
_KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class WrappedKey:
    """A parsed blob.  ``header`` is the authenticated prefix (see module doc)."""

    format_version: int
    algorithm: int
    key_id: str
    key_version: int
    nonce: bytes
    ciphertext: bytes   # includes the 16-byte tag
    header: bytes
    server_ref: str | None = None   # algorithm 3: the KMIP server's uid of the version


def blob_size(key_id_len: int, server_ref_len: int | None = None) -> int:
    """Bytes of a blob; ``server_ref_len`` only for algorithm 3 (its uid field)."""
    ref = 0 if server_ref_len is None else 1 + server_ref_len
    return _FIXED + key_id_len + 4 + ref + NONCE_BYTES + DK_BYTES + TAG_BYTES


def parse_wrapped(blob) -> WrappedKey:
    """Parse a wrapped-DK blob.  Raises only :class:`~blockcrypt.errors.BlobFormatError`."""
    try:
        data = bytes(memoryview(blob))
    except (TypeError, ValueError):
        raise errors.BlobFormatError(reason=f"expected bytes, got {type(blob).__name__}") from None
    if len(data) < _FIXED:
        raise errors.BlobFormatError(reason=f"{len(data)} bytes is too short")
    if data[:4] != MAGIC:
        raise errors.BlobFormatError(reason="bad magic (not a blockcrypt wrapped key)")
    version, algorithm, id_len = data[4], data[5], data[6]
    if version != FORMAT_VERSION:
        raise errors.BlobFormatError(
            reason=f"format version {version} is not supported by this blockcrypt; upgrade it")
    if algorithm not in ALGORITHMS:
        raise errors.BlobFormatError(reason=f"unknown algorithm id {algorithm}")
    if not 1 <= id_len <= MAX_KEY_ID_BYTES:
        raise errors.BlobFormatError(reason=f"key id length {id_len} out of range 1..64")
    ref_len = None
    if algorithm == ALG_KMIP_AES256GCM_DK64:
        at = _FIXED + id_len + 4
        ref_len = data[at] if len(data) > at else 0
        if not 1 <= ref_len <= MAX_SERVER_REF_BYTES:
            raise errors.BlobFormatError(reason=f"server uid length {ref_len} out of range "
                                                f"1..{MAX_SERVER_REF_BYTES}")
    if len(data) != blob_size(id_len, ref_len):
        raise errors.BlobFormatError(
            reason=f"length {len(data)} bytes, expected {blob_size(id_len, ref_len)}")
    raw_id = data[_FIXED:_FIXED + id_len]
    key_id = raw_id.decode("ascii", errors="replace")
    if not _KEY_ID_RE.fullmatch(key_id):
        raise errors.BlobFormatError(reason="key id has characters outside A-Z a-z 0-9 . _ -")
    pos = _FIXED + id_len
    (key_version,) = struct.unpack_from(_VERSION_FMT, data, pos)
    if key_version < 1:
        raise errors.BlobFormatError(reason="key version 0")
    pos += 4
    server_ref = None
    if ref_len is not None:
        raw_ref = data[pos + 1:pos + 1 + ref_len]
        if not all(0x21 <= c <= 0x7E for c in raw_ref):
            raise errors.BlobFormatError(reason="server uid has characters outside printable "
                                                "ASCII")
        server_ref = raw_ref.decode("ascii")
        pos += 1 + ref_len
    return WrappedKey(format_version=version, algorithm=algorithm, key_id=key_id,
                      key_version=key_version, nonce=data[pos:pos + NONCE_BYTES],
                      ciphertext=data[pos + NONCE_BYTES:], header=data[:pos],
                      server_ref=server_ref)


def canonical_context(context) -> bytes:
    """Canonical JSON of an encryption context: a dict of non-empty str -> str."""
    if not isinstance(context, dict):
        raise errors.InvalidInput(detail="the encryption context must be a dict of strings")
    for k, v in context.items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise errors.InvalidInput(
                detail=f"encryption context entry {k!r} must map a non-empty string to a string")
    out = json.dumps(context, sort_keys=True, separators=(",", ":"),
                     ensure_ascii=False).encode("utf-8")
    if len(out) > MAX_CONTEXT_BYTES:
        raise errors.InvalidInput(
            detail=f"encryption context is {len(out)} bytes; the limit is {MAX_CONTEXT_BYTES}")
    return out


def _header(key_id: str, key_version: int, algorithm: int = ALG_AES256GCM_DK64,
            server_ref: str | None = None) -> bytes:
    if not _KEY_ID_RE.fullmatch(key_id):
        raise errors.InvalidInput(detail=f"key id {key_id!r} cannot be stored in a blob")
    raw_id = key_id.encode("ascii")
    out = (MAGIC + bytes([FORMAT_VERSION, algorithm, len(raw_id)]) + raw_id
           + struct.pack(_VERSION_FMT, key_version))
    if (server_ref is None) != (algorithm != ALG_KMIP_AES256GCM_DK64):
        raise errors.InvalidInput(detail="a server uid goes in kmip blobs, and only there")
    if server_ref is not None:
        raw_ref = server_ref.encode("ascii", errors="replace")
        if (not 1 <= len(raw_ref) <= MAX_SERVER_REF_BYTES
                or not all(0x21 <= c <= 0x7E for c in raw_ref)):
            raise errors.InvalidInput(detail=f"server uid {server_ref!r} cannot be stored in a "
                                             "blob (1-128 printable ASCII characters)")
        out += bytes([len(raw_ref)]) + raw_ref
    return out


def seal_parts(key_id: str, key_version: int, context: dict,
               algorithm: int, server_ref: str | None = None) -> tuple[bytes, bytes, bytes]:
    """(header, fresh nonce, associated data) for a blob whose GCM runs elsewhere
    (in a token, on a KMIP server): the caller returns ``header + nonce + ciphertext||tag``."""
    header = _header(key_id, key_version, algorithm, server_ref)
    return header, os.urandom(NONCE_BYTES), header + canonical_context(context)


def unwrap_failed(parsed: WrappedKey) -> errors.UnwrapError:
    """The one error for a blob that does not open (wrong context, altered, other key)."""
    return errors.UnwrapError(
        what=f"a blob wrapped by key {parsed.key_id} version {parsed.key_version}",
        reason="the encryption context does not match (the blob belongs to another "
               "container, or the container's header was changed) or the blob was "
               "altered")


def new_data_key() -> Secret:
    """64 random bytes whose halves differ (XTS requires K1 != K2)."""
    while True:
        dk = Secret.random(DK_BYTES)
        v = dk.view()
        if not hmac.compare_digest(v[:DK_BYTES // 2], v[DK_BYTES // 2:]):
            return dk
        dk.wipe()  # probability 2^-256; loop rather than ever return a weak key


def wrap(cmk: Secret, key_id: str, key_version: int, dk: Secret, context: dict) -> bytes:
    """Wrap a 64-byte DK under one CMK version, bound to the context."""
    if len(dk) != DK_BYTES:
        raise errors.InvalidKeyMaterial(reason=f"data key is {len(dk)} bytes, need {DK_BYTES}")
    header = _header(key_id, key_version)
    nonce = os.urandom(NONCE_BYTES)
    ct = AESGCM(cmk.view()).encrypt(nonce, dk.view(), header + canonical_context(context))
    return header + nonce + ct


def unwrap(cmk: Secret, parsed: WrappedKey, context: dict) -> Secret:
    """Unwrap a parsed blob with the CMK version it names; UnwrapError on any mismatch."""
    aad = parsed.header + canonical_context(context)
    dk = Secret(DK_BYTES)
    try:
        AESGCM(cmk.view()).decrypt_into(parsed.nonce, parsed.ciphertext, aad, dk.view())
    except InvalidTag:
        dk.wipe()
        raise unwrap_failed(parsed) from None
    return dk
