"""The local provider's rules: key states and origins, limits, the validation of
aliases and descriptions, and its clock and timestamp formats.

Pure values and checks: no SQL, no I/O, no key material.  The state names are the
seam's (:mod:`blockcrypt.kms.provider`); the limits are those of a cloud KMS.
"""
from __future__ import annotations

import re
from datetime import datetime, timezone

from ... import errors
from ...constants import utc_timestamp
from ...testing import clock
from ..provider import (
    DESTROYED,
    DISABLED,
    ENABLED,
    PENDING_DAYS_DEFAULT,
    PENDING_DELETION,
    PENDING_IMPORT,
    STATES,
)

__all__ = ["ENABLED", "DISABLED", "PENDING_DELETION", "PENDING_IMPORT", "DESTROYED", "STATES",
           "ORIGIN_BLOCKCRYPT", "ORIGIN_EXTERNAL", "ORIGINS", "SERVICE_ALIAS",
           "RESERVED_ALIAS_PREFIX", "PENDING_DAYS_MIN", "PENDING_DAYS_MAX",
           "PENDING_DAYS_DEFAULT", "ROTATION_DAYS_MIN", "ROTATION_DAYS_MAX",
           "MAX_DESCRIPTION_CHARS", "utc_now", "iso", "iso_us", "parse_iso", "validate_alias",
           "validate_description", "is_int"]

ORIGIN_BLOCKCRYPT, ORIGIN_EXTERNAL = "blockcrypt", "external"
ORIGINS = (ORIGIN_BLOCKCRYPT, ORIGIN_EXTERNAL)

SERVICE_ALIAS = "blockcrypt/default"
RESERVED_ALIAS_PREFIX = "blockcrypt/"
PENDING_DAYS_MIN, PENDING_DAYS_MAX = 7, 30
ROTATION_DAYS_MIN, ROTATION_DAYS_MAX = 90, 2560
MAX_DESCRIPTION_CHARS = 256

_ALIAS_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9/_.-]{0,63}")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def utc_now() -> datetime:
    """The default clock (UTC, timezone-aware); the store takes another for tests, and
    the CLI's can be moved forward by a test-only switch (:mod:`blockcrypt.testing.clock`)."""
    return datetime.now(timezone.utc) + clock.skew()


def iso(t: datetime) -> str:
    """Key timestamps (created, rotated, deletion date): second resolution."""
    return utc_timestamp(t)


def iso_us(t: datetime) -> str:
    """Audit record times: microsecond resolution (they sort as text)."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def validate_alias(alias: str) -> str:
    """Aliases: 1-64 of A-Z a-z 0-9 / _ - . (no leading . or /), unique, not id-shaped."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise errors.InvalidInput(
            detail=f"alias {alias!r} is not valid; use 1-64 characters of A-Z a-z 0-9 / _ - . "
                   "not starting with '.' or '/'")
    if alias.lower().startswith("alias/"):
        raise errors.InvalidInput(
            detail=f"alias {alias!r}: write it without the 'alias/' prefix")
    if alias.lower().startswith(RESERVED_ALIAS_PREFIX):
        raise errors.InvalidInput(
            detail=f"alias {alias!r}: names starting with {RESERVED_ALIAS_PREFIX!r} are "
                   "reserved for blockcrypt's own keys")
    if _UUID_RE.fullmatch(alias):
        raise errors.InvalidInput(
            detail=f"alias {alias!r} looks like a key id; choose a name")
    return alias


def validate_description(description: str | None) -> str:
    if description is None:
        return ""
    if (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in description)):
        raise errors.InvalidInput(
            detail=f"the description must be at most {MAX_DESCRIPTION_CHARS} characters "
                   "without control characters (no newlines)")
    return description


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
