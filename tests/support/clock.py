"""An injectable UTC clock (the key store's ``now`` seam): no sleeping in tests."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone


class Clock:
    """Starts at 2030-01-01 12:00 UTC; moves only when told to."""

    def __init__(self):
        self.t = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, **delta) -> None:
        self.t += timedelta(**delta)
