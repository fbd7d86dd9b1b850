"""scripts/bench_attach.py: one repetition runs under local, pkcs11 and kmip and reports
one KMIP Decrypt per attach (a measurement, never a speed threshold)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support.cli import REPO
from support.prereq import require_block_devices, require_tools

pytestmark = pytest.mark.e2e


def test_attach_bench_runs_every_provider(tmp_path):
    require_block_devices()
    require_tools("softhsm2-util")
    out = tmp_path / "attach.json"
    cp = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_attach.py"), "--reps",
                         "1", "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                        timeout=600)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["local", "pkcs11", "kmip"]
    assert all(r["unwrap_ms"] > 0 and r["attach_s"] > 0 for r in rows)
    assert rows[2]["decrypts_per_attach"] == 1
    assert "attach time per key provider" in cp.stdout
