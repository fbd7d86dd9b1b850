"""The progress line of long operations on a terminal: bytes done, rate and ETA.

``shown(app, label)`` draws it on stderr, redrawn in place, while the block runs,
only when both stdout and stderr are terminals and ``--json`` is off: a pipe, a
file or a JSON consumer gets nothing extra.  What reports progress is
:func:`blockcrypt.services.progress.reporting`.
"""
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TextIO

from .output import human_size

REDRAW_INTERVAL_S = 0.2


def _clock_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else \
        f"{rest // 60}:{rest % 60:02d}"


class Meter:
    """A ``(done_bytes, total_bytes)`` callback drawing
    ``LABEL: 1.2 GiB of 4 GiB (30%), 210 MiB/s, ETA 0:14`` on ``stream``.

    Redraws at most every ``interval_s``, and always at 0 and at the end.
    """

    def __init__(self, label: str, stream: TextIO, *,
                 clock: Callable[[], float] = time.monotonic,
                 interval_s: float = REDRAW_INTERVAL_S):
        self.label = label
        self.stream = stream
        self.clock = clock
        self.interval_s = interval_s
        self._start_s: float | None = None
        self._last_s = float("-inf")
        self.drawn = False

    def line(self, done_bytes: int, total_bytes: int, elapsed_s: float) -> str:
        pct = 100 * done_bytes // total_bytes if total_bytes else 100
        text = f"{self.label}: {human_size(done_bytes)} of {human_size(total_bytes)} ({pct}%)"
        if elapsed_s > 0 and done_bytes > 0:
            rate = done_bytes / elapsed_s
            text += f", {human_size(int(rate))}/s"
            if done_bytes < total_bytes:
                text += f", ETA {_clock_text((total_bytes - done_bytes) / rate)}"
            else:
                text += f", done in {_clock_text(elapsed_s)}"
        return text

    def __call__(self, done_bytes: int, total_bytes: int) -> None:
        now = self.clock()
        if self._start_s is None:
            self._start_s = now
        final = done_bytes >= total_bytes
        if not final and self.drawn and now - self._last_s < self.interval_s:
            return
        self._last_s = now
        self.stream.write("\r" + self.line(done_bytes, total_bytes, now - self._start_s)
                          + "\x1b[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the line (once something was drawn)."""
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def wanted(json_output: bool) -> bool:
    """Whether to draw progress: both stdout and stderr are terminals, no --json."""
    return not json_output and sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def shown(json_output: bool, label: str) -> Iterator[None]:
    """Draw the progress of the copies made in the block (see the module doc)."""
    if not wanted(json_output):
        yield
        return
    from ..services.progress import reporting
    meter = Meter(label, sys.stderr)
    try:
        with reporting(meter):
            yield
    finally:
        meter.close()
