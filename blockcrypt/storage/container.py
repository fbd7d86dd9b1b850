"""Container files: reading, updating, growing and creating them, under lock.

The normative specification is ``docs/FORMAT.md``; rule ids (``F-n``) cited
here refer to it.  One file holds one disk or snapshot: two 4096-byte header
copies in the first MiB (copy A at 0, copy B at 512 KiB), then the data area at
``data_offset`` (1 MiB).  This module owns the file I/O of the header area:
the header lock, selecting the winning copy and repairing the other
(F-22..F-24), crash-safe updates (F-25, F-26), growth (F-29) and creation
(F-28).  The bytes of a copy are :mod:`blockcrypt.storage.header`'s.  It never
touches the data area (the cipher and the backend do) and never sees a
plaintext key.

Security properties:

- A refused container is never written (F-24).
- Header updates are crash-safe: at every instant at least one copy is valid
  and holds the old or the new header (F-25, F-26).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .. import errors

# The codec's names, re-exported: container.X is how the services, the backend,
# the tests and docs/FORMAT.md have always named them (one import for both halves).
from .header import (  # noqa: F401
    BODY_SIZE,
    CHECKSUM_SIZE,
    CIPHER_NONE,
    CIPHER_XTS,
    CIPHERS,
    COPY_NAMES,
    COPY_OFFSETS,
    COPY_SIZE,
    DATA_ALIGN,
    FORMAT_VERSION,
    ID_BYTES,
    KEY_CONTEXT_DOMAIN,
    MAGIC,
    MAX_CIPHER_NAME,
    MAX_CMK_ID,
    MAX_CMK_VERSION,
    MAX_FILE_BYTES,
    MAX_SEQ,
    MAX_WRAPPED_DK,
    Header,
    Kind,
    cryptsetup_argv,
    data_offset_for,
    decode_copy,
    encode_copy,
    key_context,
    new_header,
)
from .home import create_private_file, fsync_dir

CONTAINER_FILE = "container file"   # what errors.storage_error calls it


# Test seam for crash simulation: called with a step name ("write:B",
# "fsync:B", "write:A", "fsync:A") before each step of a header update (F-25).
# A hook that raises aborts the update at that point, as a crash would.
_fault_hook: Callable[[str], None] | None = None


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


# --- byte devices --------------------------------------------------------------------

class ByteDevice:
    """What the header code needs of the bytes that hold a container: a file
    (:class:`FileDevice`) or an RBD image (``storage.rbd_store.RbdDevice``).
    ``read`` returns fewer bytes only at the end; errors are ``OSError``."""

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, data: bytes, offset: int) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make every write that returned durable."""
        raise NotImplementedError

    def size(self) -> int:
        raise NotImplementedError

    def resize(self, size: int) -> None:
        """Grow the device to ``size`` bytes (the new range reads as zeros)."""
        raise NotImplementedError


class FileDevice(ByteDevice):
    """A container file's open descriptor."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def read(self, offset: int, length: int) -> bytes:
        return _pread(self.fd, length, offset)

    def write(self, data: bytes, offset: int) -> None:
        _pwrite(self.fd, data, offset)

    def sync(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            raise errors.FormatError(path=self.path, reason="not a regular file")
        return st.st_size

    def resize(self, size: int) -> None:
        os.ftruncate(self.fd, size)
        os.fsync(self.fd)


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
        raise errors.storage_error(path, exc, CONTAINER_FILE) from None
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
            raise errors.storage_error(path, exc, CONTAINER_FILE) from None


@dataclass
class _Loaded:
    header: Header
    raw: bytes                  # the winner's bytes
    winner: int                 # slot index of the winning copy
    stale: list[int]            # slots whose bytes differ from the winner's
    file_size: int


def _load(fd: int | ByteDevice, path: str) -> _Loaded:
    """Read both copies and select the winner (F-22, F-23, F-8)."""
    dev = _device(fd, path)
    try:
        file_size = dev.size()
        raws = [dev.read(off, COPY_SIZE) for off in COPY_OFFSETS]
    except OSError as exc:
        raise errors.storage_error(path, exc, CONTAINER_FILE) from None
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


def _device(fd: int | ByteDevice, path: str) -> ByteDevice:
    return fd if isinstance(fd, ByteDevice) else FileDevice(fd, path)


def _repair(fd: int | ByteDevice, loaded: _Loaded, path: str = "") -> None:
    """Rewrite stale copies with the winner's bytes (F-24); best effort."""
    dev = _device(fd, path)
    try:
        for slot in loaded.stale:
            dev.write(loaded.raw, COPY_OFFSETS[slot])
        dev.sync()
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
        return read_header_on(FileDevice(fd, p), p, repair=writable)
    finally:
        os.close(fd)


