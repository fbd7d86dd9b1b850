"""The one rule for end-to-end prerequisites.

A test that needs a system tool, root, FUSE or a loop device calls
:func:`require` (or a helper built on it).  Normally a missing prerequisite
skips the test; with BLOCKCRYPT_REQUIRE_E2E=1 (CI) it FAILS, so CI can never
pass by skipping the real paths.  No test calls ``pytest.skip`` directly.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_E2E = os.environ.get("BLOCKCRYPT_REQUIRE_E2E") == "1"


def require(condition: bool, why: str) -> None:
    """Skip (or, under BLOCKCRYPT_REQUIRE_E2E=1, fail) when a prerequisite is missing."""
    if condition:
        return
    if REQUIRE_E2E:
        pytest.fail(f"end-to-end prerequisite missing (BLOCKCRYPT_REQUIRE_E2E=1): {why}",
                    pytrace=False)
    pytest.skip(why)


def require_tools(*tools: str) -> None:
    for t in tools:
        require(shutil.which(t) is not None, f"{t} not installed")


def require_root() -> None:
    require(os.geteuid() == 0, "needs root")


def require_block_devices() -> None:
    require_root()
    require(Path("/dev/fuse").exists(), "no /dev/fuse")
    require(Path("/dev/loop-control").exists(), "no loop devices")
    require_tools("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "mount", "e2fsck")
