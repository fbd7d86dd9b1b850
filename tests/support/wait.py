"""Wait for a condition with a deadline: the only way tests synchronise."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

POLL_INTERVAL_S = 0.02


def wait_for(condition: Callable[[], T], timeout_s: float = 30.0, what: str = "condition",
             interval_s: float = POLL_INTERVAL_S) -> T:
    """Poll ``condition`` until it returns a truthy value and return that value;
    raise AssertionError naming ``what`` once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
