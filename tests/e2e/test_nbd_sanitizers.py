"""The compiled data path is clean under AddressSanitizer, UBSan and valgrind.

Runs ``scripts/test-sanitize.sh`` (what ``make test-sanitize`` runs): the
extension built with ``-fsanitize=address,undefined`` into a temporary
directory, the cipher and backend unit tests on that build, then valgrind
memcheck on a subset of them with the installed build.  Any sanitizer report
aborts the run; any memcheck error exits 99 (only CPython's own noise is
suppressed, in scripts/valgrind-python.supp).  About 1.5 minutes.
"""
from __future__ import annotations

import subprocess

import pytest

from support.cli import REPO
from support.prereq import require_tools


@pytest.mark.e2e
@pytest.mark.slow
def test_asan_ubsan_and_valgrind_report_nothing():
    require_tools("gcc", "valgrind")
    cp = subprocess.run([str(REPO / "scripts" / "test-sanitize.sh"), "all"], cwd=REPO,
                        capture_output=True, text=True, timeout=1200,
                        stdin=subprocess.DEVNULL, check=False)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-6000:]
    assert "asan+ubsan build: " in out                        # the sanitized build ran
    assert "asan+ubsan: clean" in out and "valgrind memcheck: clean" in out
    for report in ("ERROR: AddressSanitizer", "runtime error:", "Invalid read",
                   "Invalid write", "uninitialised", "ERROR SUMMARY: 1"):
        assert report not in out, out[-6000:]
