#!/usr/bin/env python3
"""Side-by-side throughput benchmark: blockcrypt against the C LUKS servers (issue 13).

    .venv/bin/python scripts/bench.py [--size 1G] [--reps 3] [--workdir DIR]
                                      [--json F] [--plot F.png]
    .venv/bin/python scripts/bench.py --quick          # 64 MiB, 1 repetition (CI smoke)
    make bench BENCH_ARGS="--json bench.json --plot bench.png"

On one machine, in one run, on the same data size, it measures six servers:

    blockcrypt-xts-4096   blockcrypt, AES-256-XTS, 4096-byte sectors
    blockcrypt-xts-512    blockcrypt, AES-256-XTS, 512-byte sectors
    blockcrypt-plain      blockcrypt, same plugin, unencrypted (4096-byte sectors)
    nbdkit-file           `nbdkit file` (C, no crypto): the transport's ceiling
    nbdkit-luks           `nbdkit file --filter=luks` (C, AES-256-XTS, LUKSv1)
    qemu-nbd-luks         `qemu-nbd` on a LUKS image (C, AES-256-XTS)

with these workloads, all over Unix sockets (no root needed):

    seq_write_MBps        nbdcopy from a file of random bytes on the work dir to the server
    seq_read_MBps         nbdcopy --no-extents from the server to null:
    randread_4k_iops      fio, nbd engine, 4 KiB random reads, queue depth 32
    randwrite_4k_iops     fio, nbd engine, 4 KiB random writes, queue depth 32
    peak_rss_MiB          VmHWM of the server process (nbdkit / qemu-nbd) after the above

plus the cipher alone (blockcrypt.crypto.xts.XtsCipher.encrypt_into / decrypt_into, one
thread, requests of 4 KiB to 32 MiB, both sector sizes) next to
`openssl speed -evp aes-256-xts`.

Images live on the file system that holds the blockcrypt home ($BLOCKCRYPT_HOME,
/var/lib/blockcrypt as root, else ~/.local/share/blockcrypt), where users keep
their disks: tmpfs flatters every server.  --workdir DIR measures elsewhere.  The
file system measured (type and mount point) is printed and kept in the JSON.

Every repetition starts each server once on a fresh, empty image, in turn, so
drift on a noisy machine hits all servers alike; the medians are reported (the
peak RSS is the maximum).  MB/s are 10^6 bytes per second.  The targets of
issue 13 are printed with PASS/MISS, each beside its ceilings: what nbdkit-file
(the transport alone, no crypto) reaches against the same reference, and
`openssl speed -evp aes-256-xts` for the cipher.  Nothing here is a pass/fail
test: CI runs only `--quick` to check that the benchmark works.

The blockcrypt homes made here use BLOCKCRYPT_TESTONLY_WEAK_KDF=1 so that
`init` and unlocking take milliseconds; the KDF runs only when the data key is
unwrapped at start-up and has no effect on the data path being measured.  All
passphrases are throwaway values for throwaway images.

Cleanup: every server runs in its own process group, is asked to stop with
SIGTERM (then SIGKILL) and is also sent SIGTERM by the kernel if this script
dies (PR_SET_PDEATHSIG); the work directory is removed on every exit path,
including Ctrl-C and SIGTERM.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SYSTEM_PYTHON = "/usr/bin/python3"     # has python3-libnbd (the `nbd` module)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BLOCKCRYPT_SERVERS = ("blockcrypt-xts-4096", "blockcrypt-xts-512", "blockcrypt-plain")
PEER_SERVERS = ("nbdkit-file", "nbdkit-luks", "qemu-nbd-luks")
SERVERS = BLOCKCRYPT_SERVERS + PEER_SERVERS
RATIO_PEERS = ("nbdkit-luks", "qemu-nbd-luks")

# (key, label, unit); throughput workloads first, higher is better.
WORKLOADS = (
    ("seq_write_MBps", "seq write", "MB/s"),
    ("seq_read_MBps", "seq read", "MB/s"),
    ("randread_4k_iops", "4K rand read QD32", "IOPS"),
    ("randwrite_4k_iops", "4K rand write QD32", "IOPS"),
    ("peak_rss_MiB", "peak RSS", "MiB"),
)
THROUGHPUT = tuple(k for k, _, _ in WORKLOADS if k != "peak_rss_MiB")

CIPHER_REQUEST_BYTES = (4 * KiB, 64 * KiB, 1 * MiB, 32 * MiB)
CIPHER_SECTOR_SIZES = (4096, 512)

RSS_TARGET_MiB = 150
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 15.0

# Passphrase of the throwaway LUKS images and blockcrypt homes (never a real secret).
THROWAWAY_PASSPHRASE = b"blockcrypt-bench-throwaway\n"

PR_SET_PDEATHSIG = 1


class BenchError(RuntimeError):
    """A server or tool failed; the message carries what to look at."""


# -- processes ------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _child_setup() -> None:
    """In the child before exec: die with the benchmark (SIGTERM if it goes away)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ProcessTable:
    """Every long-running process this script started, stopped on every exit path."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], *, log: Path, env: dict | None = None) -> subprocess.Popen:
        with open(log, "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=_child_setup)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the process group we created for ``proc``, then SIGKILL it."""
        for sig, wait_s in ((signal.SIGTERM, SERVER_STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        # Members of the group that outlived the leader (e.g. nbdkit under the CLI).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self._procs):
            self.stop(proc)


def run_tool(argv: list[str], *, timeout: float = 3600, env: dict | None = None,
             what: str | None = None) -> subprocess.CompletedProcess:
    cp = subprocess.run(argv, capture_output=True, timeout=timeout, env=env,
                        stdin=subprocess.DEVNULL, preexec_fn=_child_setup)
    if cp.returncode != 0:
        raise BenchError(f"{what or argv[0]} failed (exit {cp.returncode}): {' '.join(argv)}\n"
                         f"{cp.stderr.decode(errors='replace')[-2000:]}"
                         f"{cp.stdout.decode(errors='replace')[-1000:]}")
    return cp


def descendants(pid: int) -> list[int]:
    """pid and all its descendants (via /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size (VmHWM) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM in /proc/{pid}/status")


# -- servers --------------------------------------------------------------------

@dataclass
class Running:
    """A server that answers on ``uri``; ``rss_pid`` is the process whose VmHWM counts."""
    name: str
    uri: str
    proc: subprocess.Popen
    rss_pid: int
    log: Path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # Only shortens Argon2id at init / unlock; the data path does not use the KDF.
    env["BLOCKCRYPT_TESTONLY_WEAK_KDF"] = "1"
    return env


def cli_argv(home: Path, passphrase_file: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "blockcrypt", "--home", str(home),
            "--passphrase-file", str(passphrase_file), *args]


def wait_until_serving(proc: subprocess.Popen, sock: Path, uris: list[str], log: Path,
                       size_bytes: int) -> str:
    """Wait for ``sock`` and a successful NBD handshake; return the URI that worked."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited {proc.returncode} before serving; log {log}:\n"
                             f"{log.read_text(errors='replace')[-3000:]}")
        if sock.exists():
            for uri in uris:
                cp = subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                                    timeout=30, stdin=subprocess.DEVNULL)
                if cp.returncode == 0:
                    served = int(cp.stdout.split()[0])
                    if served != size_bytes:
                        raise BenchError(f"{uri} serves {served} bytes, expected {size_bytes}")
                    return uri
                last = cp.stderr.decode(errors="replace")
        time.sleep(0.05)
    raise BenchError(f"server did not answer within {SERVER_START_TIMEOUT_S:.0f}s ({last.strip()});"
                     f" log {log}:\n{log.read_text(errors='replace')[-3000:]}")


