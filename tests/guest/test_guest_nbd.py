"""The main attach path, proved inside a QEMU guest: the real Debian ``nbd-client``
attaches blockcrypt disks served by ``blockcrypt disk serve`` as /dev/nbd0.

The host kernel here has no nbd driver, so a small guest (scripts/guest/, see
docs/GUEST.md) boots a Debian cloud kernel that has one. To keep CI time low the
guest boots ONCE for the whole module and runs every scenario in sequence, driven
by ``bc.job=`` parameters on its kernel command line; each test then checks its
own job's console markers and does its own host-side verification through the
fallback attach path (nbdfuse + loop).

Only loopback and QEMU's user-mode network are addressed: every server binds
127.0.0.1 and the guest reaches it as 10.0.2.2 (QEMU's host alias).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support.cli import REPO, run_cli
from support.prereq import require_block_devices, require_root, require_tools
from support.tls import CA, client_dir, server_dir
from support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.root]

BUILD_SCRIPT = REPO / "scripts" / "guest" / "build.sh"
GUEST_DIR = REPO / "build" / "guest"
QEMU_TIMEOUT_S = 120          # hard limit on one guest boot (`timeout` around QEMU)
DISK_SIZE = "64M"
SNAP_DISK_SIZE = "128M"       # the snapshot job writes records until told to stop
RANDOM_BYTES = 16 * 1024 * 1024
MARKER_BYTES = 1024 * 1024
TLS_NAME = "blockcrypt-guest-test"
SNAP_AFTER_RECORDS = 5        # take the snapshot once this many records are durable
SNAP_MAX_RECORDS = 1200       # the guest's cap (scripts/guest/init) if "stop" never arrives


def marker_bytes(export: str) -> bytes:
    """What the guest's `yes BLOCKCRYPT-GUEST-PLAINTEXT-EXPORT | head -c 1MiB` writes."""
    line = f"BLOCKCRYPT-GUEST-PLAINTEXT-{export}\n".encode()
    return (line * (MARKER_BYTES // len(line) + 1))[:MARKER_BYTES]


# -- guest plumbing ----------------------------------------------------------------

def build_guest() -> tuple[Path, Path]:
    """Build (or reuse the cache of) the guest kernel and initramfs."""
    cp = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, timeout=900)
    assert cp.returncode == 0, f"guest build failed:\n{cp.stderr.decode(errors='replace')}"
    return GUEST_DIR / "vmlinuz", GUEST_DIR / "initrd.gz"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GuestLog:
    """The guest's serial console, parsed into its BC-* markers."""
    lines: list[str] = field(default_factory=list)
    returncode: int | None = None

    def text(self) -> str:
        return "\n".join(self.lines)

    def _words(self, tag: str):
        for line in self.lines:
            if line.startswith(tag + " "):
                yield line.split()

    def ok_steps(self, job: int) -> list[str]:
        return [w[2] for w in self._words("BC-STEP") if w[1] == str(job) and w[3:] == ["ok"]]

    def failures(self, job: int) -> list[str]:
        return [" ".join(w) for w in self._words("BC-FAIL") if w[1] == str(job)]

    def job_ok(self, job: int) -> bool:
        return any(w[1:] == [str(job), "ok"] for w in self._words("BC-JOB"))

    def sha(self, job: int, filename: str) -> str:
        found = [w[3] for w in self._words("BC-SHA") if w[1:3] == [str(job), filename]]
        assert len(found) == 1, f"job {job}: no single BC-SHA for {filename}\n{self.text()}"
        return found[0]

    def records(self, job: int) -> dict[int, str]:
        return {int(w[2]): w[3] for w in self._words("BC-REC") if w[1] == str(job) and len(w) == 4}

    def done(self) -> bool:
        return "BC-DONE" in self.lines


class Guest:
    """One boot of the test guest: `timeout 120 qemu-system-x86_64 -machine q35,accel=tcg`.

    The console (serial on stdio) is read line by line by a thread; ``run`` hands
    every line to ``on_line(line, guest)`` so a test can act while the guest runs
    (take a snapshot) and type into the console with ``send``.
    """

    def __init__(self, kernel: Path, initrd: Path, jobs: list[str], *,
                 cmdline: tuple[str, ...] = (), fw_cfg: dict[str, Path | int] | None = None,
                 log_path: Path | None = None):
        append = ["console=ttyS0", "panic=-1", "quiet", "loglevel=3", *cmdline]
        append += [f"bc.job={j}" for j in jobs]
        self.argv = [
            "timeout", str(QEMU_TIMEOUT_S), "qemu-system-x86_64",
            "-machine", "q35,accel=tcg", "-m", "512", "-smp", "1",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", " ".join(append),
            # User-mode networking: the guest sees the host's 127.0.0.1 as 10.0.2.2.
            "-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0",
        ]
        # fw_cfg files: a Path, or an inherited descriptor (a pipe; QEMU reads it at start).
        self.pass_fds = tuple(v for v in (fw_cfg or {}).values() if isinstance(v, int))
        for name, source in (fw_cfg or {}).items():
            path = f"/dev/fd/{source}" if isinstance(source, int) else source
            self.argv += ["-fw_cfg", f"name=opt/bc/{name},file={path}"]
        self.log = GuestLog()
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None

    def send(self, text: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(text.encode())
        self._proc.stdin.flush()

    def run(self, on_line=None) -> GuestLog:
        self._proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, pass_fds=self.pass_fds)
        lines: queue.Queue = queue.Queue()

        def reader():
            for raw in self._proc.stdout:
                lines.put(raw.decode(errors="replace").rstrip("\r\n"))
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        try:
            while (line := lines.get(timeout=QEMU_TIMEOUT_S + 30)) is not None:
                self.log.lines.append(line)
                if on_line is not None:
                    on_line(line, self)
            self.log.returncode = self._proc.wait(timeout=30)
        finally:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            if self.log_path is not None:
                self.log_path.write_text(self.log.text() + "\n")
        return self.log


# -- host-side servers -----------------------------------------------------------

class Server:
    """A server on 127.0.0.1:PORT in the background (its own session), output to a log."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path):
        self.name, self.port, self.log_path = name, port, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            wait_for(self._listening_or_exited, 60, f"server {name} to listen on {port}",
                     interval_s=0.2)
        except AssertionError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            self._log.close()
            raise AssertionError(f"server {name} exited {self.proc.returncode}:\n"
                                 f"{log_path.read_text(errors='replace')}")

    def _listening_or_exited(self) -> bool:
        if self.proc.poll() is not None:
            return True
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Interrupt the server as a user would (Ctrl-C) and wait for it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def blockcrypt_serve(ctx: "Ctx", name: str, *tls_args: str) -> Server:
    """`blockcrypt disk serve NAME --tcp 127.0.0.1:PORT (--insecure-plaintext-tcp |
    TLS_ARGS)`."""
    port = free_port()
    argv = [sys.executable, "-m", "blockcrypt", "--home", str(ctx.home),
            "--passphrase-file", str(ctx.passphrase_file), "disk", "serve", name,
            "--tcp", f"127.0.0.1:{port}", *(tls_args or ("--insecure-plaintext-tcp",))]
    return Server(name, argv, port, ctx.tmp / f"serve-{name}.log")


def raw_file_serve(ctx: "Ctx", name: str) -> Server:
    """The disk's container file as it is on disk (ciphertext), read-only, over NBD."""
    port = free_port()
    argv = ["nbdkit", "-f", "--exit-with-parent", "-r", "-i", "127.0.0.1", "-p", str(port),
            "file", str(disk_path(ctx, name))]
    return Server(f"raw-{name}", argv, port, ctx.tmp / f"raw-{name}.log")


def data_key_pipe(ctx: "Ctx", name: str) -> tuple[int, int]:
    """TEST ONLY: unwrap disk NAME's data key through the key store, as the server
    does, and put it into a pipe for QEMU's fw_cfg, so it never touches a file or
    argv. Returns (read end, the container's data offset in bytes)."""
    from blockcrypt.cli import read_passphrase_file
    from blockcrypt.kms.local import KeyStore
    from blockcrypt.storage import container
    from blockcrypt.storage.home import Home

    header = container.read_header(disk_path(ctx, name), repair=False)
    with KeyStore.open(Home(ctx.home),
                       lambda: read_passphrase_file(str(ctx.passphrase_file))) as store:
        dk = store.decrypt_data_key(header.wrapped_dk, container.key_context(header))
    try:
        r, w = os.pipe()
        os.write(w, dk.view())
        os.close(w)
    finally:
        dk.wipe()
    return r, header.data_offset


def make_tls_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA with a server certificate for TLS_NAME in nbdkit's
    --tls-certificates layout, a client certificate it signed, and a client
    certificate from another CA: (server dir, client dir, foreign client dir), each
    holding what nbd-client's -cacertfile/-certfile/-keyfile take (ca-cert.pem, client-cert.pem,
    client-key.pem)."""
    directory.mkdir(mode=0o700)
    ca, other = CA("blockcrypt guest test CA"), CA("another CA")
    server = server_dir(directory / "server", ca,
                        ca.issue(TLS_NAME, server=True, dns=(TLS_NAME,)))
    client = client_dir(directory / "client", ca, ca.issue("guest", server=False))
    foreign = client_dir(directory / "foreign", ca, other.issue("guest", server=False))
    return server, client, foreign


# -- host-side checks through the fallback attach path ---------------------------

def cli_json(ctx, *args):
    return json.loads(run_cli(*args, "--json", home=ctx.home,
                              passphrase_file=ctx.passphrase_file).stdout)


def attach(ctx, name: str) -> Path:
    device = cli_json(ctx, "disk", "attach", name)["device"]
    return Path(device)


def detach(ctx, name: str) -> None:
    run_cli("disk", "detach", name, home=ctx.home, passphrase_file=ctx.passphrase_file)


def disk_path(ctx, name: str) -> Path:
    return Path(cli_json(ctx, "disk", "show", name)["path"])


def e2fsck_clean(device: Path) -> None:
    cp = subprocess.run(["e2fsck", "-fn", str(device)], capture_output=True, timeout=120)
    assert cp.returncode == 0, (f"e2fsck -fn {device} exited {cp.returncode}:\n"
                                f"{cp.stdout.decode(errors='replace')}"
                                f"{cp.stderr.decode(errors='replace')}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_contains(path: Path, needles: list[bytes]) -> bool:
    """True if any needle occurs in the file (read in overlapping 4 MiB chunks)."""
    overlap = max(len(n) for n in needles)
    tail = b""
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            window = tail + chunk
            if any(n in window for n in needles):
                return True
            tail = window[-overlap:]
    return False


def check_written_disk(ctx, name: str, guest_sha: str, mnt: Path) -> None:
    """Attach on the host (fallback path), e2fsck clean, files match the guest's
    checksums, and the raw disk file holds none of the plaintext."""
    device = attach(ctx, name)
    try:
        e2fsck_clean(device)
        mnt.mkdir()
        subprocess.run(["mount", "-o", "ro", str(device), str(mnt)], check=True, timeout=60)
        try:
            random_data = (mnt / "random.bin").read_bytes()
            assert len(random_data) == RANDOM_BYTES
            assert hashlib.sha256(random_data).hexdigest() == guest_sha
            assert (mnt / "marker.txt").read_bytes() == marker_bytes(name)
        finally:
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    finally:
        detach(ctx, name)
    # Plaintext never reaches the file: neither the marker line nor the first 4 KiB
    # of the random data (both were just read back in the clear through the device).
    needles = [f"BLOCKCRYPT-GUEST-PLAINTEXT-{name}".encode(), random_data[:4096]]
    assert not file_contains(disk_path(ctx, name), needles)


# -- the one boot ------------------------------------------------------------------

@dataclass
class Ctx:
    home: Path
    passphrase_file: Path
    tmp: Path
    log: GuestLog | None = None
    jobs: dict[str, int] = field(default_factory=dict)    # scenario -> job number
    snapshot: dict = field(default_factory=dict)           # what the snapshot job saw
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def guest_run(tmp_path_factory) -> Ctx:
    require_root()
    require_block_devices()
    require_tools("qemu-system-x86_64", "busybox", "nbd-client", "mke2fs", "e2fsck",
                  "cryptsetup", "timeout", "dpkg-deb", "depmod", "modprobe")
    t0 = time.monotonic()
    kernel, initrd = build_guest()
    tmp = tmp_path_factory.mktemp("guest")
    ctx = Ctx(home=tmp / "home", passphrase_file=tmp / "passphrase", tmp=tmp)
    ctx.timings["build_s"] = time.monotonic() - t0
    ctx.passphrase_file.write_bytes(b"guest test passphrase\n")
    ctx.passphrase_file.chmod(0o600)

    def cli(*args):
        return run_cli(*args, home=ctx.home, passphrase_file=ctx.passphrase_file)

    cli("init")
    for name, extra in (("enc4k", ()), ("tls4k", ()), ("enc512", ("--sector-size", "512"))):
        cli("disk", "create", name, "--size", DISK_SIZE, *extra)
    cli("disk", "create", "snap4k", "--size", SNAP_DISK_SIZE)
    certs, client, foreign = make_tls_certificates(tmp / "tls")
    with contextlib.ExitStack() as cleanup:
        fw_cfg: dict[str, Path | int] = {
            "ca.pem": certs / "ca-cert.pem",
            "client-cert.pem": client / "client-cert.pem",
            "client-key.pem": client / "client-key.pem",
            "other-cert.pem": foreign / "client-cert.pem",
            "other-key.pem": foreign / "client-key.pem"}
        dm_offset = {}
        for name in ("enc4k", "enc512"):
            fd, dm_offset[name] = data_key_pipe(ctx, name)
            cleanup.callback(os.close, fd)
            fw_cfg[f"dk.raw-{name}"] = fd
        servers: dict[str, Server] = {}

        def start(server: Server) -> None:
            servers[server.name] = server
            cleanup.callback(server.stop)

        start(blockcrypt_serve(ctx, "enc4k"))
        start(blockcrypt_serve(ctx, "tls4k", "--tls-certificates", str(certs)))
        start(blockcrypt_serve(ctx, "enc512"))
        start(raw_file_serve(ctx, "enc4k"))
        start(raw_file_serve(ctx, "enc512"))
        start(blockcrypt_serve(ctx, "snap4k"))
        port = {name: s.port for name, s in servers.items()}
        jobs = [("tcp4096", f"write,enc4k,{port['enc4k']},4096"),
                ("dmcrypt4096", f"dmcrypt,raw-enc4k,{port['raw-enc4k']},4096,"
                                f"{dm_offset['enc4k'] // 512}"),
                ("tls", f"write,tls4k,{port['tls4k']},4096,tls"),
                ("tls_refused", f"refuse,tls4k,{port['tls4k']},4096"),
                ("tls_nocert", f"tlsrefuse,tls4k,{port['tls4k']},4096,nocert"),
                ("tls_othercert", f"tlsrefuse,tls4k,{port['tls4k']},4096,other"),
                ("tcp512", f"write,enc512,{port['enc512']},512"),
                ("dmcrypt512", f"dmcrypt,raw-enc512,{port['raw-enc512']},512,"
                               f"{dm_offset['enc512'] // 512}"),
                ("snapshot", f"snap,snap4k,{port['snap4k']},4096")]
        ctx.jobs = {scenario: i for i, (scenario, _) in enumerate(jobs, start=1)}

        def on_line(line: str, guest: Guest) -> None:
            # While the guest writes records onto the mounted filesystem, take a
            # snapshot from the host, then tell the guest to stop writing.
            snap_job = ctx.jobs.get("snapshot")
            if snap_job is None or ctx.snapshot or not line.startswith(f"BC-REC {snap_job} "):
                return
            before = guest.log.records(snap_job)
            if len(before) < SNAP_AFTER_RECORDS:
                return
            ctx.snapshot["durable_before"] = dict(before)
            t = time.monotonic()
            try:
                cp = run_cli("snapshot", "create", "snap4k", "snap1", home=ctx.home,
                             passphrase_file=ctx.passphrase_file, check=False, timeout=60)
            except subprocess.TimeoutExpired as e:
                cp = subprocess.CompletedProcess(e.cmd, -1, b"", b"timed out after 60 s")
            ctx.timings["snapshot_create_s"] = time.monotonic() - t
            ctx.snapshot["result"] = cp
            ctx.snapshot["records_at_end"] = len(guest.log.records(snap_job))
            guest.send("stop\n")

        t0 = time.monotonic()
        guest = Guest(kernel, initrd, [spec for _, spec in jobs],
                      cmdline=(f"bc.tlsname={TLS_NAME}",), fw_cfg=fw_cfg,
                      log_path=tmp / "console.log")
        ctx.log = guest.run(on_line)
        ctx.timings["boot_s"] = time.monotonic() - t0
    print("\nguest timings: " + ", ".join(f"{k} {v:.1f}" for k, v in ctx.timings.items())
          + f"; console log {tmp / 'console.log'}")
    assert ctx.log.returncode == 0, f"QEMU exited {ctx.log.returncode}\n{ctx.log.text()}"
    assert ctx.log.done(), f"guest did not finish\n{ctx.log.text()}"
    assert ctx.log.failures(0) == [], ctx.log.text()
    return ctx


def assert_job_ok(ctx: Ctx, scenario: str, *steps: str) -> int:
    job = ctx.jobs[scenario]
    log = ctx.log
    assert log.failures(job) == [] and log.job_ok(job), \
        f"guest job {job} ({scenario}) failed: {log.failures(job)}\n{log.text()}"
    missing = [s for s in steps if s not in log.ok_steps(job)]
    assert not missing, f"job {job} ({scenario}) lacks steps {missing}\n{log.text()}"
    return job


WRITE_STEPS = ("nbd-client", "blksize", "mkfs", "mount", "marker", "random", "sync",
               "umount", "fsck", "disconnect")


# -- the tests ---------------------------------------------------------------------

def test_tcp_nbd_client_4096(guest_run):
    """Guest nbd-client -b 4096 over plain TCP (loopback only); the data reads back
    on the host through the fallback attach path; the file is ciphertext."""
    job = assert_job_ok(guest_run, "tcp4096", *WRITE_STEPS)
    check_written_disk(guest_run, "enc4k", guest_run.log.sha(job, "random.bin"),
                       guest_run.tmp / "mnt-enc4k")


def test_tcp_nbd_client_512(guest_run):
    """A 512-byte-sector disk attached with nbd-client -b 512."""
    job = assert_job_ok(guest_run, "tcp512", *WRITE_STEPS)
    check_written_disk(guest_run, "enc512", guest_run.log.sha(job, "random.bin"),
                       guest_run.tmp / "mnt-enc512")


def test_tls_nbd_client(guest_run):
    """nbd-client -x with a client certificate the server's CA signed (-cacertfile/-certfile/-keyfile)
    works; without TLS, with TLS but no client certificate, and with a certificate
    from another CA it is refused (issue 12 item 1)."""
    job = assert_job_ok(guest_run, "tls", *WRITE_STEPS)
    assert_job_ok(guest_run, "tls_refused", "refused")
    assert_job_ok(guest_run, "tls_nocert", "tls-refused")
    assert_job_ok(guest_run, "tls_othercert", "tls-refused")
    # Refused by the server's certificate check, once for each bad client.
    log = (guest_run.tmp / "serve-tls4k.log").read_text(errors="replace")
    assert log.count("gnutls_handshake: Error in the certificate") == 2, log
    check_written_disk(guest_run, "tls4k", guest_run.log.sha(job, "random.bin"),
                       guest_run.tmp / "mnt-tls4k")


def test_dm_crypt_reads_blockcrypt_ciphertext(guest_run):
    """Interoperability with the kernel: dm-crypt (`cryptsetup open --type plain
    --cipher aes-xts-plain64 --sector-size SS --offset DATA_OFFSET/512`) on the raw
    container file decrypts exactly what the guest wrote through blockcrypt, for
    both sector sizes."""
    log = guest_run.log
    for write, dm, name in (("tcp4096", "dmcrypt4096", "enc4k"),
                            ("tcp512", "dmcrypt512", "enc512")):
        write_job = assert_job_ok(guest_run, write, *WRITE_STEPS)
        dm_job = assert_job_ok(guest_run, dm, "nbd-client", "dk-present", "cryptsetup-open",
                               "mount", "umount", "cryptsetup-close", "disconnect")
        assert log.sha(dm_job, "marker.txt") == hashlib.sha256(marker_bytes(name)).hexdigest()
        assert log.sha(dm_job, "random.bin") == log.sha(write_job, "random.bin")


def test_snapshot_while_guest_writes(guest_run):
    """A snapshot taken while the guest has the filesystem mounted and is writing:
    a disk created from it mounts fsck-clean, with every record the guest had made
    durable (sync returned) before the snapshot started."""
    ctx = guest_run
    job = assert_job_ok(ctx, "snapshot", "nbd-client", "mkfs", "mount", "writing", "umount",
                        "disconnect")
    snap = ctx.snapshot
    assert snap, f"the guest never wrote {SNAP_AFTER_RECORDS} records\n{ctx.log.text()}"
    cp = snap["result"]
    assert cp.returncode == 0, f"snapshot create failed: {cp.stderr.decode(errors='replace')}"
    # The filesystem kept working during and after the snapshot.
    all_records = ctx.log.records(job)
    assert len(all_records) > snap["records_at_end"] >= len(snap["durable_before"])
    assert len(all_records) < SNAP_MAX_RECORDS, "the guest never saw the host's 'stop'"

    run_cli("disk", "create", "fromsnap", "--from-snapshot", "snap1",
            home=ctx.home, passphrase_file=ctx.passphrase_file)
    device = attach(ctx, "fromsnap")
    mnt = ctx.tmp / "mnt-fromsnap"
    mnt.mkdir()
    try:
        # The snapshot is crash-consistent: mounting replays the ext4 journal.
        subprocess.run(["mount", str(device), str(mnt)], check=True, timeout=60)
        try:
            for n, sha in snap["durable_before"].items():
                assert sha256_file(mnt / f"rec.{n}") == sha, f"record {n} lost or damaged"
        finally:
            subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        e2fsck_clean(device)
    finally:
        detach(ctx, "fromsnap")
