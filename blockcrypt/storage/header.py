"""The container header codec: the header, its fields, and one copy's bytes.

The normative specification is ``docs/FORMAT.md``; rule ids (``F-n``) cited
here refer to it.  This module owns the version 1 header (§3): the
:class:`Header` value, its constants and byte layout, the field rules
(F-5..F-18), :func:`encode_copy` / :func:`decode_copy`, the key context that
binds a wrapped DK to its container (F-20) and the dm-crypt mapping (§6).  It
does no I/O: reading, writing and locking container files is
:mod:`blockcrypt.storage.container`.  It never sees a plaintext key:
``wrapped_dk`` is an opaque blob of the key store.

Parsing is total: every malformed input raises a subclass of
:class:`errors.FormatError`, never another exception (F-24).  The header
checksum detects damage, not tampering; tampering with the fields bound by
:func:`key_context` makes unwrapping the DK fail (F-19, F-20).
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import os
import struct
from dataclasses import dataclass

from .. import errors
from ..constants import CIPHER_NONE, CIPHER_XTS, is_sector_size

MAGIC = b"BLKCRYPT"                 # F-6
FORMAT_VERSION = 1                  # F-8
DATA_ALIGN = 1 << 20                # F-2: data area alignment and minimum offset
COPY_SIZE = 4096                    # F-5: one header copy
CHECKSUM_SIZE = 32                  # SHA-256
BODY_SIZE = COPY_SIZE - CHECKSUM_SIZE   # checksum covers bytes [0, 4064)
COPY_OFFSETS = (0, 512 * 1024)      # F-21: copy A, copy B
COPY_NAMES = ("A", "B")
CIPHERS = (CIPHER_XTS, CIPHER_NONE)  # F-14
ID_BYTES = 16                       # uid and lineage id: 128 random bits (F-17, F-18)
MAX_FILE_BYTES = 2**63 - 1          # F-13: off_t is signed 64-bit
MAX_SEQ = 2**64 - 1                 # u64; never wraps (F-25)
MAX_CIPHER_NAME = 32                # F-14
MAX_CMK_ID = 255                    # u8 length
MAX_CMK_VERSION = 2**32 - 1         # u32
MAX_WRAPPED_DK = 1024               # F-16; the key store's blob is < 256 bytes
KEY_CONTEXT_DOMAIN = "blockcrypt-dk-v1"  # F-20

# Layout of a version 1 header copy (F-5, docs/FORMAT.md §3.2), little-endian:
#
#   offset  size  field
#   0       8     magic "BLKCRYPT"
#   8       2     version           u16 = 1
#   10      1     kind              u8: 1 disk, 2 snapshot
#   11      1     flags             u8: bit 0 encrypted, bits 1-7 zero
#   12      4     sector_size       u32: 512 | 4096
#   16      8     seq               u64
#   24      16    uid
#   40      8     size_bytes        u64
#   48      8     data_offset       u64
#   56      1     cipher_len        u8: 1..32
#   57      c     cipher            ASCII
#   -- key section, only if encrypted, at k = 57 + c:
#   k       16    lineage_id
#   k+16    4     cmk_version       u32 >= 1
#   k+20    1     cmk_id_len        u8: 1..255
#   k+21    n     cmk_id            UTF-8
#   k+21+n  2     wrapped_dk_len    u16: 1..1024
#   k+23+n  m     wrapped_dk
#   --
#   ...           zero padding up to 4064
#   4064    32    SHA-256 of bytes [0, 4064)
#
# Largest content: 57 + 32 + 16 + 4 + 1 + 255 + 2 + 1024 = 1391 <= BODY_SIZE.
_FIXED = struct.Struct("<8sHBBIQ16sQQB")
_KEY_FIXED = struct.Struct("<16sIB")
_U16 = struct.Struct("<H")
_VERSION_OFFSET = 8
_FLAG_ENCRYPTED = 0x01
assert _FIXED.size == 57 and _KEY_FIXED.size == 21
assert _FIXED.size + MAX_CIPHER_NAME + _KEY_FIXED.size + MAX_CMK_ID + _U16.size \
    + MAX_WRAPPED_DK <= BODY_SIZE


class Kind(str, enum.Enum):
    DISK = "disk"
    SNAPSHOT = "snapshot"


_KIND_CODES = {Kind.DISK: 1, Kind.SNAPSHOT: 2}
_KINDS_BY_CODE = {v: k for k, v in _KIND_CODES.items()}


@dataclass(frozen=True)
class Header:
    """One container header (docs/FORMAT.md §3).  Key fields are None when unencrypted."""

    kind: Kind
    uid: bytes
    size_bytes: int
    sector_size: int
    encrypted: bool
    cipher: str
    data_offset: int
    cmk_id: str | None
    cmk_version: int | None
    lineage_id: bytes | None
    wrapped_dk: bytes | None = dataclasses.field(repr=False)
    seq: int = 0

    def __post_init__(self):
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError:
            raise errors.InvalidInput(detail=f"container kind {self.kind!r} is not "
                                      "'disk' or 'snapshot'") from None
        for name in ("uid", "lineage_id", "wrapped_dk"):
            value = getattr(self, name)
            if isinstance(value, (bytearray, memoryview)):
                object.__setattr__(self, name, bytes(value))

    def replace(self, **changes) -> "Header":
        return dataclasses.replace(self, **changes)

    @property
    def uid_hex(self) -> str:
        return self.uid.hex()

    @property
    def lineage_hex(self) -> str | None:
        return None if self.lineage_id is None else self.lineage_id.hex()

    @property
    def file_size_bytes(self) -> int:
        """Length of a freshly created container file (F-1)."""
        return self.data_offset + self.size_bytes


def data_offset_for(size_bytes: int, sector_size: int) -> int:
    """Offset of the data area for a new container: 1 MiB in version 1 (F-2).

    The header area does not depend on the geometry; the parameters are here
    so a later version can choose differently without changing callers.
    """
    return DATA_ALIGN


def new_header(kind: Kind | str, size_bytes: int, sector_size: int, *, encrypted: bool,
               uid: bytes | None = None, cmk_id: str | None = None,
               cmk_version: int | None = None, lineage_id: bytes | None = None,
               wrapped_dk: bytes | None = None) -> Header:
    """A validated header for a new container (seq 0).

    uid and (for encrypted containers) lineage_id are drawn from os.urandom
    when not given (F-17, F-18).  An encrypted header needs cmk_id now (it is
    part of :func:`key_context`); cmk_version and wrapped_dk may be filled in
    with :meth:`Header.replace` once the key store has wrapped the DK.
    Raises InvalidSize, UnsupportedSectorSize or InvalidInput.
    """
    if not is_sector_size(sector_size):
        raise errors.UnsupportedSectorSize(
            f"sector size {sector_size!r} is not supported (use 512 or 4096)",
            path=None, sector_size=sector_size)
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes <= 0:
        raise errors.InvalidSize(size=size_bytes, reason="the size must be a positive "
                                 "number of bytes")
    if size_bytes % sector_size:
        raise errors.InvalidSize(size=size_bytes, reason=f"the size must be a multiple of "
                                 f"the sector size ({sector_size} bytes)")
    data_offset = data_offset_for(size_bytes, sector_size)
    if size_bytes > MAX_FILE_BYTES - data_offset:
        largest = (MAX_FILE_BYTES - data_offset) // sector_size * sector_size
        raise errors.InvalidSize(size=size_bytes, reason=f"the largest size is {largest} "
                                 "bytes (file offsets are signed 64-bit)")
    if encrypted:
        if not cmk_id:
            raise errors.InvalidInput(detail="an encrypted container needs the id of "
                                      "the customer master key that wraps its data key")
        lineage_id = os.urandom(ID_BYTES) if lineage_id is None else lineage_id
        cipher = CIPHER_XTS
    else:
        if any(v is not None for v in (cmk_id, cmk_version, lineage_id, wrapped_dk)):
            raise errors.InvalidInput(detail="an unencrypted container carries no key "
                                      "fields (CMK id, version, lineage id, wrapped key)")
        cipher = CIPHER_NONE
    header = Header(kind=kind, uid=os.urandom(ID_BYTES) if uid is None else uid,
                    size_bytes=size_bytes, sector_size=sector_size,
                    encrypted=bool(encrypted), cipher=cipher, data_offset=data_offset,
                    cmk_id=cmk_id, cmk_version=cmk_version, lineage_id=lineage_id,
                    wrapped_dk=wrapped_dk)
    _check_fields(header, "new header", partial=True)
    return header


def key_context(header: Header) -> dict[str, str]:
    """The key store's encryption context for this container's DK (F-20).

    It is the AES-GCM associated data of the wrapped DK: changing any value
    here (uid, lineage id, cipher, sector size, size, data offset, CMK id), or
    moving the wrapped DK into another header, makes unwrapping fail.
    wrapped_dk, cmk_version, seq and kind are deliberately not bound.
    """
    if not header.encrypted or header.lineage_id is None or not header.cmk_id:
        raise errors.InvalidInput(detail=f"container {header.uid_hex} is unencrypted or "
                                  "lacks its key fields; it has no data key context")
    return {
        "domain": KEY_CONTEXT_DOMAIN,
        "container_uid": header.uid_hex,
        "lineage_id": header.lineage_id.hex(),
        "cipher": header.cipher,
        "sector_size": str(header.sector_size),
        "size_bytes": str(header.size_bytes),
        "data_offset": str(header.data_offset),
        "cmk_id": header.cmk_id,
    }


def cryptsetup_argv(header: Header, path: os.PathLike | str, key_file: str,
                    name: str) -> list[str]:
    """The cryptsetup command that maps the data area with dm-crypt (FORMAT.md §6).

    key_file holds the 64-byte DK; it is a path, never the key itself.
    """
    if not header.encrypted:
        raise errors.InvalidInput(detail="an unencrypted container needs no dm-crypt "
                                  "mapping; its data area is plaintext")
    return ["cryptsetup", "open", "--type", "plain", "--cipher", CIPHER_XTS,
            "--key-size", "512", "--key-file", key_file, "--keyfile-size", "64",
            "--offset", str(header.data_offset // 512), "--skip", "0",
            "--sector-size", str(header.sector_size), "--readonly",
            os.fspath(path), name]


# --- encoding and decoding of one copy ------------------------------------------

def _check_fields(h: Header, where: str, *, partial: bool = False) -> None:
    """Semantic rules F-9..F-17 (partial: cmk_version/wrapped_dk may still be None)."""
    if not is_sector_size(h.sector_size):
        raise errors.UnsupportedSectorSize(path=where, sector_size=h.sector_size)
    for name in ("size_bytes", "data_offset", "seq"):
        if not isinstance(getattr(h, name), int) or getattr(h, name) < 0:
            raise errors.BadGeometry(path=where, reason=f"{name} must be a non-negative "
                                     "integer")
    if h.size_bytes == 0 or h.size_bytes % h.sector_size:
        raise errors.BadGeometry(path=where, reason=f"size {h.size_bytes} is not a "
                                 f"non-zero multiple of the sector size {h.sector_size}")
    if h.data_offset < DATA_ALIGN or h.data_offset % DATA_ALIGN:
        raise errors.BadGeometry(path=where, reason=f"data offset {h.data_offset} is not "
                                 "a non-zero multiple of 1 MiB")
    if h.data_offset + h.size_bytes > MAX_FILE_BYTES:
        raise errors.BadGeometry(path=where, reason=f"data offset {h.data_offset} + size "
                                 f"{h.size_bytes} exceeds 2^63 - 1")
    if h.seq > MAX_SEQ:
        raise errors.BadGeometry(path=where, reason="sequence number exceeds 2^64 - 1")
    if not isinstance(h.cipher, str) or h.cipher not in CIPHERS:
        raise errors.UnknownCipher(path=where, cipher=h.cipher)
    if h.encrypted != (h.cipher == CIPHER_XTS):
        raise errors.MalformedHeader(path=where, reason=f"cipher {h.cipher!r} contradicts "
                                 f"the encrypted flag ({h.encrypted})")
    if not isinstance(h.uid, bytes) or len(h.uid) != ID_BYTES or not any(h.uid):
        raise errors.MalformedHeader(path=where, reason="uid must be 16 random bytes")
    if not h.encrypted:
        if any(v is not None for v in (h.cmk_id, h.cmk_version, h.lineage_id, h.wrapped_dk)):
            raise errors.MalformedHeader(path=where, reason="an unencrypted container "
                                     "carries key fields")
        return
    if not isinstance(h.lineage_id, bytes) or len(h.lineage_id) != ID_BYTES \
            or not any(h.lineage_id):
        raise errors.MalformedHeader(path=where, reason="lineage id must be 16 random bytes")
    if not isinstance(h.cmk_id, str) or not h.cmk_id or not h.cmk_id.isprintable() \
            or len(h.cmk_id.encode("utf-8", "surrogatepass")) > MAX_CMK_ID:
        raise errors.MalformedHeader(path=where, reason="CMK id must be 1-255 bytes of "
                                 "printable UTF-8")
    if h.cmk_version is None and partial:
        pass
    elif not isinstance(h.cmk_version, int) or not 1 <= h.cmk_version <= MAX_CMK_VERSION:
        raise errors.MalformedHeader(path=where, reason=f"CMK version {h.cmk_version!r} is "
                                 "not in 1..2^32-1")
    if h.wrapped_dk is None and partial:
        pass
    elif not isinstance(h.wrapped_dk, bytes) or not 1 <= len(h.wrapped_dk) <= MAX_WRAPPED_DK:
        raise errors.MalformedHeader(path=where, reason=f"wrapped data key must be 1-"
                                 f"{MAX_WRAPPED_DK} bytes")


def encode_copy(header: Header) -> bytes:
    """The 4096 bytes of one header copy (both slots get the same bytes)."""
    _check_fields(header, "header to write")
    cipher = header.cipher.encode("ascii")
    flags = _FLAG_ENCRYPTED if header.encrypted else 0
    parts = [_FIXED.pack(MAGIC, FORMAT_VERSION, _KIND_CODES[header.kind], flags,
                         header.sector_size, header.seq, header.uid, header.size_bytes,
                         header.data_offset, len(cipher)), cipher]
    if header.encrypted:
        cmk_id = header.cmk_id.encode("utf-8")
        parts += [_KEY_FIXED.pack(header.lineage_id, header.cmk_version, len(cmk_id)),
                  cmk_id, _U16.pack(len(header.wrapped_dk)), header.wrapped_dk]
    body = b"".join(parts).ljust(BODY_SIZE, b"\0")
    return body + hashlib.sha256(body).digest()


def decode_copy(raw: bytes, *, path: str = "header copy") -> Header:
    """Parse and validate one 4096-byte copy (F-5..F-17).

    Raises only FormatError subclasses: Truncated (short input), BadMagic,
    ChecksumMismatch, UnknownVersion, UnsupportedSectorSize, BadGeometry,
    UnknownCipher, or FormatError for a malformed field.
    """
    raw = bytes(raw)
    if len(raw) != COPY_SIZE:
        if len(raw) < COPY_SIZE:
            raise errors.Truncated(path=path, size=len(raw), need=COPY_SIZE)
        raise errors.MalformedHeader(path=path, reason=f"a header copy is {COPY_SIZE} bytes, "
                                 f"got {len(raw)}")
    if raw[:len(MAGIC)] != MAGIC:
        raise errors.BadMagic(path=path)
    body = raw[:BODY_SIZE]
    if hashlib.sha256(body).digest() != raw[BODY_SIZE:]:
        raise errors.ChecksumMismatch(f"{path}: checksum mismatch", path=path)
    (version,) = _U16.unpack_from(raw, _VERSION_OFFSET)
    if version != FORMAT_VERSION:
        raise errors.UnknownVersion(path=path, version=version)

    (_, _, kind_code, flags, sector_size, seq, uid, size_bytes, data_offset,
     cipher_len) = _FIXED.unpack_from(body, 0)
    if kind_code not in _KINDS_BY_CODE:
        raise errors.MalformedHeader(path=path, reason=f"unknown kind code {kind_code}")
    if flags & ~_FLAG_ENCRYPTED:
        raise errors.MalformedHeader(path=path, reason=f"unknown flags 0x{flags:02x}")
    if not 1 <= cipher_len <= MAX_CIPHER_NAME:
        raise errors.MalformedHeader(path=path, reason=f"cipher name length {cipher_len} is "
                                 f"not in 1..{MAX_CIPHER_NAME}")
    pos = _FIXED.size
    cipher_raw = body[pos:pos + cipher_len]
    pos += cipher_len
    try:
        cipher = cipher_raw.decode("ascii")
    except UnicodeDecodeError:
        raise errors.UnknownCipher(path=path, cipher=cipher_raw) from None
    encrypted = bool(flags & _FLAG_ENCRYPTED)
    cmk_id = cmk_version = lineage_id = wrapped_dk = None
    if encrypted:
        # pos <= 57 + 32 = 89, so the fixed key part always fits in the body.
        lineage_id, cmk_version, cmk_id_len = _KEY_FIXED.unpack_from(body, pos)
        pos += _KEY_FIXED.size
        cmk_raw = body[pos:pos + cmk_id_len]
        pos += cmk_id_len
        # pos <= 89 + 21 + 255 = 365: the length word fits too.
        (wrapped_len,) = _U16.unpack_from(body, pos)
        pos += _U16.size
        if not 1 <= wrapped_len <= MAX_WRAPPED_DK:
            raise errors.MalformedHeader(path=path, reason=f"wrapped data key length "
                                     f"{wrapped_len} is not in 1..{MAX_WRAPPED_DK}")
        wrapped_dk = body[pos:pos + wrapped_len]
        pos += wrapped_len       # <= 367 + 1024 = 1391 <= BODY_SIZE
        try:
            cmk_id = cmk_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.MalformedHeader(path=path, reason="CMK id is not valid UTF-8") from None
    padding = body[pos:]
    if any(padding):
        first = pos + len(padding) - len(padding.lstrip(b"\0"))
        raise errors.MalformedHeader(path=path, reason=f"non-zero padding at offset {first}")
    header = Header(kind=_KINDS_BY_CODE[kind_code], uid=uid, size_bytes=size_bytes,
                    sector_size=sector_size, encrypted=encrypted, cipher=cipher,
                    data_offset=data_offset, cmk_id=cmk_id, cmk_version=cmk_version,
                    lineage_id=lineage_id, wrapped_dk=wrapped_dk, seq=seq)
    _check_fields(header, path)
    return header
