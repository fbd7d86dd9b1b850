#!/usr/bin/env python3
"""RBD rows of `make bench` (issue 17): blockcrypt on Ceph RBD next to qemu's rbd driver.

    .venv/bin/python scripts/bench_rbd.py [--size 512M] [--reps 3] [--snapshot-data 1G]
                                          [--rbd-cache off|on] [--json F] [--workdir DIR]
    .venv/bin/python scripts/bench_rbd.py --quick      # 64 MiB, 1 repetition (smoke)
    make bench-rbd                                     # also the last step of `make bench`

It starts a throwaway single-node Ceph cluster with scripts/ceph-test-cluster.sh
(one mon, one mgr, one bluestore OSD on a 4 GiB sparse file, all on 127.0.0.1,
cephx on) in a work directory beside the blockcrypt home, on the file system users
keep their disks on, and stops it on every exit path.  On that one cluster, with
the same source data, it measures three NBD servers, each on a fresh RBD image of
``--size`` bytes in pool ``rbd``:

    blockcrypt-rbd-xts-4096  `blockcrypt store add ceph --type rbd`, `disk create
                             --store ceph --sector-size 4096` (AES-256-XTS), `disk serve`
    blockcrypt-rbd-plain     the same, `--no-encrypted`
    qemu-nbd-rbd-luks        `qemu-img create -f rbd -o encrypt.format=luks` (librbd's
                             LUKS1 encryption, aes-xts-plain64, 512-byte sectors) served
                             by `qemu-nbd --image-opts driver=rbd,...,encrypt.format=luks`:
                             the C peer; its passphrase is read from a 0600 file by a
                             qemu `secret` object (never argv)
    qemu-nbd-rbd-luks2       optional (--servers): the same with LUKS2 (4096-byte sectors)

with bench.py's workloads (nbdcopy sequential write/read, fio 4 KiB random read and
write at queue depth 32, all over Unix sockets) and bench.py's read-back check.
Untimed, after the sequential write, the raw RBD image is searched for a block
of the source: an encrypted server whose image holds plaintext stops the run;
the plain server's image must hold it (that proves the search looks where the
data is).

librbd's writeback cache (../shared/CEPH.md, pitfall 9) would make small writes
measure the cache: every image gets ``conf_rbd_cache=false`` (per image) before it
is opened and qemu-nbd runs with ``--cache=none``; ``--rbd-cache on`` turns it on
for both sides instead.  The output says which.

The snapshot row (root): an attached encrypted RBD disk with ext4 and
``--snapshot-data`` bytes on it; scripts/bench_snapshot.py's fsync writer runs
while `blockcrypt snapshot create` takes an RBD snapshot: wall time (a new CLI
process) and the writer's longest stall.  Method and results: docs/BENCHMARKS.md.

Targets (issue 17), PASS/MISS: blockcrypt-rbd-xts-4096 >= 1.0x qemu-nbd-rbd-luks on
each throughput workload; snapshot wall time <= 1 s; max write stall <= 50 ms.
Nothing here is a pass/fail test.  Homes use the test-only weak KDF (init and
unlock only; not the data path).  Exit status: 0 measured, 17 a server or tool
failed, 130 interrupted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench  # scripts/ is sys.path[0]
from bench import (
    BenchError,
    MiB,
    ProcessTable,
    Running,
    ServerFactory,
    fmt_num,
    run_tool,
    say,
    table,
)

sys.path.insert(0, str(bench.REPO / "tests"))
from support.ceph import Cluster, start_cluster  # noqa: E402

BC_XTS, BC_PLAIN = "blockcrypt-rbd-xts-4096", "blockcrypt-rbd-plain"
PEER, PEER2 = "qemu-nbd-rbd-luks", "qemu-nbd-rbd-luks2"
SERVERS = (BC_XTS, BC_PLAIN, PEER, PEER2)
DEFAULT_SERVERS = (BC_XTS, BC_PLAIN, PEER)
ENCRYPTED = (BC_XTS, PEER, PEER2)
RATIO_TARGET = 1.0
SNAP_WALL_S = 1.0
SNAP_STALL_MS = 50.0
STORE = "ceph"
IMAGE_RM_TIMEOUT_S = 60.0
EXIT_FAILED = 17          # the project's exit codes 17-19 are this issue's

# Untimed plaintext search: one 4 KiB block of the source, looked for within this
# distance of its virtual offset in the raw image (covers any header in front of it).
SEARCH_WINDOW = 32 * MiB
SEARCH_SCRIPT = r"""
import sys, rados, rbd
conf, pool, sample_path, start, length = sys.argv[1:6]
sample = open(sample_path, "rb").read()
c = rados.Rados(conffile=conf); c.connect(timeout=30)
try:
    io = c.open_ioctx(pool)
    found = []
    for image in sys.argv[6:]:
        with rbd.Image(io, image, read_only=True) as im:
            lo = max(0, int(start)); hi = min(im.size(), int(start) + int(length))
            found.append(sample in im.read(lo, hi - lo))
    print("found" if any(found) else "absent")
