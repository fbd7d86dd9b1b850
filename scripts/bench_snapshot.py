#!/usr/bin/env python3
"""Write stalls during `snapshot create` of an attached, mounted disk (issue 14).

    .venv/bin/python scripts/bench_snapshot.py [--sizes 1G,4G] [--fs ext4,xfs] [--json F]
    make bench-snapshot

For each home file system (a loop-mounted ext4 or XFS image made here, so
ext4 means copy-before-write and XFS means reflink) and each data size: make
a home, an encrypted disk, attach it, put ext4 on it, mount it and fill it
with ``size`` bytes of data; then an fsync writer (4 KiB pwrite + fsync of
one file on the mounted disk, back to back, in a thread) records every
write's latency, first for ``--baseline-s`` seconds with no snapshot, then
while ``blockcrypt snapshot create`` runs.  Printed per row:

    base p99/max    write latency without a snapshot (ms)
    snap p99/max    write latency while the snapshot is being taken (ms)
    wall_s          `snapshot create` wall time (a new process: Python start included)
    method          reflink / copy-before-write
    targets         max stall <= 50 ms; on XFS wall_s <= 1 s

Needs root (loop devices, mount).  Homes use the test-only weak KDF.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_attach import REPO, cli  # noqa: E402 - scripts/ is sys.path[0]; sets the weak KDF

GiB = 1024 ** 3
MAX_STALL_MS = 50.0
XFS_WALL_S = 1.0


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Writer(threading.Thread):
    """4 KiB pwrite + fsync, back to back; (start time, latency s) of each."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        buf, i = os.urandom(4096), 0
        while not self.stop.is_set():
            t = time.perf_counter()
            os.pwrite(self.fd, buf, (i % 4096) * 4096)
            os.fsync(self.fd)
            self.samples.append((t, time.perf_counter() - t))
            i += 1


def stats(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    s = sorted(samples)
    return s[min(len(s) - 1, int(0.99 * len(s)))] * 1000, s[-1] * 1000


def writes_around(w: Writer, baseline_s: float, action):
    """Run ``action`` after ``baseline_s`` of the writer ``w`` (started here, stopped
    and closed after): ``(action's result, its wall time in s, (p99, max) ms of the
    writes before it, (p99, max) ms of the writes during it, how many ran during it)``."""
    w.start()
    time.sleep(baseline_s)                 # a benchmark's measuring window
    t0 = time.perf_counter()
    out = action()
    t1 = time.perf_counter()
    w.stop.set()
    w.join()
    os.close(w.fd)
    base = [lat for t, lat in w.samples if t < t0]
    during = [lat for t, lat in w.samples if t0 <= t <= t1]
    return out, t1 - t0, stats(base), stats(during), len(during)


def release(home: Path, pf: Path, mnt: Path, *, mounted: bool, attached: bool) -> None:
    """Unmount the file system at ``mnt`` and detach disk ``vol`` of ``home``, as far as
    they were set up (best effort: for a benchmark's ``finally``)."""
    if mounted:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    if attached:
        subprocess.run([sys.executable, "-m", "blockcrypt", "--home", str(home),
                        "--passphrase-file", str(pf), "disk", "detach", "vol"],
                       capture_output=True, cwd=REPO)


def one(fs: str, size: int, work: Path, baseline_s: float) -> dict:
    image, fsmnt = work / f"{fs}.img", work / f"{fs}-mnt"
    with open(image, "wb") as f:
        f.truncate(3 * size + 4 * GiB)
    run("mkfs.xfs", "-q", "-m", "reflink=1", str(image)) if fs == "xfs" else \
        run("mkfs.ext4", "-q", "-F", str(image))
    fsmnt.mkdir()
    run("mount", "-o", "loop", str(image), str(fsmnt))
    home, pf, mnt = fsmnt / "home", work / "pass", work / f"{fs}-disk"
    pf.write_bytes(b"throwaway bench passphrase\n")
    pf.chmod(0o600)
    attached = mounted = False
    try:
        cli(home, pf, "init")
        cli(home, pf, "disk", "create", "vol", "--size", str(size + GiB))
        dev = json.loads(cli(home, pf, "disk", "attach", "vol", "--json"))["device"]
        attached = True
        run("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        mnt.mkdir()
        run("mount", dev, str(mnt))
        mounted = True
        run("dd", "if=/dev/zero", f"of={mnt}/data", "bs=4M", f"count={size // (4 << 20)}",
            "oflag=direct", "conv=fsync", "status=none")
        w = Writer(mnt / "fsync-writer")
        snap_out, wall, (bp99, bmax), (sp99, smax), n_during = writes_around(
            w, baseline_s, lambda: cli(home, pf, "snapshot", "create", "vol", "s", "--json"))
        snap = json.loads(snap_out)
        ok = smax <= MAX_STALL_MS and (fs != "xfs" or wall <= XFS_WALL_S)
        return {"fs": fs, "data_gib": size / GiB, "base_p99_ms": bp99, "base_max_ms": bmax,
                "snap_p99_ms": sp99, "snap_max_ms": smax, "writes_during": n_during,
                "wall_s": wall, "method": snap["copy_method"],
                "copied_before_write_mib": snap["copied_before_write_bytes"] / 2 ** 20,
                "targets_met": ok}
    finally:
        release(home, pf, mnt, mounted=mounted, attached=attached)
        subprocess.run(["umount", str(fsmnt)], capture_output=True)
        image.unlink(missing_ok=True)


def parse_size(text: str) -> int:
    sys.path.insert(0, str(REPO))
    from blockcrypt.names import parse_size as p
    return p(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1G,4G", help="data sizes (default 1G,4G)")
    ap.add_argument("--fs", default="ext4,xfs", help="home file systems (default ext4,xfs)")
    ap.add_argument("--baseline-s", type=float, default=3.0)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--workdir", default="/var/tmp")
    args = ap.parse_args()
    rows = []
    for fs in args.fs.split(","):
        for size_text in args.sizes.split(","):
            with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bc-bench-snap-") as d:
                rows.append(one(fs, parse_size(size_text), Path(d), args.baseline_s))
            r = rows[-1]
            print(f"{r['fs']:5} {r['data_gib']:5.2f} GiB  base p99/max {r['base_p99_ms']:6.1f}/"
                  f"{r['base_max_ms']:6.1f} ms  snap p99/max {r['snap_p99_ms']:6.1f}/"
                  f"{r['snap_max_ms']:6.1f} ms ({r['writes_during']} writes)  "
                  f"wall {r['wall_s']:6.2f} s  {r['method']:17} "
                  f"{'targets met' if r['targets_met'] else 'TARGETS MISSED'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
