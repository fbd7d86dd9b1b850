"""The on-disk container: header copies, geometry, creation and header updates.

The normative specification is ``docs/FORMAT.md``; rule ids (``F-n``) cited
here refer to it.  One file holds one disk or snapshot: two 4096-byte header
copies in the first MiB (copy A at 0, copy B at 512 KiB), then the data area at
``data_offset`` (1 MiB).  This module never touches the data area (the cipher
and the backend do) and never sees a plaintext key: ``wrapped_dk`` is an opaque
blob of the key store, authenticated together with :func:`key_context`.

Security properties:

- Parsing is total: every malformed input raises a subclass of
  :class:`errors.FormatError`, never another exception, and a refused
  container is never written (F-24).
- Header updates are crash-safe: at every instant at least one copy is valid
  and holds the old or the new header (F-25, F-26).
- The header checksum detects damage, not tampering; tampering with the fields
  bound by :func:`key_context` makes unwrapping the DK fail (F-19, F-20).
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import fcntl
import hashlib
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable

from .. import errors
from ..constants import CIPHER_NONE, CIPHER_XTS, SECTOR_SIZES, is_sector_size  # noqa: F401
from .home import create_private_file, fsync_dir

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

# Test seam for crash simulation: called with a step name ("write:B",
# "fsync:B", "write:A", "fsync:A") before each step of a header update (F-25).
# A hook that raises aborts the update at that point, as a crash would.
_fault_hook: Callable[[str], None] | None = None


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


# --- file access ------------------------------------------------------------------

def _pread(fd: int, length: int, offset: int) -> bytes:
    """Up to length bytes at offset (fewer only at end of file)."""
    chunks, got = [], 0
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _storage_error(path: str, exc: OSError) -> errors.BlockcryptError:
    return errors.storage_error(path, exc, "container file")


# struct flock for F_OFD_SETLKW (Linux x86-64/arm64): l_type, l_whence, l_start,
# l_len, l_pid (must be 0 for OFD locks), padding to 32 bytes.
_FLOCK = struct.Struct("@hhqqi4x")


def _open_locked(path: str, writable: bool) -> int:
    """Open an existing container and lock its header area (F-25, F-27).

    The lock is an open-file-description byte-range lock on [0, 1 MiB)
    (exclusive when writable, shared otherwise).  On Linux it is independent
    of the whole-file flock a server holds while it serves the disk
    (backend.py), so reading the header of a served disk never waits for the
    server; it only waits for an in-flight header update, which takes
    milliseconds.
    """
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    lock = _FLOCK.pack(fcntl.F_WRLCK if writable else fcntl.F_RDLCK, os.SEEK_SET, 0,
                       DATA_ALIGN, 0)
    while True:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, lock)
            return fd
        except InterruptedError:
            continue
        except OSError as exc:
            os.close(fd)
            raise _storage_error(path, exc) from None


@dataclass
class _Loaded:
    header: Header
    raw: bytes                  # the winner's bytes
    winner: int                 # slot index of the winning copy
    stale: list[int]            # slots whose bytes differ from the winner's
    file_size: int


def _load(fd: int, path: str) -> _Loaded:
    """Read both copies and select the winner (F-22, F-23, F-8)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.FormatError(path=path, reason="not a regular file")
        file_size = st.st_size
        raws = [_pread(fd, COPY_SIZE, off) for off in COPY_OFFSETS]
    except OSError as exc:
        raise _storage_error(path, exc) from None
    if file_size < COPY_SIZE:
        if raws[0][:len(MAGIC)] != MAGIC[:len(raws[0])]:
            raise errors.BadMagic(path=path)
        raise errors.Truncated(path=path, size=file_size, need=DATA_ALIGN)

    valid: list[tuple[Header, int]] = []
    failures: list[errors.FormatError] = []
    for slot, raw in enumerate(raws):
        try:
            valid.append((decode_copy(raw, path=f"{path} (header copy "
                                                f"{COPY_NAMES[slot]})"), slot))
        except errors.UnknownVersion as exc:          # F-8: refuse, never repair
            raise errors.UnknownVersion(path=path, version=exc.fields["version"]) from None
        except errors.FormatError as exc:
            failures.append(exc)

    if not valid:
        if not any(raw[:len(MAGIC)] == MAGIC for raw in raws):
            raise errors.BadMagic(path=path)
        for exc in failures:                           # valid checksum, bad field
            if not isinstance(exc, (errors.BadMagic, errors.ChecksumMismatch,
                                    errors.Truncated)):
                raise exc
        if any(isinstance(exc, errors.Truncated) for exc in failures):
            raise errors.Truncated(path=path, size=file_size, need=DATA_ALIGN)
        raise errors.ChecksumMismatch(path=path)

    header, winner = max(valid, key=lambda hv: (hv[0].seq, -hv[1]))   # tie: A (F-22)
    if file_size < header.file_size_bytes:                            # F-23
        raise errors.Truncated(path=path, size=file_size, need=header.file_size_bytes)
    raw = raws[winner]
    stale = [slot for slot in range(len(COPY_OFFSETS)) if raws[slot] != raw]
    return _Loaded(header, raw, winner, stale, file_size)


def _repair(fd: int, loaded: _Loaded) -> None:
    """Rewrite stale copies with the winner's bytes (F-24); best effort."""
    try:
        for slot in loaded.stale:
            _pwrite(fd, loaded.raw, COPY_OFFSETS[slot])
        os.fsync(fd)
    except OSError:
        pass  # the header read is still valid; the next writable open retries


