"""`make demo` (scripts/demo.py) runs the whole story and exits 0, leaving nothing behind."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from support.cli import REPO, VENV_PY
from support.prereq import require_block_devices, require_tools

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("blockcrypt-demo-*")}


def test_demo_runs_end_to_end():
    require_block_devices()
    require_tools("rsync", "blkid")
    before = _leftovers()
    env = dict(os.environ)
    env.pop("BLOCKCRYPT_TESTONLY_WEAK_KDF", None)   # the demo must work with the real KDF
    cp = subprocess.run([str(VENV_PY), "scripts/demo.py"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
    assert cp.returncode == 0, f"demo failed:\n{cp.stdout}\n{cp.stderr}"
    out = cp.stdout
    for expected in ("snapshot", "ok: every file written before the snapshot is there",
                     "does not contain the plaintext", "disk copy", "audit", "Demo finished",
                     "ok: the key was generated inside the token",
                     "ok: the shred record names the disk that can no longer be read",
                     "ok: after resize2fs the file system has grown and the files are intact"):
        assert expected in out, expected
    assert "ok: the store uses the production KDF parameters" in out
    assert _leftovers() == before, "the demo left its temporary directory behind"
    with open("/proc/self/mountinfo") as f:
        assert "blockcrypt-demo-" not in f.read(), "the demo left a mount behind"
