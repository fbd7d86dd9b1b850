"""scripts/bench_rbd.py (issue 17): the quick run completes on its own throwaway Ceph
cluster, every server really encrypts (or not), and the output is well-formed.

Never a speed threshold: CI checks that the benchmark works; the PASS/MISS logic is
checked on synthetic figures.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from support.ceph import require_ceph
from support.cli import REPO
from support.prereq import require_block_devices, require_tools

SCRIPTS = REPO / "scripts"


def load_bench_rbd():
    """scripts/bench_rbd.py as a module (it imports scripts/bench.py as ``bench``)."""
    if "blockcrypt_bench_rbd" in sys.modules:
        return sys.modules["blockcrypt_bench_rbd"]
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("blockcrypt_bench_rbd",
                                                  SCRIPTS / "bench_rbd.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["blockcrypt_bench_rbd"] = mod
    spec.loader.exec_module(mod)
    return mod


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.e2e
def test_quick_rbd_run_measures_every_server_and_the_snapshot(tmp_path):
    require_ceph()
    require_block_devices()
    require_tools("nbdcopy", "nbdinfo", "fio", "qemu-nbd", "qemu-img")
    b = load_bench_rbd()
    out_json = tmp_path / "bench-rbd.json"
    cp = subprocess.run([sys.executable, str(SCRIPTS / "bench_rbd.py"), "--quick",
                         "--servers", ",".join(b.SERVERS), "--json", str(out_json)],
                        capture_output=True, timeout=900, cwd=REPO)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")[-4000:]
    text = cp.stdout.decode()
    assert "librbd cache off on every image" in text and "targets met." in text
    result = json.loads(out_json.read_text())
    assert result["servers"] == list(b.SERVERS)
    for server in b.SERVERS:
        for w, _, _ in b.bench.WORKLOADS:
            assert all(is_number(v) and v > 0 for v in result["samples"][server][w]), (server, w)
    # the plain image holds the source block in clear, no encrypted image does
    assert result["plaintext_in_raw_image"] == {s: s == b.BC_PLAIN for s in b.SERVERS}
    snap = result["snapshot"]
    assert snap is not None, result["snapshot_note"]
    assert snap["writes_during"] > 0 and snap["wall_s"] > 0 and snap["base_max_ms"] > 0
    assert [t["unit"] for t in result["targets"]] == ["x"] * 4 + ["s", "ms"]
    assert {t["status"] for t in result["targets"]} <= {"PASS", "MISS"}


def test_rbd_targets_pass_and_miss_on_synthetic_figures():
    b = load_bench_rbd()
    figures = {"seq_write_MBps": 300.0, "seq_read_MBps": 300.0,
               "randread_4k_iops": 3000.0, "randwrite_4k_iops": 3000.0, "peak_rss_MiB": 50.0}
    summary = {s: dict(figures) for s in b.DEFAULT_SERVERS}
    summary[b.BC_XTS].update(seq_write_MBps=299.0, randread_4k_iops=3001.0)
    snap = {"data_bytes": 1 << 30, "wall_s": 1.0, "snap_max_ms": 50.5}
    rows = {t["target"]: t["status"] for t in b.targets(summary, snap)}
    assert rows == {
        f"seq write, {b.BC_XTS} >= 1.0x {b.PEER}": "MISS",
        f"seq read, {b.BC_XTS} >= 1.0x {b.PEER}": "PASS",          # exactly 1.0x
        f"4K rand read QD32, {b.BC_XTS} >= 1.0x {b.PEER}": "PASS",
        f"4K rand write QD32, {b.BC_XTS} >= 1.0x {b.PEER}": "PASS",
        "snapshot of an RBD disk holding 1 GiB, wall <= 1 s": "PASS",   # exactly 1 s
        "max fsync-write stall during it <= 50 ms": "MISS",
    }
    assert len(b.targets({b.BC_XTS: figures}, None)) == 0     # no peer, no snapshot


@pytest.mark.parametrize("argv", [["--size", "1G", "--snapshot-data", "1536M"],
                                  ["--servers", "nbdkit-luks"]])
def test_rbd_bench_refuses_bad_arguments(argv):
    b = load_bench_rbd()
    with pytest.raises(SystemExit) as e:
        b.parse_args(argv)
    assert e.value.code == 2
