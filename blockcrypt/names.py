"""Names and sizes given on the command line, checked before anything is written.

Names (disks, snapshots) become file names under the home and parts of paths of
runtime directories, so they are restricted to 1-64 characters of
``[A-Za-z0-9._-]`` and may not start with ``.``: that excludes ``/``, ``..``,
NUL, newlines, hidden files and anything a shell or a path would interpret.

Sizes are bytes, or a number with a binary suffix: ``K``, ``M``, ``G``, ``T``,
``P``, ``E`` (powers of 1024, optionally written ``KiB``, ``MiB``, ...).  A disk
size must be positive, a multiple of the sector size, and at most 2^63 bytes
(the largest offset a signed 64-bit ``off_t`` and the NBD protocol can address).

Numbers and units are ASCII only: ``str.isdigit``, ``int()`` and case-insensitive
regular expressions also accept other scripts' digits and look-alike letters
(U+212A KELVIN SIGN lower-cases to ``k``), so every number on the command line
goes through :func:`is_ascii_digits` / :func:`parse_int`, and sizes through an
ASCII-only pattern.
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
_SIZE_RE = re.compile(r"(?P<num>[0-9]+)(?P<suffix>[KMGTPE]?)(?:I?B)?",
                      re.IGNORECASE | re.ASCII)
# More digits than any accepted number has (2^63 has 19): refused before int(),
# which raises past 4300 digits.
MAX_DIGITS = 20
_ASCII_DIGITS = frozenset("0123456789")


def is_ascii_digits(text, max_chars: int = MAX_DIGITS) -> bool:
    """True if text is 1..max_chars ASCII digits 0-9 (nothing else, no sign)."""
    return (isinstance(text, str) and 0 < len(text) <= max_chars
            and all(c in _ASCII_DIGITS for c in text))


def parse_int(text: str, what: str) -> int:
    """An integer option written in ASCII digits, with an optional leading '-'.
    InvalidInput naming ``what`` (e.g. '--threads') otherwise; ranges are the
    caller's to check."""
    body = text[1:] if isinstance(text, str) and text.startswith("-") else text
    if not is_ascii_digits(body):
        raise errors.InvalidInput(
            detail=f"{what} {text!r} is not a whole number; use up to {MAX_DIGITS} ASCII "
                   "digits 0-9, e.g. 4")
    return int(text)


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

    Raises InvalidSize for anything else (non-ASCII digits and units included),
    for 0 and negative values, and for sizes above 2^63 bytes.
    """
    raw = text.strip(" \t") if isinstance(text, str) else str(text)
    if raw.startswith("-"):
        raise errors.InvalidSize(size=text, reason="a size cannot be negative")
    m = _SIZE_RE.fullmatch(raw)
    if not m:
        raise errors.InvalidSize(
            size=text, reason="use a number of bytes or a number with a suffix "
                              "K, M, G, T, P, E (powers of 1024), e.g. 512M or 10G, "
                              "in ASCII characters")
    if len(m["num"]) > MAX_DIGITS:
        raise errors.InvalidSize(size=text, reason="larger than 2^63 bytes")
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
