"""Test-only crash injection: die with SIGKILL at a named step.

Multi-step operations (snapshot, create-from-snapshot, key rotation, passphrase
change, header update) call ``crashpoint("snapshot.after-copy")`` between their
steps.  When the environment variable ``BLOCKCRYPT_TESTONLY_CRASH_AT`` names that
step, the process kills itself with SIGKILL right there, exactly like ``kill -9``:
no ``finally`` blocks, no atexit, no flush of Python buffers.  Tests use it to
prove every intermediate state is recoverable.  A snapshot of a detached disk
has ``snapshot.locked`` (instant fixed, container still locked),
``snapshot.background`` (lock released, copy not started) and
``snapshot.handed-over`` (a server that started meanwhile has the copy).  Unset (always, outside tests), a
crash point costs one dictionary lookup.

``BLOCKCRYPT_TESTONLY_CRASH_LIST=FILE`` appends every crash point reached to FILE,
so a test can enumerate the steps of an operation before crashing at each one.

``BLOCKCRYPT_TESTONLY_STOP_AT`` names a point where the process stops itself
with SIGSTOP instead (a test reads its memory, then sends SIGCONT).
"""
from __future__ import annotations

import os
import signal

ENV_CRASH_AT = "BLOCKCRYPT_TESTONLY_CRASH_AT"
ENV_CRASH_LIST = "BLOCKCRYPT_TESTONLY_CRASH_LIST"
ENV_STOP_AT = "BLOCKCRYPT_TESTONLY_STOP_AT"


def crashpoint(name: str) -> None:
    """Die by SIGKILL here if the test harness asked for it."""
    listing = os.environ.get(ENV_CRASH_LIST)
    if listing:
        with open(listing, "a") as f:
            f.write(name + "\n")
    if os.environ.get(ENV_CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(ENV_STOP_AT) == name:
        os.kill(os.getpid(), signal.SIGSTOP)
