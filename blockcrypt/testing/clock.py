"""Test-only clock skew: key deadlines (deletion windows, rotations) reached without waiting.

A key's deletion window is 7 to 30 days, so a test or the demo that shows what
happens when it passes (the material destroyed, the crypto-shred record) moves
blockcrypt's key clock forward with ``BLOCKCRYPT_TESTONLY_CLOCK_SKEW_DAYS=N``.
Unset (always, outside tests and the demo), it adds nothing.
"""
from __future__ import annotations

import os
from datetime import timedelta

ENV_CLOCK_SKEW_DAYS = "BLOCKCRYPT_TESTONLY_CLOCK_SKEW_DAYS"


def skew() -> timedelta:
    """How far the test harness moved the key clock (zero unless asked)."""
    value = os.environ.get(ENV_CLOCK_SKEW_DAYS)
    return timedelta(days=float(value)) if value else timedelta(0)