class ServerFactory:
    """Creates each server's fresh image and starts it; ``start`` returns a Running."""

    def __init__(self, workdir: Path, size_bytes: int, procs: ProcessTable):
        self.workdir = workdir
        self.size_bytes = size_bytes
        self.procs = procs
        self.passphrase_file = workdir / "passphrase"
        self.passphrase_file.write_bytes(THROWAWAY_PASSPHRASE)
        self.passphrase_file.chmod(0o600)
        # qemu's secret object and nbdkit-luks read the whole file: no newline.
        self.luks_pass_file = workdir / "luks-passphrase"
        self.luks_pass_file.write_bytes(THROWAWAY_PASSPHRASE.strip())
        self.luks_pass_file.chmod(0o600)
        self._count = 0

    def start(self, name: str) -> Running:
        self._count += 1
        run_dir = self.workdir / f"run{self._count}-{name}"
        run_dir.mkdir(mode=0o700)
        sock = run_dir / "nbd.sock"
        log = run_dir / "server.log"
        proc, uris = self.starters(run_dir, sock, log)[name]()
        uri = wait_until_serving(proc, sock, uris, log, self.size_bytes)
        rss_pid = proc.pid
        if name.startswith("blockcrypt") and process_name(proc.pid) != "nbdkit":
            nbdkit = [p for p in descendants(proc.pid) if process_name(p) == "nbdkit"]
            if not nbdkit:
                raise BenchError(f"no nbdkit process under `blockcrypt disk serve` ({proc.pid})")
            rss_pid = nbdkit[0]
        return Running(name, uri, proc, rss_pid, log)

    def starters(self, run_dir: Path, sock: Path, log: Path) -> dict:
        """Server name -> a function that creates its image, starts it and returns
        (process, URIs to try); scripts/bench_rbd.py adds the RBD servers."""
        return {
            "blockcrypt-xts-4096": lambda: self._blockcrypt(run_dir, sock, log, True, 4096),
            "blockcrypt-xts-512": lambda: self._blockcrypt(run_dir, sock, log, True, 512),
            "blockcrypt-plain": lambda: self._blockcrypt(run_dir, sock, log, False, 4096),
            "nbdkit-file": lambda: self._nbdkit_file(run_dir, sock, log, luks=False),
            "nbdkit-luks": lambda: self._nbdkit_file(run_dir, sock, log, luks=True),
            "qemu-nbd-luks": lambda: self._qemu_nbd(run_dir, sock, log),
        }

    def cleanup_run(self, running: Running) -> None:
        """Stop the server and delete its image (keeps the work dir at ~2x the size)."""
        self.procs.stop(running.proc)
        if running.rss_pid != running.proc.pid:
            # nbdkit under `disk serve` (its own session, --exit-with-parent): it
            # should be gone with the CLI; make sure before deleting its image.
            deadline = time.monotonic() + SERVER_STOP_TIMEOUT_S
            while process_name(running.rss_pid) == "nbdkit" and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_name(running.rss_pid) == "nbdkit":
                os.kill(running.rss_pid, signal.SIGKILL)
        shutil.rmtree(running.log.parent, ignore_errors=True)

    @staticmethod
    def _uri(sock: Path, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={sock}"

    # blockcrypt ------------------------------------------------------------------

    def _blockcrypt(self, run_dir: Path, sock: Path, log: Path, encrypted: bool,
                    sector_size: int, *, setup: tuple[tuple[str, ...], ...] = (),
                    create_args: tuple[str, ...] = (), serve_args: tuple[str, ...] = (),
                    after_create=None):
        """`blockcrypt init`, `disk create`, `disk serve NAME --unix SOCK` in a fresh home.

        ``setup``: CLI commands run after init (e.g. `store add`); ``create_args`` and
        ``serve_args``: extra `disk create` / `disk serve` options (e.g. `--store`,
        `--threads`); ``after_create()`` runs before serving."""
        home = run_dir / "home"
        name = "bench"
        env = cli_env()
        run_tool(cli_argv(home, self.passphrase_file, "init"), env=env, what="blockcrypt init")
        for args in setup:
            run_tool(cli_argv(home, self.passphrase_file, *args), env=env,
                     what=f"blockcrypt {' '.join(args[:2])}")
        run_tool(cli_argv(home, self.passphrase_file, "disk", "create", name,
                          "--size", str(self.size_bytes), "--sector-size", str(sector_size),
                          "--encrypted" if encrypted else "--no-encrypted", *create_args),
                 env=env, what="blockcrypt disk create")
        if after_create is not None:
            after_create()
        proc = self.procs.spawn(cli_argv(home, self.passphrase_file, "disk", "serve", name,
                                         "--unix", str(sock), *serve_args), log=log, env=env)
        return proc, [self._uri(sock), self._uri(sock, name)]

    # peers -----------------------------------------------------------------------

    def _luks_image(self, run_dir: Path) -> Path:
        """A fresh copy of one empty LUKSv1 image (sparse: only the header is allocated).

        The template is made once: qemu-img times PBKDF2 to pick an iteration count
        and, on a busy machine, occasionally fails with "Unable to get accurate CPU
        usage"; it is retried a few times.
        """
        template = self.workdir / "luks-template.img"
        if not template.exists():
            for attempt in range(5):
                try:
                    run_tool(["qemu-img", "create", "-q", "-f", "luks",
                              "--object", f"secret,id=s0,file={self.luks_pass_file}",
                              "-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,"
                              "iter-time=10", str(template), str(self.size_bytes)],
                             what="qemu-img create")
                    break
                except BenchError:
                    template.unlink(missing_ok=True)
                    if attempt == 4:
                        raise
                    time.sleep(1)
        img = run_dir / "luks.img"
        run_tool(["cp", "--sparse=always", str(template), str(img)], what="cp")
        return img

    def _nbdkit_file(self, run_dir, sock, log, luks: bool):
        if luks:
            img = self._luks_image(run_dir)
            extra = ["--filter=luks", f"passphrase=+{self.luks_pass_file}"]
        else:
            img = run_dir / "raw.img"
            with open(img, "wb") as f:
                f.truncate(self.size_bytes)
            extra = []
        argv = ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "file", str(img), *extra]
        return self.procs.spawn(argv, log=log), [self._uri(sock)]

    def _qemu_nbd(self, run_dir, sock, log):
        img = self._luks_image(run_dir)
        argv = ["qemu-nbd", "--persistent", "-k", str(sock),
                "--object", f"secret,id=s0,file={self.luks_pass_file}",
                "--image-opts", f"driver=luks,key-secret=s0,file.filename={img}"]
        return self.procs.spawn(argv, log=log), [self._uri(sock)]