finally:
    c.shutdown()
"""


class RbdServerFactory(ServerFactory):
    """bench.py's factory with the RBD servers; every image lives in ``cluster``."""

    def __init__(self, workdir: Path, size_bytes: int, procs: ProcessTable, cluster: Cluster,
                 rbd_cache: bool, serve_threads: int | None = None):
        super().__init__(workdir, size_bytes, procs)
        self.cluster = cluster
        self.rbd_cache = rbd_cache
        self.serve_args = () if serve_threads is None else ("--threads", str(serve_threads))
        self.images: dict[str, list[str]] = {}      # run dir name -> RBD images it made

    def starters(self, run_dir: Path, sock: Path, log: Path) -> dict:
        return {
            BC_XTS: lambda: self._bc_rbd(run_dir, sock, log, True),
            BC_PLAIN: lambda: self._bc_rbd(run_dir, sock, log, False),
            PEER: lambda: self._qemu_rbd(run_dir, sock, log, "luks"),
            PEER2: lambda: self._qemu_rbd(run_dir, sock, log, "luks2"),
        }

    def set_cache(self, image: str) -> None:
        set_cache(self.cluster, image, self.rbd_cache)

    def _bc_rbd(self, run_dir: Path, sock: Path, log: Path, encrypted: bool):
        before = set(self.cluster.images())

        def after_create() -> None:
            new = sorted(set(self.cluster.images()) - before)
            if not new:
                raise BenchError("`blockcrypt disk create --store` made no RBD image")
            self.images[run_dir.name] = new
            for image in new:
                self.set_cache(image)

        add = ("store", "add", STORE, "--type", "rbd", "--conf", str(self.cluster.conf),
               "--pool", self.cluster.pool)
        return self._blockcrypt(run_dir, sock, log, encrypted, 4096, setup=(add,),
                                create_args=("--store", STORE), serve_args=self.serve_args,
                                after_create=after_create)

    def _qemu_rbd(self, run_dir: Path, sock: Path, log: Path, fmt: str):
        image = f"qemu-{run_dir.name}"
        self.images[run_dir.name] = [image]
        conf, pool = self.cluster.conf, self.cluster.pool
        run_tool(["qemu-img", "create", "-q", "-f", "rbd",
                  "--object", f"secret,id=s0,file={self.luks_pass_file}",
                  "-o", f"encrypt.format={fmt},encrypt.key-secret=s0,encrypt.cipher-alg=aes-256",
                  f"rbd:{pool}/{image}:conf={conf}", str(self.size_bytes)],
                 what="qemu-img create -f rbd")
        self.set_cache(image)
        argv = ["qemu-nbd", "--persistent", "-k", str(sock),
                f"--cache={'writeback' if self.rbd_cache else 'none'}",
                "--object", f"secret,id=s0,file={self.luks_pass_file}",
                "--image-opts", f"driver=rbd,pool={pool},image={image},conf={conf},"
                                f"encrypt.format={fmt},encrypt.key-secret=s0"]
        return self.procs.spawn(argv, log=log), [self._uri(sock)]

    def plaintext_in_image(self, running: Running, source: Path) -> bool:
        """Whether a 4 KiB block from the middle of ``source`` is in the raw image(s)."""
        offset = (self.size_bytes // 2) // 4096 * 4096
        sample = self.workdir / "sample.bin"
        with open(source, "rb") as f:
            sample.write_bytes(os.pread(f.fileno(), 4096, offset))
        images = self.images[running.log.parent.name]
        cp = run_tool([bench.SYSTEM_PYTHON, "-c", SEARCH_SCRIPT, str(self.cluster.conf),
                       self.cluster.pool, str(sample), str(max(0, offset - SEARCH_WINDOW)),
                       str(2 * SEARCH_WINDOW), *images], what="raw image search", timeout=300)
        return cp.stdout.decode().strip() == "found"

    def cleanup_run(self, running: Running) -> None:
        """Stop the server, then remove its images (the OSD holds only 4 GiB)."""
        super().cleanup_run(running)
        for image in self.images.pop(running.log.parent.name, []):
            remove_image(self.cluster, image)


def set_cache(cluster: Cluster, image: str, on: bool) -> None:
    """The per-image librbd cache setting (applies when the image is next opened)."""
    cluster.rbd("image-meta", "set", f"{cluster.pool}/{image}", "conf_rbd_cache",
                "true" if on else "false")


def remove_image(cluster: Cluster, image: str) -> None:
    """`rbd rm`, retried while the stopped server's watch on the image expires."""
    deadline = time.monotonic() + IMAGE_RM_TIMEOUT_S
    while True:
        cp = cluster.rbd("rm", "--no-progress", f"{cluster.pool}/{image}", check=False)
        if cp.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"rbd rm {image} failed: {cp.stderr.strip()}")
        time.sleep(0.5)


