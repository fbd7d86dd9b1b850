"""scripts/bench.py: the quick run completes and its output is well-formed.

Never a speed threshold (issues 7 and 13): the benchmark measures, CI only checks that
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
    assert "Targets (issue 13), measured on " in text and "blockcrypt / nbdkit-luks" in text
    assert "Cipher ceiling:" in text and "targets met." in text

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
    assert statuses <= {"PASS", "MISS"} and len(result["targets"]) == 19
    assert all(t["ceiling_nbdkit_file"] > 0 for t in result["targets"] if t["unit"] == "x")
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["tools"]["nbdkit"]

    png = out_png.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_targets_pass_and_miss_on_synthetic_figures():
    bench = load_bench()
    figures = {"seq_write_MBps": 1000.0, "seq_read_MBps": 1000.0,
               "randread_4k_iops": 1000.0, "randwrite_4k_iops": 1000.0, "peak_rss_MiB": 50.0}
    summary = {s: dict(figures) for s in bench.SERVERS}
    summary["blockcrypt-xts-4096"].update(seq_write_MBps=1999.0,     # 1.999x luks: MISS
                                          seq_read_MBps=1500.0,      # exactly 1.5x: PASS
                                          randread_4k_iops=1200.0,   # exactly 1.2x: PASS
                                          randwrite_4k_iops=1000.0)  # exactly 1.0x: PASS
    summary["blockcrypt-plain"].update(seq_write_MBps=2400.0, seq_read_MBps=1800.0)
    summary["blockcrypt-xts-512"]["randwrite_4k_iops"] = 999.0      # 0.999x luks: MISS
    summary["nbdkit-file"]["randread_4k_iops"] = 3000.0             # the ceiling: 3x luks
    summary["blockcrypt-plain"]["peak_rss_MiB"] = 150.5             # above 150 MiB: MISS
    rows = {t["target"]: t for t in bench.targets(summary)}
    status = {k: t["status"] for k, t in rows.items()}
    assert len(rows) == 19
    assert status["seq write, encrypted 4096 >= 2.0x nbdkit-luks"] == "MISS"
    assert status["seq read, encrypted 4096 >= 1.5x nbdkit-luks"] == "PASS"
    assert status["4K rand read QD32, encrypted 4096 >= 1.2x nbdkit-luks"] == "PASS"
    assert status["4K rand write QD32, encrypted 4096 >= 1.0x nbdkit-luks"] == "PASS"
    assert status["4K rand write QD32, encrypted 512 >= 1.0x nbdkit-luks"] == "MISS"
    assert status["seq read, encrypted 512 >= 1.0x nbdkit-luks"] == "PASS"
    # 1999 / 2400 = 0.833x plain: PASS; 1500 / 1800 = 0.833x: PASS; 1000/2400 (512): MISS
    assert status["seq write, encrypted 4096 >= 0.8x blockcrypt-plain"] == "PASS"
    assert status["seq write, encrypted 512 >= 0.8x blockcrypt-plain"] == "MISS"
    assert status["4K rand read QD32, encrypted 512 >= 0.8x blockcrypt-plain"] == "PASS"
    assert status["peak RSS of nbdkit, blockcrypt-plain <= 150 MiB"] == "MISS"
    assert status["peak RSS of nbdkit, blockcrypt-xts-4096 <= 150 MiB"] == "PASS"
    assert rows["4K rand read QD32, encrypted 4096 >= 1.2x nbdkit-luks"][
        "ceiling_nbdkit_file"] == pytest.approx(3.0)


def test_default_workdir_is_on_the_file_system_of_the_blockcrypt_home(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setenv("BLOCKCRYPT_HOME", str(tmp_path / "not" / "yet" / "home"))
    assert bench.blockcrypt_home() == tmp_path / "not" / "yet" / "home"
    assert bench.default_workdir_parent() == tmp_path       # nearest existing ancestor
    assert bench.filesystem_of(tmp_path).split(" (")[0] in open("/proc/self/mounts").read()


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