# -- workloads ------------------------------------------------------------------

def timed(argv: list[str], what: str) -> float:
    t0 = time.perf_counter()
    run_tool(argv, what=what)
    return time.perf_counter() - t0


def fio_iops(uri: str, rw: str, size_bytes: int, runtime_s: float, out: Path) -> float:
    run_tool(["fio", f"--name={rw}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
              "--bs=4k", "--iodepth=32", "--numjobs=1", f"--size={size_bytes}",
              "--time_based=1", f"--runtime={runtime_s}s", "--norandommap=1",
              "--randrepeat=0", "--output-format=json", f"--output={out}"],
             what=f"fio {rw}", timeout=runtime_s + 300)
    job = json.loads(out.read_text())["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio {rw} on {uri} reported error {job['error']}")
    side = "read" if rw == "randread" else "write"
    iops = float(job[side]["iops"])
    if job[side]["total_ios"] <= 0:
        raise BenchError(f"fio {rw} on {uri} completed no I/O")
    return iops


def spot_check(uri: str, source: Path, size_bytes: int) -> None:
    """Untimed: three 64 KiB ranges read back through the server equal what was written.

    A benchmark of a server that returns wrong data would be meaningless.
    """
    length = 64 * KiB
    offsets = (0, (size_bytes // 2) // 4096 * 4096, size_bytes - length)
    code = ("import sys\n"
            f"for off in {offsets!r}:\n"
            f"    sys.stdout.buffer.write(h.pread({length}, off))\n")
    # nbdsh is `python3 -m nbd`; python3-libnbd lives in Debian's interpreter, which
    # may not be the first python3 on PATH.
    got = run_tool([SYSTEM_PYTHON, "-m", "nbd", "-u", uri, "-c", code],
                   what="nbdsh read-back").stdout
    with open(source, "rb") as f:
        want = b"".join(os.pread(f.fileno(), length, off) for off in offsets)
    if got != want:
        raise BenchError(f"read-back through {uri} differs from the data written: "
                         "the server is broken, its figures would mean nothing")


def run_workloads(srv: Running, source: Path, size_bytes: int, fio_runtime_s: float,
                  scratch: Path, after_read_back=None
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """The figures of one server run, and the server's VmHWM (MiB) after each step
    (which workload made the memory grow).  ``after_read_back()``, if given, runs
    untimed once the whole source is written and checked, before the random writes."""
    r: dict[str, float] = {}
    trace = {"idle": vm_hwm_mib(srv.rss_pid)}
    dt = timed(["nbdcopy", str(source), srv.uri], f"nbdcopy write to {srv.name}")
    r["seq_write_MBps"] = size_bytes / dt / 1e6
    trace["seq_write"] = vm_hwm_mib(srv.rss_pid)
    dt = timed(["nbdcopy", "--no-extents", srv.uri, "null:"], f"nbdcopy read from {srv.name}")
    r["seq_read_MBps"] = size_bytes / dt / 1e6
    trace["seq_read"] = vm_hwm_mib(srv.rss_pid)
    spot_check(srv.uri, source, size_bytes)
    if after_read_back is not None:
        after_read_back()
    r["randread_4k_iops"] = fio_iops(srv.uri, "randread", size_bytes, fio_runtime_s,
                                     scratch / "fio-randread.json")
    trace["randread"] = vm_hwm_mib(srv.rss_pid)
    r["randwrite_4k_iops"] = fio_iops(srv.uri, "randwrite", size_bytes, fio_runtime_s,
                                      scratch / "fio-randwrite.json")
    if srv.proc.poll() is not None:
        raise BenchError(f"{srv.name} exited during the workloads; log:\n"
                         f"{srv.log.read_text(errors='replace')[-3000:]}")
    r["peak_rss_MiB"] = trace["randwrite"] = vm_hwm_mib(srv.rss_pid)
    return r, trace


def make_source(path: Path, size_bytes: int) -> None:
    """Random (incompressible, never all-zero) bytes: no server can skip work on them."""
    chunk = 16 * MiB
    with open(path, "wb") as f:
        left = size_bytes
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


# -- the cipher alone -----------------------------------------------------------

def cipher_bench(reps: int, min_time_s: float) -> dict:
    """MB/s of XtsCipher.encrypt_into / decrypt_into (in place, one thread)."""
    from blockcrypt.crypto.secret import Secret
    from blockcrypt.crypto.xts import XtsCipher

    buf = bytearray(os.urandom(max(CIPHER_REQUEST_BYTES)))
    results: dict = {}
    key = Secret.random(64)
    try:
        for sector_size in CIPHER_SECTOR_SIZES:
            cipher = XtsCipher(key, sector_size)
            try:
                for op in ("encrypt_into", "decrypt_into"):
                    fn = getattr(cipher, op)
                    for n in CIPHER_REQUEST_BYTES:
                        view = memoryview(buf)[:n]
                        samples = []
                        for _ in range(reps):
                            done, sector_index = 0, 1 << 33   # tweaks above 2^32 too
                            t0 = time.perf_counter()
                            while True:
                                fn(view, view, sector_index)
                                done += n
                                sector_index += n // sector_size
                                elapsed = time.perf_counter() - t0
                                if elapsed >= min_time_s:
                                    break
                            samples.append(done / elapsed / 1e6)
                        results[f"{op}/{sector_size}/{n}"] = {
                            "op": op, "sector_size": sector_size, "request_bytes": n,
                            "samples_MBps": samples, "median_MBps": statistics.median(samples)}
            finally:
                cipher.wipe()
    finally:
        key.wipe()
    return results


def openssl_speed(block_sizes: tuple[int, ...], seconds: int) -> dict:
    """`openssl speed -evp aes-256-xts` at each block size (one XTS data unit per call)."""
    out = {}
    for n in block_sizes:
        cp = run_tool(["openssl", "speed", "-evp", "aes-256-xts", "-bytes", str(n),
                       "-seconds", str(seconds)], what="openssl speed")
        m = re.search(r"^aes-256-xts\s+([\d.]+)k\s*$", cp.stdout.decode(), re.M | re.I)
        if not m:
            raise BenchError(f"cannot parse openssl speed output:\n{cp.stdout.decode()}")
        out[str(n)] = float(m.group(1)) * 1000 / 1e6     # 1000s of bytes/s -> MB/s
    return out


# -- summary --------------------------------------------------------------------

def summarise(samples: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Median per server and workload; peak RSS is the maximum over repetitions."""
    return {s: {w: (max(v) if w == "peak_rss_MiB" else statistics.median(v))
                for w, v in per.items()}
            for s, per in samples.items()}


def ratios(summary: dict) -> dict:
    """Each blockcrypt throughput figure divided by the same figure of each LUKS peer
    and of blockcrypt-plain (what encryption costs inside blockcrypt)."""
    out: dict = {}
    for bc in BLOCKCRYPT_SERVERS:
        for peer in RATIO_PEERS + ("blockcrypt-plain",):
            if bc != peer and bc in summary and peer in summary:
                out.setdefault(bc, {})[peer] = {w: summary[bc][w] / summary[peer][w]
                                                for w in THROUGHPUT}
    return out


# Issue 13's targets, against nbdkit-luks in the same run: (server, {workload: ratio}).
LUKS_TARGETS = (
    ("blockcrypt-xts-4096", {"seq_write_MBps": 2.0, "seq_read_MBps": 1.5,
                             "randread_4k_iops": 1.2, "randwrite_4k_iops": 1.0}),
    ("blockcrypt-xts-512", {w: 1.0 for w in THROUGHPUT}),
)
PLAIN_TARGET = 0.8          # encrypted >= 0.8x blockcrypt unencrypted, every workload


def targets(summary: dict) -> list[dict]:
    """Issue 13's targets, each with the measured ratio (or MiB), PASS/MISS, and
    the transport's ceiling: nbdkit-file against the same reference."""
    rows = []
    labels = {w: label for w, label, _ in WORKLOADS}

    def add(text, server, workload, ref, threshold):
        if server not in summary or ref not in summary:
            return
        value = summary[server][workload] / summary[ref][workload]
        ceiling = (summary["nbdkit-file"][workload] / summary[ref][workload]
                   if "nbdkit-file" in summary else None)
        rows.append({"target": text, "server": server, "workload": workload,
                     "reference": ref, "threshold": threshold, "measured": value,
                     "ceiling_nbdkit_file": ceiling,
                     "unit": "x", "status": "PASS" if value >= threshold else "MISS"})

    for server, wanted in LUKS_TARGETS:
        ss = server.rsplit("-", 1)[1]
        for w, threshold in wanted.items():
            add(f"{labels[w]}, encrypted {ss} >= {threshold:.1f}x nbdkit-luks", server, w,
                "nbdkit-luks", threshold)
    for bc in ("blockcrypt-xts-4096", "blockcrypt-xts-512"):
        ss = bc.rsplit("-", 1)[1]
        for w in THROUGHPUT:
            add(f"{labels[w]}, encrypted {ss} >= {PLAIN_TARGET}x blockcrypt-plain", bc, w,
                "blockcrypt-plain", PLAIN_TARGET)
    for bc in BLOCKCRYPT_SERVERS:
        if bc in summary:
            rss = summary[bc]["peak_rss_MiB"]
            rows.append({"target": f"peak RSS of nbdkit, {bc} <= {RSS_TARGET_MiB} MiB",
                         "server": bc, "workload": "peak_rss_MiB", "reference": None,
                         "threshold": RSS_TARGET_MiB, "measured": rss, "unit": "MiB",
                         "ceiling_nbdkit_file": None,
                         "status": "PASS" if rss <= RSS_TARGET_MiB else "MISS"})
    return rows


def fmt_num(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def report_text(result: dict) -> str:
    summary, servers = result["median"], result["servers"]
    short = {s: s.replace("blockcrypt-", "bc-") for s in servers}
    out = []
    cfg = result["config"]
    out.append(f"\nMeasured on {cfg['workdir_filesystem']}"
               + (f", the file system of the blockcrypt home {cfg['home']}"
                  if cfg.get("home") else "") + ".")
    out.append(f"\nServers (median of {cfg['repetitions']} alternating repetition(s), "
               f"{cfg['size_bytes'] / MiB:,.0f} MiB each, peak RSS = max):")
    out.append(table(["workload"] + [short[s] for s in servers],
                     [[f"{label} ({unit})"] + [fmt_num(summary[s][w]) for s in servers]
                      for w, label, unit in WORKLOADS]))
    rat = result["ratios"]
    bcs = [bc for bc in BLOCKCRYPT_SERVERS if bc in summary]
    for peer in RATIO_PEERS + ("blockcrypt-plain",):
        cols = [bc for bc in bcs if peer in rat.get(bc, {}) and bc != peer]
        if not cols:
            continue
        out.append(f"\nblockcrypt / {peer} (higher is better):")
        out.append(table(["workload"] + [short[bc] for bc in cols],
                         [[label] + [f"{rat[bc][peer][w]:.2f}x" for bc in cols]
                          for w, label, _ in WORKLOADS if w in THROUGHPUT]))
    c = result["cipher"]
    out.append("\nCipher alone (XtsCipher, in place, one thread; MB/s by request size):")
    rows = []
    for ss in CIPHER_SECTOR_SIZES:
        for op in ("encrypt_into", "decrypt_into"):
            rows.append([f"{op} {ss}-byte sectors"]
                        + [fmt_num(c[f"{op}/{ss}/{n}"]["median_MBps"])
                           for n in CIPHER_REQUEST_BYTES])
    out.append(table(["operation"] + [size_label(n) for n in CIPHER_REQUEST_BYTES], rows))
    ossl = result["openssl_speed_MBps"]
    out.append("openssl speed -evp aes-256-xts (one data unit per call, one core): "
               + ", ".join(f"{size_label(int(n))} {fmt_num(v)} MB/s" for n, v in ossl.items()))
    if result["targets"]:
        out.append(f"\nTargets (issue 13), measured on {cfg['workdir_filesystem']}; ceiling = "
                   "nbdkit-file (no crypto) against the same reference:")
        out.append(table(["target", "measured", "result", "ceiling"],
                         [[t["target"], f"{t['measured']:.2f}{'x' if t['unit'] == 'x' else ' MiB'}",
                           t["status"],
                           "-" if t["ceiling_nbdkit_file"] is None
                           else f"{t['ceiling_nbdkit_file']:.2f}x"]
                          for t in result["targets"]]))
        passed = sum(t["status"] == "PASS" for t in result["targets"])
        out.append(f"{passed} of {len(result['targets'])} targets met.")
        cipher_4k = c.get(f"encrypt_into/4096/{4 * KiB}", {}).get("median_MBps")
        if cipher_4k and "4096" in ossl:
            out.append(f"Cipher ceiling: XtsCipher encrypts 4 KiB requests at "
                       f"{fmt_num(cipher_4k)} MB/s, {cipher_4k / ossl['4096']:.2f}x "
                       f"`openssl speed -evp aes-256-xts` at 4 KiB ({fmt_num(ossl['4096'])} MB/s)")
    out.append(f"\nblockcrypt servers started with: {cfg['blockcrypt_launch']}. "
               "BLOCKCRYPT_TESTONLY_WEAK_KDF=1 was set for the throwaway homes: it only "
               "shortens init/unlock, not the data path.")
    return "\n".join(out)


def size_label(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else (
        f"{n // KiB} KiB" if n >= KiB and n % KiB == 0 else f"{n} B")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rat = result["ratios"]
    workloads = [(w, label) for w, label, _ in WORKLOADS if w in THROUGHPUT]
    # (reference, servers shown, target marks: (server, {workload: ratio}))
    luks = dict(LUKS_TARGETS)
    panels = [(RATIO_PEERS[0], BLOCKCRYPT_SERVERS,
               [(bc, luks[bc]) for bc in ("blockcrypt-xts-4096", "blockcrypt-xts-512")])]
    panels += [(peer, BLOCKCRYPT_SERVERS, []) for peer in RATIO_PEERS[1:]]
    panels.append(("blockcrypt-plain", BLOCKCRYPT_SERVERS[:2],
                   [(bc, {w: PLAIN_TARGET for w, _ in workloads})
                    for bc in BLOCKCRYPT_SERVERS[:2]]))
    panels = [(ref, [bc for bc in shown if ref in rat.get(bc, {})], marks)
              for ref, shown, marks in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        raise BenchError("nothing to plot: the ratios need blockcrypt and reference servers")
    colours = dict(zip(BLOCKCRYPT_SERVERS, ("tab:blue", "tab:orange", "tab:green")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8), squeeze=False)
    axes = axes[0]
    for ax, (ref, bcs, marks) in zip(axes, panels):
        width = 0.8 / len(bcs)
        where = {}
        for i, bc in enumerate(bcs):
            values = [rat[bc][ref][w] for w, _ in workloads]
            xs = [j + (i - (len(bcs) - 1) / 2) * width for j in range(len(workloads))]
            where[bc] = dict(zip((w for w, _ in workloads), xs))
            bars = ax.bar(xs, values, width, label=bc, color=colours[bc])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.6, linestyle="--")
        labelled = False
        for bc, wanted in marks:           # each target as a black tick across its bar
            for w, y in wanted.items():
                if bc in where:
                    x = where[bc][w]
                    ax.hlines(y, x - width / 2, x + width / 2, colors="black", linewidth=2,
                              label=None if labelled else "target")
                    labelled = True
        ax.set_xticks(range(len(workloads)), [label for _, label in workloads], fontsize=8)
        ax.set_title(f"blockcrypt / {ref}", fontsize=10)
        ax.set_ylabel("ratio (higher is better)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    cfg = result["config"]
    fig.suptitle(f"blockcrypt vs C LUKS servers, {cfg['size_bytes'] / MiB:,.0f} MiB, "
                 f"median of {cfg['repetitions']}, on {cfg['workdir_filesystem']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- machine info ---------------------------------------------------------------

def tool_version(argv: list[str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        return (cp.stdout or cp.stderr).decode(errors="replace").strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def filesystem_of(path: Path) -> str:
    best, fstype = "", "unknown"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mnt, typ, *_ = line.split()
        if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best):
            best, fstype = mnt, typ
    return f"{fstype} ({best})"


def machine_info() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    info = {
        "hostname": platform.node(), "kernel": platform.release(),
        "machine": platform.machine(), "cpu_model": cpu, "cpu_count": os.cpu_count(),
        "mem_total_MiB": int(mem) // 1024, "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "tools": {t: tool_version(v) for t, v in {
            "nbdkit": ["nbdkit", "--version"], "nbdcopy": ["nbdcopy", "--version"],
            "fio": ["fio", "--version"], "qemu-nbd": ["qemu-nbd", "--version"],
            "qemu-img": ["qemu-img", "--version"], "openssl": ["openssl", "version"]}.items()},
    }
    try:
        import cryptography
        info["cryptography"] = cryptography.__version__
        from blockcrypt.crypto.compiled import datapath
        dp = datapath()
        info["data_path"] = (f"compiled ({dp.OPENSSL_VERSION})" if dp is not None
                             else "pure Python (the extension did not load)")
    except ImportError:
        pass
    cp = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True)
    info["git_commit"] = cp.stdout.decode().strip() if cp.returncode == 0 else "unknown"
    return info


# -- main -----------------------------------------------------------------------

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1G, 256M, 1073741824)")
    n = int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}[
        m.group(2).upper()]
    if n < 16 * MiB or n % MiB:
        raise argparse.ArgumentTypeError("the size must be a multiple of 1 MiB, at least 16 MiB")
    return n


def blockcrypt_home() -> Path:
    """The blockcrypt home as the CLI resolves it ($BLOCKCRYPT_HOME, then the defaults)."""
    from blockcrypt.storage.home import default_home
    return default_home()


def default_workdir_parent() -> Path:
    """The nearest existing directory at or above the blockcrypt home's parent: the
    file system users keep their disks on (the home itself is left untouched)."""
    p = blockcrypt_home().parent
    while not p.is_dir():
        p = p.parent
    if not os.access(p, os.W_OK):
        raise BenchError(f"cannot write in {p} (the file system of the blockcrypt home); "
                         "pass --workdir DIR")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="data size per server (default 1G; 64M with --quick)")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions, each running every server once (default 3; 1 with --quick)")
    p.add_argument("--fio-runtime", type=float, default=None,
                   help="seconds per fio run (default 10; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="short smoke run: 64 MiB, 1 repetition, 2 s fio runs")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"comma-separated subset of: {', '.join(SERVERS)}")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where images live (default: beside the blockcrypt home, on its "
                        "file system)")
    p.add_argument("--json", type=Path, default=None, help="write all results as JSON")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG bar chart of the ratios")
    args = p.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.reps = args.reps or (1 if args.quick else 3)
    args.fio_runtime = args.fio_runtime or (2.0 if args.quick else 10.0)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in args.servers if s not in SERVERS]
    if unknown or not args.servers:
        p.error(f"unknown server(s) {unknown}; choose from {', '.join(SERVERS)}")
    if args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def check_tools() -> None:
    missing = [t for t in ("nbdkit", "nbdcopy", "nbdinfo", "fio", "qemu-nbd",
                           "qemu-img", "openssl") if shutil.which(t) is None]
    if subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True).returncode:
        missing.append("python3-libnbd")
    if missing:
        raise BenchError(f"missing tools: {', '.join(missing)}; run `make install` "
                         "(Debian: nbdkit libnbd-bin python3-libnbd fio qemu-utils openssl)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run(args: argparse.Namespace) -> dict:
    check_tools()
    procs = ProcessTable()
    parent = args.workdir or default_workdir_parent()
    workdir = Path(tempfile.mkdtemp(prefix="blockcrypt-bench-", dir=parent))
    workdir.chmod(0o700)
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        launch = "`blockcrypt init`, `disk create`, `disk serve NAME --unix SOCK`"
        say(f"work dir {workdir} on {filesystem_of(workdir)}; {args.size / MiB:,.0f} MiB per "
            f"server, {args.reps} repetition(s), fio {args.fio_runtime:g} s")
        say(f"blockcrypt servers: {launch}")
        source = workdir / "source.bin"
        make_source(source, args.size)
        factory = ServerFactory(workdir, args.size, procs)

        samples: dict[str, dict[str, list[float]]] = {
            s: {w: [] for w, _, _ in WORKLOADS} for s in args.servers}
        rss_trace: dict[str, list[dict[str, float]]] = {s: [] for s in args.servers}
        for rep in range(args.reps):
            # Rotate the starting server so no server always runs first.
            order = args.servers[rep % len(args.servers):] + args.servers[:rep % len(args.servers)]
            for name in order:
                say(f"rep {rep + 1}/{args.reps}: {name} ...", end=" ")
                srv = factory.start(name)
                try:
                    r, trace = run_workloads(srv, source, args.size, args.fio_runtime,
                                             srv.log.parent)
                finally:
                    factory.cleanup_run(srv)
                for w, v in r.items():
                    samples[name][w].append(v)
                rss_trace[name].append(trace)
                say(", ".join(f"{w}={fmt_num(v)}" for w, v in r.items()), prefix=False)

        say("cipher alone ...")
        cipher = cipher_bench(args.reps, 0.05 if args.quick else 0.5)
        ossl = openssl_speed((512, 4096, 16384), 1 if args.quick else 3)
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    summary = summarise(samples)
    result = {
        "format": "blockcrypt-bench/1",
        "started_at": started.isoformat(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "config": {"size_bytes": args.size, "repetitions": args.reps,
                   "fio_runtime_s": args.fio_runtime, "quick": args.quick,
                   "workdir_filesystem": filesystem_of(workdir),
                   "home": None if args.workdir else str(blockcrypt_home()),
                   "blockcrypt_launch": launch, "weak_kdf_note":
                       "BLOCKCRYPT_TESTONLY_WEAK_KDF=1 for the throwaway homes: only "
                       "init/unlock are faster; the data path does not use the KDF",
                   "units": {"MBps": "10^6 bytes per second", "MiB": "2^20 bytes"},
                   "medians": "median over repetitions; peak_rss_MiB is the maximum"},
        "machine": machine_info(),
        "servers": args.servers,
        "workloads": [w for w, _, _ in WORKLOADS],
        "samples": samples,
        "rss_trace_MiB": rss_trace,
        "median": summary,
        "ratios": ratios(summary),
        "cipher": cipher,
        "openssl_speed_MBps": ossl,
    }
    result["machine"]["loadavg_at_end"] = os.getloadavg()
    result["targets"] = targets(summary)
    return result


def say(text: str, end: str = "\n", prefix: bool = True) -> None:
    print(("bench: " if prefix else "") + text, end=end, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401 - fail now, not after a long run
        except ImportError:
            say("error: --plot needs matplotlib (`.venv/bin/pip install matplotlib`)")
            return 1
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    try:
        result = run(args)
    except KeyboardInterrupt:
        say("interrupted; servers stopped and temporary files removed")
        return 130
    except BenchError as e:
        say(f"error: {e}")
        return 1
    # Files first: a closed stdout (e.g. `| head`) must not lose a long run's results.
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        say(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
        say(f"plot written to {args.plot}")
    print(report_text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