def read_header_on(dev: ByteDevice, name: str, *, repair: bool) -> Header:
    """:func:`read_header` on an open device (the caller holds whatever lock it needs)."""
    loaded = _load(dev, name)
    if repair and loaded.stale:
        _repair(dev, loaded, name)
    return loaded.header


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _update_locked(fd: int | ByteDevice, path: str, loaded: _Loaded, header: Header,
                   file_size: int) -> Header:
    """Store header with seq+1: non-winning slot first, then the winner's (F-25)."""
    dev = _device(fd, path)
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
            dev.write(raw, COPY_OFFSETS[slot])
            _step(f"fsync:{COPY_NAMES[slot]}")
            dev.sync()
    except OSError as exc:
        raise errors.storage_error(path, exc, CONTAINER_FILE) from None
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
        return write_header_on(FileDevice(fd, p), p, header)
    finally:
        os.close(fd)


def write_header_on(dev: ByteDevice, name: str, header: Header) -> Header:
    """:func:`write_header` on an open device."""
    loaded = _load(dev, name)
    return _update_locked(dev, name, loaded, header, loaded.file_size)


def restore_header(path: os.PathLike | str, header: Header) -> Header:
    """Write ``header`` (from a header backup) into the container (F-37); returns it as
    stored.  Works when no copy is valid (what a backup is for); its seq exceeds both
    the backup's and any valid copy's, so it wins, and the copies are written as an
    update (F-25): a crash leaves the old state or the restored header."""
    p = os.fspath(path)
    fd = _open_locked(p, writable=True)
    try:
        return restore_header_on(FileDevice(fd, p), p, header)
    finally:
        os.close(fd)


def restore_header_on(dev: ByteDevice, p: str, header: Header) -> Header:
    """:func:`restore_header` on an open device."""
    try:
        loaded = _load(dev, p)
    except errors.UnknownVersion:       # written by a newer blockcrypt: never downgrade
        raise
    except errors.FormatError:          # both copies damaged
        try:
            size = dev.size()
        except OSError as exc:
            raise errors.storage_error(p, exc, CONTAINER_FILE) from None
        loaded = _Loaded(header, b"", winner=0, stale=[1], file_size=size)
    base = loaded.header.replace(seq=max(loaded.header.seq, header.seq))
    loaded = _Loaded(base, loaded.raw, loaded.winner, loaded.stale, loaded.file_size)
    return _update_locked(dev, p, loaded, header, loaded.file_size)


def grow_container(path: os.PathLike | str, size_bytes: int, *,
                   wrapped_dk: bytes | None = None, cmk_version: int | None = None) -> Header:
    """Grow a container to size_bytes (F-29); returns the stored header.

    An encrypted container's key context includes size_bytes (F-20), so the
    caller passes the DK re-wrapped for ``key_context(old.replace(size_bytes=
    size_bytes))`` (and the key version that blob records, if it changed).  The
    file is extended (sparse) and fsynced before the
    header is updated, so a crash in between leaves the old, valid header.
    """
    p = os.fspath(path)
    fd = _open_locked(p, writable=True)
    try:
        return grow_on(FileDevice(fd, p), p, size_bytes, wrapped_dk=wrapped_dk,
                       cmk_version=cmk_version)
    finally:
        os.close(fd)


def grow_on(dev: ByteDevice, p: str, size_bytes: int, *, wrapped_dk: bytes | None = None,
            cmk_version: int | None = None) -> Header:
    """:func:`grow_container` on an open device."""
    loaded = _load(dev, p)
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
    if old.encrypted and cmk_version is not None:
        new = new.replace(cmk_version=cmk_version)
    if old.data_offset + size_bytes > MAX_FILE_BYTES:
        raise errors.InvalidSize(size=size_bytes, reason="the file would exceed 2^63 - 1 "
                                 "bytes")
    file_size = loaded.file_size
    if file_size < new.file_size_bytes:
        try:
            dev.resize(new.file_size_bytes)
        except OSError as exc:
            raise errors.storage_error(p, exc, CONTAINER_FILE) from None
        file_size = new.file_size_bytes
    return _update_locked(dev, p, loaded, new, file_size)


def write_new_copies(dev: ByteDevice, raw: bytes) -> None:
    """Write both copies of a new container (F-28) and make them durable."""
    for offset in COPY_OFFSETS:
        dev.write(raw, offset)
    dev.sync()


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
    fd = create_private_file(p, CONTAINER_FILE)
    try:
        try:
            os.ftruncate(fd, stored.file_size_bytes)
            write_new_copies(FileDevice(fd, p), raw)
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
        raise errors.storage_error(p, exc, CONTAINER_FILE) from None
    return stored