def read_header(path: os.PathLike | str, *, repair: bool = True) -> Header:
    """The winning header of a container (F-22); repairs the other copy (F-24).

    Raises the FormatError subclasses for a malformed container, NotFound if the
    file is missing, StorageError on I/O errors.  With repair=True and a
    writable file, a damaged or stale copy is rewritten from the winner.
    """
    p = os.fspath(path)
    writable = False
    if repair:
        try:
            fd = _open_locked(p, writable=True)
            writable = True
        except errors.StorageError:
            pass                          # read-only file or file system: no repair
    if not writable:
        fd = _open_locked(p, writable=False)
    try:
        loaded = _load(fd, p)
        if writable and loaded.stale:
            _repair(fd, loaded)
        return loaded.header
    finally:
        os.close(fd)


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _update_locked(fd: int, path: str, loaded: _Loaded, header: Header,
                   file_size: int) -> Header:
    """Store header with seq+1: non-winning slot first, then the winner's (F-25)."""
    if loaded.header.seq >= MAX_SEQ:
        raise errors.BadGeometry(path=path, reason="the header sequence number is "
                                 "exhausted (2^64 - 1)")
    new = header.replace(seq=loaded.header.seq + 1)
    raw = encode_copy(new)
    if file_size < new.file_size_bytes:
        raise errors.BadGeometry(path=path, reason=f"the header needs a file of "
                                 f"{new.file_size_bytes} bytes, the file has {file_size}; "
                                 "grow the container with grow_container()")
    order = [slot for slot in range(len(COPY_OFFSETS)) if slot != loaded.winner]
    order.append(loaded.winner)
    try:
        for slot in order:
            _step(f"write:{COPY_NAMES[slot]}")
            _pwrite(fd, raw, COPY_OFFSETS[slot])
            _step(f"fsync:{COPY_NAMES[slot]}")
            os.fsync(fd)
    except OSError as exc:
        raise _storage_error(path, exc) from None
    return new


def write_header(path: os.PathLike | str, header: Header) -> Header:
    """Replace the header crash-safely (F-25, F-26); returns the stored header.

    The stored seq is the current winner's seq + 1 (header.seq is ignored).
    The container must be readable (a valid copy) and large enough for the
    new geometry.
    """
    p = os.fspath(path)
    fd = _open_locked(p, writable=True)
    try:
        loaded = _load(fd, p)
        return _update_locked(fd, p, loaded, header, loaded.file_size)
    finally:
        os.close(fd)


def grow_container(path: os.PathLike | str, size_bytes: int, *,
                   wrapped_dk: bytes | None = None) -> Header:
    """Grow a container to size_bytes (F-29); returns the stored header.

    An encrypted container's key context includes size_bytes (F-20), so the
    caller passes the DK re-wrapped for ``key_context(old.replace(size_bytes=
    size_bytes))``.  The file is extended (sparse) and fsynced before the
    header is updated, so a crash in between leaves the old, valid header.
    """
    p = os.fspath(path)
    fd = _open_locked(p, writable=True)
    try:
        loaded = _load(fd, p)
        old = loaded.header
        if not isinstance(size_bytes, int) or size_bytes < old.size_bytes:
            raise errors.InvalidSize(size=size_bytes, reason=f"a container only grows; "
                                     f"it has {old.size_bytes} bytes")
        if size_bytes % old.sector_size:
            raise errors.InvalidSize(size=size_bytes, reason=f"the size must be a multiple "
                                     f"of the sector size ({old.sector_size} bytes)")
        if old.encrypted and wrapped_dk is None:
            raise errors.InvalidInput(detail="growing an encrypted container changes its "
                                      "key context; pass the data key re-wrapped for it")
        if not old.encrypted and wrapped_dk is not None:
            raise errors.InvalidInput(detail="an unencrypted container has no data key")
        new = old.replace(size_bytes=size_bytes,
                          wrapped_dk=wrapped_dk if old.encrypted else None)
        if old.data_offset + size_bytes > MAX_FILE_BYTES:
            raise errors.InvalidSize(size=size_bytes, reason="the file would exceed 2^63 - 1 "
                                     "bytes")
        file_size = loaded.file_size
        if file_size < new.file_size_bytes:
            try:
                os.ftruncate(fd, new.file_size_bytes)
                os.fsync(fd)
            except OSError as exc:
                raise _storage_error(p, exc) from None
            file_size = new.file_size_bytes
        return _update_locked(fd, p, loaded, new, file_size)
    finally:
        os.close(fd)


def create_container(path: os.PathLike | str, header: Header) -> Header:
    """Create a new sparse container file (F-28, F-3); returns the stored header.

    The file is created exclusively (an existing path, including a symlink, is
    refused with AlreadyExists), mode 0600, with length data_offset +
    size_bytes and both copies written with seq 0; file and directory are
    fsynced.  On failure the partial file is removed.
    """
    p = os.fspath(path)
    stored = header.replace(seq=0)
    raw = encode_copy(stored)
    fd = create_private_file(p, "container file")
    try:
        try:
            os.ftruncate(fd, stored.file_size_bytes)
            for offset in COPY_OFFSETS:
                _pwrite(fd, raw, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(p)))
    except OSError as exc:
        try:
            os.unlink(p)
        except OSError:
            pass
        if exc.errno == errno.EFBIG:
            raise errors.StorageError(path=p, reason=f"the file system cannot hold a file "
                                      f"of {stored.file_size_bytes} bytes") from None
        raise _storage_error(p, exc) from None
    return stored