# -- the snapshot row -----------------------------------------------------------

def snapshot_row(cluster: Cluster, workdir: Path, data_bytes: int, baseline_s: float,
                 rbd_cache: bool) -> dict:
    """Attach an encrypted RBD disk, fill it with ``data_bytes`` on ext4, and time
    `snapshot create` while an fsync writer runs on it."""
    from bench_attach import cli
    from bench_snapshot import Writer, release, writes_around
    home, pf, mnt = workdir / "snap-home", workdir / "passphrase", workdir / "snap-mnt"
    attached = mounted = False
    try:
        cli(home, pf, "init")
        cli(home, pf, "store", "add", STORE, "--type", "rbd", "--conf", str(cluster.conf),
            "--pool", cluster.pool)
        before = set(cluster.images())
        cli(home, pf, "disk", "create", "vol", "--size", str(data_bytes + 256 * MiB),
            "--store", STORE)
        for image in set(cluster.images()) - before:
            set_cache(cluster, image, rbd_cache)
        dev = json.loads(cli(home, pf, "disk", "attach", "vol", "--json"))["device"]
        attached = True
        run_tool(["mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev],
                 what="mkfs.ext4")
        mnt.mkdir()
        run_tool(["mount", dev, str(mnt)], what="mount")
        mounted = True
        t_fill = time.perf_counter()
        run_tool(["dd", "if=/dev/urandom", f"of={mnt}/data", "bs=4M",
                  f"count={data_bytes // (4 * MiB)}", "oflag=direct", "conv=fsync",
                  "status=none"], what="dd (fill)")
        fill_s = time.perf_counter() - t_fill
        w = Writer(mnt / "fsync-writer")
        snap_out, wall_s, (bp99, bmax), (sp99, smax), n_during = writes_around(
            w, baseline_s, lambda: cli(home, pf, "snapshot", "create", "vol", "s", "--json"))
        return {"data_bytes": data_bytes, "fill_MBps": data_bytes / fill_s / 1e6,
                "base_p99_ms": bp99, "base_max_ms": bmax, "snap_p99_ms": sp99,
                "snap_max_ms": smax, "writes_during": n_during, "wall_s": wall_s,
                "snapshot": json.loads(snap_out)}
    finally:
        release(home, pf, mnt, mounted=mounted, attached=attached)


# -- summary --------------------------------------------------------------------

def targets(summary: dict, snap: dict | None) -> list[dict]:
    labels = {w: label for w, label, _ in bench.WORKLOADS}
    rows = []
    if BC_XTS in summary and PEER in summary:
        for w in bench.THROUGHPUT:
            v = summary[BC_XTS][w] / summary[PEER][w]
            rows.append({"target": f"{labels[w]}, {BC_XTS} >= {RATIO_TARGET:.1f}x {PEER}",
                         "measured": v, "unit": "x", "threshold": RATIO_TARGET,
                         "status": "PASS" if v >= RATIO_TARGET else "MISS"})
    if snap is not None:
        gib = snap["data_bytes"] / 2 ** 30
        rows.append({"target": f"snapshot of an RBD disk holding {gib:g} GiB, wall <= "
                               f"{SNAP_WALL_S:g} s", "measured": snap["wall_s"], "unit": "s",
                     "threshold": SNAP_WALL_S,
                     "status": "PASS" if snap["wall_s"] <= SNAP_WALL_S else "MISS"})
        rows.append({"target": f"max fsync-write stall during it <= {SNAP_STALL_MS:g} ms",
                     "measured": snap["snap_max_ms"], "unit": "ms", "threshold": SNAP_STALL_MS,
                     "status": "PASS" if snap["snap_max_ms"] <= SNAP_STALL_MS else "MISS"})
    return rows


def servers_text(result: dict, short: dict[str, str]) -> list[str]:
    """The servers table, the ratios to the qemu peer and the plaintext search."""
    cfg, summary, servers = result["config"], result["median"], result["servers"]
    out = [f"\nServers (median of {cfg['repetitions']} alternating repetition(s), "
           f"{cfg['size_bytes'] / MiB:,.0f} MiB each, peak RSS = max):"]
    out.append(table(["workload"] + [short[s] for s in servers],
                     [[f"{label} ({unit})"] + [fmt_num(summary[s][w]) for s in servers]
                      for w, label, unit in bench.WORKLOADS]))
    bcs = [s for s in (BC_XTS, BC_PLAIN) if s in summary]
    if PEER in summary and bcs:
        out.append(f"\nblockcrypt / {PEER} (higher is better):")
        out.append(table(["workload"] + [short[s] for s in bcs],
                         [[label] + [f"{summary[s][w] / summary[PEER][w]:.2f}x" for s in bcs]
                          for w, label, _ in bench.WORKLOADS if w in bench.THROUGHPUT]))
    checks = result["plaintext_in_raw_image"]
    out.append("\nRaw image holds a source block in plaintext: "
               + ", ".join(f"{short[s]} {'yes' if v else 'no'}" for s, v in checks.items()))
    return out


def report_text(result: dict) -> str:
    cfg = result["config"]
    short = {s: s.replace("blockcrypt-", "bc-") for s in SERVERS}
    out = [f"\nCeph RBD: {cfg['cluster']}; librbd cache {cfg['rbd_cache']}; blockcrypt "
           f"served with {cfg['blockcrypt_serve']}."]
    if result["servers"]:
        out += servers_text(result, short)
    snap = result.get("snapshot")
    if snap:
        out.append(f"\nSnapshot of {snap['data_bytes'] / 2 ** 30:g} GiB on {short[BC_XTS]} "
                   f"(ext4, attached): wall {snap['wall_s']:.2f} s; fsync writes p99/max "
                   f"{snap['base_p99_ms']:.1f}/{snap['base_max_ms']:.1f} ms before, "
                   f"{snap['snap_p99_ms']:.1f}/{snap['snap_max_ms']:.1f} ms during "
                   f"({snap['writes_during']} writes); fill {snap['fill_MBps']:.0f} MB/s")
    elif result.get("snapshot_note"):
        out.append(f"\nSnapshot row: {result['snapshot_note']}")
    if result["targets"]:
        out.append("\nTargets (issue 17):")
        out.append(table(["target", "measured", "result"],
                         [[t["target"], f"{t['measured']:.2f}"
                           + ("x" if t["unit"] == "x" else f" {t['unit']}"), t["status"]]
                          for t in result["targets"]]))
        passed = sum(t["status"] == "PASS" for t in result["targets"])
        out.append(f"{passed} of {len(result['targets'])} targets met.")
    return "\n".join(out)


# -- main -----------------------------------------------------------------------

def serve_text(threads: int | None) -> str:
    from blockcrypt.system.commands import default_threads
    if threads is None:
        return (f"`disk serve NAME --unix SOCK` (the default for RBD disks, "
                f"{default_threads(on_rbd=True)} nbdkit threads)")
    return f"`disk serve NAME --unix SOCK --threads {threads}`"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=bench.parse_size, default=None,
                   help="data size per server (default 512M; 64M with --quick)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 quick)")
    p.add_argument("--fio-runtime", type=float, default=None,
                   help="seconds per fio run (default 10; 2 with --quick)")
    p.add_argument("--snapshot-data", type=bench.parse_size, default=None,
                   help="data on the snapshotted disk (default 1G; 64M with --quick)")
    p.add_argument("--no-snapshot", action="store_true", help="skip the snapshot row")
    p.add_argument("--snapshot-only", action="store_true",
                   help="only the snapshot row (no throughput servers)")
    p.add_argument("--rbd-cache", choices=("off", "on"), default="off",
                   help="librbd writeback cache on every image (default off)")
    p.add_argument("--serve-threads", type=int, default=None, metavar="N",
                   help="`disk serve --threads N` for the blockcrypt servers (default: the "
                        "CLI's default, as users run it)")
    p.add_argument("--quick", action="store_true", help="64 MiB, 1 repetition, 2 s fio")
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help=f"comma-separated subset of: {', '.join(SERVERS)}")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the cluster's files live (default: beside the blockcrypt home)")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    args = p.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else 512 * MiB)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    args.fio_runtime = args.fio_runtime or (2.0 if args.quick else 10.0)
    args.snapshot_data = args.snapshot_data or (64 * MiB if args.quick else 1024 * MiB)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.snapshot_only and args.no_snapshot:
        p.error("--snapshot-only and --no-snapshot exclude each other")
    if args.snapshot_only:
        args.servers, args.reps = [], 0
    elif not args.servers or set(args.servers) - set(SERVERS):
        p.error(f"choose servers from {', '.join(SERVERS)}")
    if args.size + args.snapshot_data > 2 * 1024 * MiB:
        p.error("the cluster's OSD holds 4 GiB: keep --size + --snapshot-data <= 2 GiB")
    return args


