"""Shared fixtures.

End-to-end policy: a test that needs a system tool, root, FUSE or a loop device
calls :func:`require` (or uses a fixture built on it).  Normally a missing
prerequisite skips the test; with BLOCKCRYPT_REQUIRE_E2E=1 (CI) it FAILS, so CI
can never pass by skipping the real paths.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_PY = REPO / ".venv" / "bin" / "python"
REQUIRE_E2E = os.environ.get("BLOCKCRYPT_REQUIRE_E2E") == "1"

# The KDF is weakened for tests only through this explicitly test-only switch.
os.environ.setdefault("BLOCKCRYPT_TESTONLY_WEAK_KDF", "1")


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


@pytest.fixture
def home(tmp_path) -> Path:
    """A fresh, not yet initialised blockcrypt home."""
    return tmp_path / "home"


@pytest.fixture
def passphrase_file(tmp_path) -> Path:
    p = tmp_path / "passphrase"
    p.write_bytes(b"correct horse battery staple\n")
    p.chmod(0o600)
    return p


def run_cli(*args, home: Path | None = None, passphrase_file: Path | None = None,
            check: bool = True, input: bytes | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m blockcrypt` in a subprocess, as a user would."""
    argv = [sys.executable, "-m", "blockcrypt"]
    if home is not None:
        argv += ["--home", str(home)]
    if passphrase_file is not None:
        argv += ["--passphrase-file", str(passphrase_file)]
    argv += [str(a) for a in args]
    full_env = dict(os.environ)
    full_env.update(env or {})
    # No terminal on stdin unless input is given: a command must never hang on a prompt.
    stdin = None if input is not None else subprocess.DEVNULL
    cp = subprocess.run(argv, capture_output=True, input=input, stdin=stdin, env=full_env,
                        timeout=timeout, cwd=REPO)
    if check and cp.returncode != 0:
        raise AssertionError(f"{argv} exited {cp.returncode}\nstdout: {cp.stdout.decode()}"
                             f"\nstderr: {cp.stderr.decode()}")
    return cp
