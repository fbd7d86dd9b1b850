"""Constants more than one layer needs, each defined once.

Sizes carry their unit in the name; each has the reason beside it.
"""
from __future__ import annotations

from datetime import datetime, timezone

# Sector sizes a disk may have (FORMAT.md F-11): dm-crypt's and the kernel's
# logical block sizes that every file system here accepts.
SECTOR_SIZES = (512, 4096)
DEFAULT_SECTOR_SIZE = 4096

# The data cipher, named as dm-crypt names it (FORMAT.md F-14).
CIPHER_XTS = "aes-xts-plain64"
CIPHER_NONE = "none"

# A data key: AES-256-XTS takes two 32-byte AES-256 keys (K1 data || K2 tweak).
DK_BYTES = 64

# Catalog and audit timestamps: UTC, second resolution, ISO 8601 with a Z.
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def is_sector_size(value) -> bool:
    """Whether ``value`` is a supported sector size (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in SECTOR_SIZES


def utc_timestamp(t: datetime | None = None) -> str:
    """``t`` (default: now) as a catalog timestamp, e.g. 2026-11-30T10:07:23Z."""
    return (t or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT)
