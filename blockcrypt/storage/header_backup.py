"""Header backup files: what `disk header-backup` writes and `disk header-restore` reads.

As cryptsetup's luksHeaderBackup: a copy of a container's header, to put back
when both header copies in the container are damaged.  The file holds one
header copy exactly as the container stores it (docs/FORMAT.md §3, with its
checksum): the public fields and the *wrapped* data key, never a plaintext key
(F-35).  Layout (docs/FORMAT.md §7.1), little-endian::

    offset  size  field
    0       8     magic "BCHDRBAK"
    8       2     backup format version, u16 = 1
    10      6     zero
    16      4096  one header copy (§3)

This module owns that layout and the file I/O (created exclusively, 0600,
fsynced: F-36); checking that a backup belongs to a disk is the catalog's
(:func:`blockcrypt.storage.catalog.check_backup_matches`) and writing it into a
container is :func:`blockcrypt.storage.container.restore_header`'s.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from .. import errors
from .header import COPY_SIZE, Header, decode_copy, encode_copy
from .home import create_private_file, fsync_dir

MAGIC = b"BCHDRBAK"
VERSION = 1
_PREAMBLE = struct.Struct("<8sH6x")
SIZE = _PREAMBLE.size + COPY_SIZE          # 16 + 4096 bytes
BACKUP_FILE = "header backup file"         # what errors call it
assert _PREAMBLE.size == 16


def encode(header: Header) -> bytes:
    return _PREAMBLE.pack(MAGIC, VERSION) + encode_copy(header)


def decode(raw: bytes, path: str) -> Header:
    """The header in a backup's bytes; InvalidHeaderBackup naming ``path`` otherwise."""
    def bad(reason: str) -> errors.InvalidHeaderBackup:
        return errors.InvalidHeaderBackup(file=path, reason=reason)
    if len(raw) != SIZE:
        raise bad(f"it has {len(raw)} bytes, a header backup has {SIZE}")
    magic, version = _PREAMBLE.unpack_from(raw)
    if magic != MAGIC or raw[10:16] != bytes(6):
        raise bad("it does not start with the header-backup magic")
    if version != VERSION:
        raise bad(f"backup format version {version} is not supported by this blockcrypt; "
                  "upgrade blockcrypt")
    try:
        return decode_copy(raw[_PREAMBLE.size:], path=path)
    except errors.FormatError as e:
        raise bad(e.message.removeprefix(f"{path}: ")) from None


def write(path: Path, header: Header) -> None:
    """Create ``path`` (exclusively, 0600, never through a symlink) holding ``header``;
    durable when it returns.  AlreadyExists if ``path`` exists."""
    fd = create_private_file(path, BACKUP_FILE)
    try:
        try:
            data = memoryview(encode(header))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as exc:
        Path(path).unlink(missing_ok=True)
        raise errors.storage_error(path, exc, BACKUP_FILE) from None


def read(path: Path) -> Header:
    """The header in the backup file ``path``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(SIZE + 1)
    except OSError as exc:
        raise errors.storage_error(path, exc, BACKUP_FILE) from None
    return decode(raw, str(path))
