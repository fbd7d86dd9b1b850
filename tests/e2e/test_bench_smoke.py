"""scripts/bench.py: the quick run completes and its output is well-formed.

Never a speed threshold (issue 7): the benchmark measures, CI only checks that
it runs every server and workload and writes a complete table, JSON and plot.
The PASS/MISS logic is checked on synthetic figures.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from support.cli import REPO
from support.prereq import require, require_tools

BENCH = REPO / "scripts" / "bench.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_bench():
    """scripts/bench.py as a module (it is a script, not part of the package)."""
    if "blockcrypt_bench" in sys.modules:
        return sys.modules["blockcrypt_bench"]
    spec = importlib.util.spec_from_file_location("blockcrypt_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["blockcrypt_bench"] = mod     # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.mark.e2e
def test_quick_run_produces_table_json_and_plot(tmp_path):
    require_tools("nbdkit", "nbdcopy", "nbdinfo", "fio", "qemu-nbd", "qemu-img", "openssl")
    require(importlib.util.find_spec("matplotlib") is not None, "matplotlib not installed")
    bench = load_bench()
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cp = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out_json),
                         "--plot", str(out_png)], capture_output=True, timeout=600, cwd=REPO)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")[-4000:]
    text = cp.stdout.decode()
    for server in bench.SERVERS:
        assert server.replace("blockcrypt-", "bc-") in text
    assert "Targets (issue 7):" in text and "blockcrypt / nbdkit-luks" in text

    result = json.loads(out_json.read_text())
    assert result["config"]["quick"] is True
    reps = result["config"]["repetitions"]
    assert reps >= 1
    assert result["servers"] == list(bench.SERVERS)
    workloads = [w for w, _, _ in bench.WORKLOADS]
    assert result["workloads"] == workloads
    for server in bench.SERVERS:
        for w in workloads:
            samples = result["samples"][server][w]
            assert len(samples) == reps and all(is_number(v) and v > 0 for v in samples), \
                (server, w, samples)
            assert is_number(result["median"][server][w]) and result["median"][server][w] > 0
        trace = result["rss_trace_MiB"][server]
        assert len(trace) == reps and all(
            set(t) == {"idle", "seq_write", "seq_read", "randread", "randwrite"}
            and all(is_number(v) and v > 0 for v in t.values()) for t in trace)
    for bc in bench.BLOCKCRYPT_SERVERS:
        for peer in bench.RATIO_PEERS:
            for w in bench.THROUGHPUT:
                ratio = result["ratios"][bc][peer][w]
                assert ratio == pytest.approx(result["median"][bc][w] / result["median"][peer][w])
    for ss in bench.CIPHER_SECTOR_SIZES:
        for op in ("encrypt_into", "decrypt_into"):
            for n in bench.CIPHER_REQUEST_BYTES:
                entry = result["cipher"][f"{op}/{ss}/{n}"]
                assert is_number(entry["median_MBps"]) and entry["median_MBps"] > 0
                assert len(entry["samples_MBps"]) == reps
    assert result["openssl_speed_MBps"] and all(
        is_number(v) and v > 0 for v in result["openssl_speed_MBps"].values())
    statuses = {t["status"] for t in result["targets"]}
    assert statuses <= {"PASS", "MISS"} and len(result["targets"]) == 11
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["tools"]["nbdkit"]

    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_targets_pass_and_miss_on_synthetic_figures():
    bench = load_bench()
    figures = {"seq_write_MBps": 1000.0, "seq_read_MBps": 1000.0,
               "randread_4k_iops": 1000.0, "randwrite_4k_iops": 1000.0, "peak_rss_MiB": 50.0}
    summary = {s: dict(figures) for s in bench.SERVERS}
    summary["blockcrypt-xts-4096"]["seq_write_MBps"] = 999.0        # 0.999x: MISS
    summary["blockcrypt-xts-512"]["seq_read_MBps"] = 700.0          # exactly 0.7x: PASS
    summary["blockcrypt-xts-512"]["randwrite_4k_iops"] = 849.0      # 0.849x plain: MISS
    summary["blockcrypt-plain"]["peak_rss_MiB"] = 150.5             # above 150 MiB: MISS
    status = {t["target"]: t["status"] for t in bench.targets(summary)}
    assert status["seq write, encrypted 4096 >= 1.0x nbdkit-luks"] == "MISS"
    assert status["seq read, encrypted 4096 >= 1.0x nbdkit-luks"] == "PASS"
    assert status["seq read, encrypted 512 >= 0.7x nbdkit-luks"] == "PASS"
    assert status["4K rand write, encrypted 512 >= 0.85x blockcrypt-plain"] == "MISS"
    assert status["4K rand read, encrypted 512 >= 0.85x blockcrypt-plain"] == "PASS"
    assert status["peak RSS of nbdkit, blockcrypt-plain <= 150 MiB"] == "MISS"
    assert status["peak RSS of nbdkit, blockcrypt-xts-4096 <= 150 MiB"] == "PASS"


def test_summary_uses_median_and_peak_rss_maximum():
    bench = load_bench()
    samples = {"nbdkit-file": {"seq_write_MBps": [3.0, 1.0, 100.0], "peak_rss_MiB": [9, 12, 10]}}
    summary = bench.summarise(samples)
    assert summary["nbdkit-file"] == {"seq_write_MBps": 3.0, "peak_rss_MiB": 12}


@pytest.mark.parametrize("text,size", [("1G", 1 << 30), ("64M", 64 << 20), ("256MiB", 256 << 20),
                                       (str(32 << 20), 32 << 20)])
def test_parse_size(text, size):
    assert load_bench().parse_size(text) == size


@pytest.mark.parametrize("text", ["1", "15M", "64.5M", "1X", "-1G"])
def test_parse_size_refuses(text):
    bench = load_bench()
    with pytest.raises(Exception, match="size"):
        bench.parse_size(text)
