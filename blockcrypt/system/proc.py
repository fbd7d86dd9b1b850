"""Every external program blockcrypt runs, in one place.

The ``*_argv`` functions are pure: they build argument vectors and run nothing,
so tests check them directly.  :func:`run` (wait for a short command) and
:func:`spawn` (start a long-running server) are the only places that execute
anything; both map "program not installed" to
:class:`~blockcrypt.errors.MissingTool` (naming the Debian package) and
:func:`run` maps a non-zero exit to :class:`~blockcrypt.errors.CommandFailed`.

Security: no argv built here ever carries key material.  The data key reaches
nbdkit through an inherited pipe (``keyfd=N`` names the descriptor, not the
key), and nbdkit's verbose mode, which logs every ``key=value``, is never used.

The module also holds the small process/mount queries that attach and detach
need (is a pid still our nbdkit? what is mounted from a device?), read from
``/proc`` and ``/sys`` rather than by running more programs.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .. import errors

# Debian package that provides each tool (for MissingTool's hint).
PACKAGES = {
    "nbdkit": "nbdkit nbdkit-plugin-python",
    "nbdfuse": "libnbd-bin",
    "nbdinfo": "libnbd-bin",
    "nbd-client": "nbd-client",
    "losetup": "mount",
    "blockdev": "util-linux",
    "fusermount3": "fuse3",
    "modprobe": "kmod",
    "mount": "mount",
    "umount": "mount",
    "blkid": "util-linux",
    "mkfs": "util-linux",
    "rsync": "rsync",
}

STDERR_TAIL_CHARS = 2000

# The runner used by run(); tests replace it to check argv and error mapping.
_runner = subprocess.run


# -- argv builders (pure) -------------------------------------------------

# Worker threads per NBD connection (nbdkit's default is 16).  The plugin's
# Python code runs one thread at a time (the GIL); threads beyond a few only
# add GIL hand-offs (futex wake-ups and context switches).  Measured with
# scripts/bench.py on 2 cores: 4 gave the best random I/O (encrypted 4 KiB
# random write ~53k IOPS against ~28k with 16) and sequential throughput at
# least as good as 16; 2 starved random writes.  4 requests per connection
# can still wait on the backing storage at once.
NBDKIT_THREADS = 4
MAX_NBDKIT_THREADS = 64


def valid_thread_count(threads) -> bool:
    """Whether ``threads`` is a worker-thread count nbdkit_argv accepts."""
    return (isinstance(threads, int) and not isinstance(threads, bool)
            and 1 <= threads <= MAX_NBDKIT_THREADS)


def nbdkit_argv(*, plugin_script: Path, container: Path, read_only: bool, discard: bool,
                keyfd: int | None, pidfile: Path, pause_control: Path,
                unix_socket: Path | None = None, tcp: tuple[str, int] | None = None,
                exit_with_parent: bool = False, tls: str = "off",
                tls_psk: Path | None = None, tls_certificates: Path | None = None,
                threads: int = NBDKIT_THREADS) -> list[str]:
    """nbdkit serving one container through the blockcrypt Python plugin.

    The pause filter is always stacked on top so a snapshot can quiesce I/O
    through ``pause_control`` while the disk is in use.  ``keyfd`` names an
    inherited descriptor carrying the data key (None for unencrypted disks).
    tls: "off", "on" or "require" (nbdkit's --tls); with "on"/"require" exactly
    one of tls_psk / tls_certificates must be given.  ``threads``: nbdkit worker
    threads per connection (see NBDKIT_THREADS).
    """
    if (unix_socket is None) == (tcp is None):
        raise ValueError("exactly one of unix_socket and tcp")
    if tls not in ("off", "on", "require"):
        raise ValueError(f"bad tls mode {tls!r}")
    if tls != "off" and (tls_psk is None) == (tls_certificates is None):
        raise ValueError("TLS needs exactly one of tls_psk and tls_certificates")
    # Always --foreground: no fork, so the process holding the key is the one that
    # mlocked it (see supervised_argv for how an attached disk's nbdkit outlives us).
    if not valid_thread_count(threads):
        raise ValueError(f"threads must be 1..{MAX_NBDKIT_THREADS}, got {threads!r}")
    argv = ["nbdkit", "--foreground", "--threads", str(threads)]
    if exit_with_parent:
        argv.append("--exit-with-parent")
    argv += ["--log=stderr", "--pidfile", str(pidfile)]
    if unix_socket is not None:
        argv += ["--unix", str(unix_socket)]
    else:
        host, port = tcp
        argv += ["--ipaddr", host, "--port", str(port)]
    argv.append(f"--tls={tls}")
    if tls != "off":
        if tls_psk is not None:
            argv.append(f"--tls-psk={tls_psk}")
        else:
            argv.append(f"--tls-certificates={tls_certificates}")
    if read_only:
        argv.append("--readonly")
    argv += ["--filter=pause", "python", str(plugin_script),
             f"file={container}"]
    if keyfd is not None:
        argv.append(f"keyfd={keyfd}")
    argv += [f"readonly={'true' if read_only else 'false'}",
             f"discard={'true' if discard else 'false'}",
             f"pause-control={pause_control}"]
    return argv


SUPERVISOR_NAME = "blockcrypt-supervise"


def supervised_argv(argv: Sequence[str]) -> list[str]:
    """Run argv under a minimal /bin/sh that stays its parent until it exits.

    ``nbdkit --foreground`` (1.32, measured) sets PR_SET_PDEATHSIG: it gets
    SIGTERM as soon as its parent exits, and then stops serving while waiting
    for clients that never hang up.  An attached disk's nbdkit must outlive the
    CLI that started it, and stay in the foreground (not fork) so the process
    holding the key is the one that mlocked it; so its parent is this shell,
    which only waits for it (``"$@"`` is not the last command, so dash forks
    instead of exec'ing it) and exits with its status.
    """
    return ["/bin/sh", "-c", '"$@"; exit $?', SUPERVISOR_NAME, *[str(a) for a in argv]]


def nbdfuse_argv(*, fuse_file: Path, unix_socket: Path, pidfile: Path,
                 read_only: bool) -> list[str]:
    """nbdfuse exposing the NBD export as the single file fuse_file (fallback path)."""
    argv = ["nbdfuse", "--pidfile", str(pidfile)]
    if read_only:
        argv.append("--readonly")
    argv += [str(fuse_file), "--unix", str(unix_socket)]
    return argv


def fusermount_unmount_argv(mountpoint: Path, lazy: bool = False) -> list[str]:
    return ["fusermount3", "-u" + ("z" if lazy else ""), str(mountpoint)]


def losetup_attach_argv(backing_file: Path, *, sector_size: int, read_only: bool,
                        direct_io: bool = True) -> list[str]:
    """Attach backing_file to the first free loop device and print its path.

    Direct I/O keeps the loop driver from caching the file a second time in the
    page cache (nbdfuse warns of deadlocks under memory pressure otherwise).
    """
    argv = ["losetup", "--find", "--show", "--sector-size", str(sector_size)]
    if direct_io:
        argv.append("--direct-io=on")
    if read_only:
        argv.append("--read-only")
    argv.append(str(backing_file))
    return argv


def losetup_detach_argv(device: str) -> list[str]:
    return ["losetup", "--detach", device]


def modprobe_argv(module: str) -> list[str]:
    return ["modprobe", "--quiet", module]


def nbd_client_connect_argv(*, unix_socket: Path, device: str, sector_size: int,
                            export_name: str, read_only: bool) -> list[str]:
    """nbd-client 3.24 over a local socket (``-unix`` takes the socket as "host")."""
    argv = ["nbd-client", "-unix", str(unix_socket), device,
            "-b", str(sector_size), "-N", export_name]
    if read_only:
        argv.append("-readonly")
    return argv


def nbd_client_disconnect_argv(device: str) -> list[str]:
    return ["nbd-client", "-d", device]


def blockdev_flush_argv(device: str) -> list[str]:
    return ["blockdev", "--flushbufs", device]


def blkid_type_argv(device: str) -> list[str]:
    """Print the file system type on device (exit 2 if none); -p probes the
    device itself, not blkid's cache."""
    return ["blkid", "-p", "-o", "value", "-s", "TYPE", device]


def mkfs_argv(fstype: str, device: str) -> list[str]:
    return ["mkfs", "-t", fstype, "-q", device]


def mount_argv(device: str, mountpoint: Path, *, read_only: bool = False) -> list[str]:
    argv = ["mount"]
    if read_only:
        argv += ["-o", "ro"]
    return argv + [device, str(mountpoint)]


def umount_argv(mountpoint: Path) -> list[str]:
    return ["umount", str(mountpoint)]


def rsync_argv(src_dir: Path, dst_dir: Path, *, progress: bool) -> list[str]:
    """Copy the tree under src_dir into dst_dir: archive mode with hard links,
    ACLs and extended attributes; whole files (no delta algorithm: both sides
    are local); --numeric-ids so owners are not remapped through this host's
    user names."""
    argv = ["rsync", "-aHAX", "--numeric-ids", "--whole-file"]
    if progress:
        argv.append("--info=progress2")
    return argv + [f"{src_dir}/", f"{dst_dir}/"]


# -- running --------------------------------------------------------------

def _missing(argv: Sequence[str]) -> errors.MissingTool:
    tool = os.path.basename(argv[0])
    return errors.MissingTool(tool=tool, package=PACKAGES.get(tool, tool))


def run(argv: Sequence[str], *, check: bool = True, timeout_s: float = 120,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run a short command, capture its output; map failures to blockcrypt errors.

    MissingTool if the program is not installed; CommandFailed (with the tail
    of stderr) if it exits non-zero and check is true, or runs past timeout_s.
    """
    argv = [str(a) for a in argv]
    try:
        cp = _runner(argv, capture_output=True, timeout=timeout_s, input=input,
                     stdin=None if input is not None else subprocess.DEVNULL)
    except FileNotFoundError:
        raise _missing(argv) from None
    except subprocess.TimeoutExpired:
        raise errors.CommandFailed(cmd=" ".join(argv), rc="timeout",
                                   stderr=f"no exit after {timeout_s:g} s") from None
    if check and cp.returncode != 0:
        stderr = (cp.stderr or b"").decode(errors="replace").strip()
        raise errors.CommandFailed(cmd=" ".join(argv), rc=cp.returncode,
                                   stderr=stderr[-STDERR_TAIL_CHARS:] or "(no output)")
    return cp


def run_visible(argv: Sequence[str], *, timeout_s: float | None = None) -> None:
    """Run a command with this process's stdout and stderr (a progress display
    on the user's terminal); MissingTool / CommandFailed as :func:`run`."""
    argv = [str(a) for a in argv]
    try:
        rc = _runner(argv, timeout=timeout_s, stdin=subprocess.DEVNULL).returncode
    except FileNotFoundError:
        raise _missing(argv) from None
    except subprocess.TimeoutExpired:
        raise errors.CommandFailed(cmd=" ".join(argv), rc="timeout",
                                   stderr=f"no exit after {timeout_s:g} s") from None
    if rc != 0:
        raise errors.CommandFailed(cmd=" ".join(argv), rc=rc, stderr="(shown above)")


def spawn(argv: Sequence[str], *, env: dict[str, str] | None = None,
          pass_fds: Sequence[int] = (), stdout=subprocess.DEVNULL,
          stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Start a long-running program in its own session (it outlives the CLI and
    a Ctrl-C on the CLI's terminal does not reach it); stdin is /dev/null."""
    argv = [str(a) for a in argv]
    try:
        return subprocess.Popen(argv, env=env, pass_fds=tuple(pass_fds),
                                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                start_new_session=True, close_fds=True, umask=0o077)
    except FileNotFoundError:
        raise _missing(argv) from None


# -- processes ------------------------------------------------------------

def cmdline(pid: int) -> list[str] | None:
    """argv of a live process, or None (no such process, or a zombie)."""
    try:
        raw = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if not raw:  # zombies and kernel threads have an empty cmdline
        return None
    return raw.rstrip(b"\0").decode(errors="replace").split("\0")


def pid_matches(pid: int | None, program: str, marker: str | None = None) -> bool:
    """Is pid alive and running `program` (basename of argv[0]) with `marker`
    somewhere in its argv?  Guards against a pid reused by another program."""
    if not pid:
        return False
    argv = cmdline(pid)
    if not argv:
        return False
    # argv[0], or an interpreter's script or module (`python -m blockcrypt`)
    if not any(os.path.basename(a) == program for a in argv[:3]):
        return False
    return marker is None or any(marker in a for a in argv)


def find_processes(program: str, marker: str) -> list[int]:
    """Pids of live processes running program with marker in their argv."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and pid_matches(int(d.name), program, marker):
            pids.append(int(d.name))
    return sorted(pids)


def process_start_time(pid: int | None) -> int | None:
    """Start time of pid in clock ticks since boot (field 22 of /proc/PID/stat),
    or None if there is no such live process.  (pid, start time) names one
    process: a reused pid has a different start time."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if not fields or fields[0] == "Z":  # zombie: it has exited
        return None
    return int(fields[19])


def process_alive(pid: int | None, start_time: int | None) -> bool:
    """Is the process (pid, start_time) still running?"""
    return pid is not None and start_time is not None and \
        process_start_time(pid) == start_time


def read_pidfile(path: Path) -> int | None:
    try:
        text = Path(path).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def wait_gone(pid: int, program: str, marker: str | None, timeout_s: float) -> bool:
    """Poll until pid no longer runs program/marker; True if it is gone."""
    deadline = time.monotonic() + timeout_s
    while pid_matches(pid, program, marker):
        _reap(pid)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _reap(pid: int) -> None:
    """Collect pid if it is our own exited child (so it is not left a zombie)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_process(pid: int | None, program: str, marker: str | None,
                 timeout_s: float = 10.0) -> None:
    """SIGTERM, wait up to timeout_s, then SIGKILL; only if pid still is ours."""
    if not pid_matches(pid, program, marker):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if wait_gone(pid, program, marker, timeout_s):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    wait_gone(pid, program, marker, 5.0)


# -- mounts and block devices -------------------------------------------------

def _unescape_mount(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[tuple[str, str]]:
    """(major:minor, mount point) for every mount visible to this process."""
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            out.append((fields[2], _unescape_mount(fields[4])))
    return out


def is_mountpoint(path: Path) -> bool:
    target = os.path.realpath(path)
    return any(mp == target for _, mp in mountinfo())


def block_device_ids(device: str) -> dict[str, str]:
    """{'/dev/loop0': '7:0', '/dev/loop0p1': '259:0', ...}: the device and its partitions."""
    name = os.path.basename(device)
    sys_dir = Path("/sys/class/block") / name
    out = {}
    try:
        out[device] = (sys_dir / "dev").read_text().strip()
    except OSError:
        return out
    for part in sorted(sys_dir.glob(name + "*")):
        try:
            out["/dev/" + part.name] = (part / "dev").read_text().strip()
        except OSError:
            pass
    return out


def device_mounts(device: str) -> list[tuple[str, str]]:
    """(device or partition, mount point) for every mount of device or its partitions."""
    ids = block_device_ids(device)
    by_id = {v: k for k, v in ids.items()}
    return [(by_id[mm], mp) for mm, mp in mountinfo() if mm in by_id]


def device_holders(device: str) -> list[str]:
    """Kernel devices stacked on device or its partitions (dm-crypt, LVM, md)."""
    holders = []
    for dev in block_device_ids(device):
        d = Path("/sys/class/block") / os.path.basename(dev) / "holders"
        try:
            holders += sorted(p.name for p in d.iterdir())
        except OSError:
            pass
    return holders


def open_exclusively_busy(device: str) -> bool:
    """True if the kernel reports device busy for an exclusive open (O_EXCL on
    a block device fails with EBUSY while it is mounted - in any mount
    namespace - or claimed by another exclusive user)."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as e:
        return e.errno == 16  # EBUSY
    os.close(fd)
    return False


def loop_devices_backed_by(path: Path) -> list[str]:
    """Loop devices whose backing file is path (read from /sys, no losetup)."""
    target = os.path.realpath(path)
    found = []
    for bf in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            backing = bf.read_text().rstrip("\n")
        except OSError:
            continue
        if backing.endswith(" (deleted)"):
            backing = backing[: -len(" (deleted)")]
        if backing == target or backing == str(path):
            found.append("/dev/" + bf.parent.parent.name)
    return sorted(found)


def free_nbd_devices() -> list[str]:
    """/dev/nbdN devices not connected to a server (no /sys/block/nbdN/pid, size 0)."""
    free = []
    for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if (d / "pid").exists():
            continue
        try:
            if int((d / "size").read_text().strip() or "0") != 0:
                continue
        except (OSError, ValueError):
            continue
        if Path("/dev", d.name).exists():
            free.append("/dev/" + d.name)
    return free
