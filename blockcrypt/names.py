"""Names and sizes given on the command line, checked before anything is written.

Names (disks, snapshots) become file names under the home and parts of paths of
runtime directories, so they are restricted to 1-64 characters of
``[A-Za-z0-9._-]`` and may not start with ``.``: that excludes ``/``, ``..``,
NUL, newlines, hidden files and anything a shell or a path would interpret.

Sizes are bytes, or a number with a binary suffix: ``K``, ``M``, ``G``, ``T``,
``P``, ``E`` (powers of 1024, optionally written ``KiB``, ``MiB``, ...).  A disk
size must be positive, a multiple of the sector size, and at most 2^63 bytes
(the largest offset a signed 64-bit ``off_t`` and the NBD protocol can address).
"""
from __future__ import annotations

import re

from . import errors
from .constants import is_sector_size

NAME_MAX_CHARS = 64
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# 2^63: off_t is signed 64-bit, so no byte at or past 2^63 can be addressed.
MAX_SIZE_BYTES = 2 ** 63

_SUFFIX_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"(?P<num>[0-9]+)(?P<suffix>[KMGTPE]?)(?:I?B)?", re.IGNORECASE)


def validate_name(name: str, what: str = "disk") -> str:
    """Return name if it is a valid object name, else raise InvalidName."""
    if not isinstance(name, str) or not name:
        raise errors.InvalidName(what=what, name=name, reason="it is empty")
    if len(name) > NAME_MAX_CHARS:
        raise errors.InvalidName(what=what, name=name,
                                 reason=f"it is {len(name)} characters long")
    if name.startswith("."):
        raise errors.InvalidName(what=what, name=name, reason="it starts with '.'")
    if not _NAME_RE.fullmatch(name):
        bad = next(c for c in name if not _NAME_RE.fullmatch(c))
        raise errors.InvalidName(what=what, name=name,
                                 reason=f"character {bad!r} is not allowed")
    return name


def parse_size(text: str) -> int:
    """Parse '512M', '10G', '1T', '4096', '1GiB' into bytes (binary multiples).

    Raises InvalidSize for anything else, for 0 and negative values, and for
    sizes above 2^63 bytes.
    """
    raw = text.strip() if isinstance(text, str) else str(text)
    if raw.startswith("-"):
        raise errors.InvalidSize(size=text, reason="a size cannot be negative")
    m = _SIZE_RE.fullmatch(raw)
    if not m:
        raise errors.InvalidSize(
            size=text, reason="use a number of bytes or a number with a suffix "
                              "K, M, G, T, P, E (powers of 1024), e.g. 512M or 10G")
    size_bytes = int(m["num"]) * 1024 ** _SUFFIX_POWER[m["suffix"].upper()]
    return check_size(size_bytes, size_text=text)


def check_size(size_bytes: int, sector_size: int | None = None,
               size_text: str | None = None) -> int:
    """Check a disk size in bytes: positive, <= 2^63, a multiple of sector_size."""
    shown = size_text if size_text is not None else str(size_bytes)
    if size_bytes <= 0:
        raise errors.InvalidSize(size=shown, reason="a disk size must be larger than 0")
    if size_bytes > MAX_SIZE_BYTES:
        raise errors.InvalidSize(size=shown, reason="larger than 2^63 bytes")
    if sector_size is not None:
        check_sector_size(sector_size)
        if size_bytes % sector_size:
            raise errors.InvalidSize(
                size=shown, reason=f"not a multiple of the sector size ({sector_size} bytes)")
    return size_bytes


def check_sector_size(sector_size: int) -> int:
    if not is_sector_size(sector_size):
        raise errors.InvalidInput(
            detail=f"sector size {sector_size} is not supported; use 512 or 4096")
    return sector_size