def check_prerequisites() -> None:
    bench.check_tools()
    missing = [t for t in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd")
               if shutil.which(t) is None]
    if subprocess.run([bench.SYSTEM_PYTHON, "-c", "import rados, rbd"],
                      capture_output=True).returncode:
        missing.append("python3-rbd")
    if missing:
        raise BenchError(f"missing: {', '.join(missing)}; run `make install`")
    if os.geteuid() != 0:
        raise BenchError("the Ceph test cluster and the snapshot row need root")


def run(args: argparse.Namespace) -> dict:
    check_prerequisites()
    procs = ProcessTable()
    parent = args.workdir or bench.default_workdir_parent()
    workdir = Path(tempfile.mkdtemp(prefix="blockcrypt-bench-rbd-", dir=parent))
    workdir.chmod(0o700)
    fs = bench.filesystem_of(workdir)
    started = datetime.datetime.now(datetime.timezone.utc)
    cluster = None
    try:
        say(f"work dir {workdir} on {fs}; starting a Ceph test cluster (bluestore) ...")
        t0 = time.monotonic()
        cluster = start_cluster(workdir)
        say(f"cluster up in {time.monotonic() - t0:.1f} s; {args.size / MiB:,.0f} MiB per "
            f"server, {args.reps} repetition(s), fio {args.fio_runtime:g} s, "
            f"librbd cache {args.rbd_cache}")
        source = workdir / "source.bin"
        bench.make_source(source, args.size)
        factory = RbdServerFactory(workdir, args.size, procs, cluster, args.rbd_cache == "on",
                                   args.serve_threads)
        samples = {s: {w: [] for w, _, _ in bench.WORKLOADS} for s in args.servers}
        plaintext: dict[str, bool] = {}
        for rep in range(args.reps):
            k = rep % len(args.servers)
            for name in args.servers[k:] + args.servers[:k]:
                say(f"rep {rep + 1}/{args.reps}: {name} ...", end=" ")
                srv = factory.start(name)
                try:
                    def check(srv=srv, name=name) -> None:
                        found = factory.plaintext_in_image(srv, source)
                        plaintext[name] = found
                        if found and name in ENCRYPTED:
                            raise BenchError(f"{name}: the raw RBD image holds plaintext")
                    r, _ = bench.run_workloads(srv, source, args.size, args.fio_runtime,
                                               srv.log.parent, after_read_back=check)
                finally:
                    factory.cleanup_run(srv)
                for w, v in r.items():
                    samples[name][w].append(v)
                say(", ".join(f"{w}={fmt_num(v)}" for w, v in r.items()), prefix=False)
        snap, snap_note = None, None
        if args.no_snapshot:
            snap_note = "skipped (--no-snapshot)"
        else:
            say(f"snapshot row: {args.snapshot_data / MiB:,.0f} MiB on an attached RBD disk ...")
            try:
                snap = snapshot_row(cluster, workdir, args.snapshot_data,
                                    1.0 if args.quick else 3.0, args.rbd_cache == "on")
            except (BenchError, SystemExit, subprocess.CalledProcessError) as e:
                snap_note = f"failed: {e}"
                say(f"snapshot row {snap_note}")
    finally:
        procs.stop_all()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = bench.summarise(samples)
    if plaintext.get(BC_PLAIN) is False:
        say(f"note: the search did not find the plaintext in {BC_PLAIN}'s image, so its "
            "'no' for the encrypted servers proves little")
    result = {
        "format": "blockcrypt-bench-rbd/1",
        "started_at": started.isoformat(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config": {"size_bytes": args.size, "repetitions": args.reps,
                   "fio_runtime_s": args.fio_runtime, "quick": args.quick,
                   "cluster": f"one mon, one mgr, one bluestore OSD (4 GiB sparse file) on "
                              f"127.0.0.1, files on {fs}, pool size 1",
                   "rbd_cache": f"{args.rbd_cache} on every image (per-image conf_rbd_cache="
                                f"{'true' if args.rbd_cache == 'on' else 'false'}; qemu-nbd "
                                f"--cache={'writeback' if args.rbd_cache == 'on' else 'none'})",
                   "blockcrypt_serve": serve_text(args.serve_threads),
                   "units": {"MBps": "10^6 bytes per second", "MiB": "2^20 bytes"}},
        "machine": bench.machine_info(),
        "servers": args.servers,
        "samples": samples,
        "median": summary,
        "plaintext_in_raw_image": plaintext,
        "snapshot": snap,
        "snapshot_note": snap_note,
    }
    result["targets"] = targets(summary, snap)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, bench._raise_interrupt)
    try:
        result = run(args)
    except KeyboardInterrupt:
        say("interrupted; servers and the Ceph cluster stopped, temporary files removed")
        return 130
    except (BenchError, SystemExit, subprocess.CalledProcessError) as e:
        say(f"error: {e}")
        return EXIT_FAILED
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        say(f"JSON written to {args.json}")
    print(report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
