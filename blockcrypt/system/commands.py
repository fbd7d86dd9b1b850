"""Argument vectors for every external program blockcrypt runs, and which
Debian package provides each program.

Owns: the ``*_argv`` builders.  They are pure: they build lists of strings and run
nothing, so tests check them directly.  Running them is :mod:`blockcrypt.system.proc`'s
job; this module must not start processes or read /proc.

Security: no argv built here ever carries key material.  The data key reaches
nbdkit through an inherited pipe (``keyfd=N`` names the descriptor, not the
key), and nbdkit's verbose mode, which logs every ``key=value``, is never used.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


# Worker threads per NBD connection (nbdkit's default is 16).  The plugin's
# Python code runs one thread at a time (the GIL); threads beyond a few only
# add GIL hand-offs (futex wake-ups and context switches).  Measured with
# scripts/bench.py on 2 cores: 4 gave the best random I/O (encrypted 4 KiB
# random write ~53k IOPS against ~28k with 16) and sequential throughput at
# least as good as 16; 2 starved random writes.  4 requests per connection
# can still wait on the backing storage at once.
NBDKIT_THREADS = 4
# A disk on Ceph RBD waits on the OSDs (a write commit takes milliseconds), not on
# the GIL, so it needs more requests in flight: with 4, random writes reached
# 0.35x of qemu-nbd's librbd (which keeps 32 in flight); with 16, 1.35x, and
# sequential writes went from 0.65x to 1.00x (scripts/bench_rbd.py, docs/BENCHMARKS.md).
RBD_NBDKIT_THREADS = 16
MAX_NBDKIT_THREADS = 64


def default_threads(*, on_rbd: bool) -> int:
    """nbdkit worker threads per connection when the user gives none."""
    return RBD_NBDKIT_THREADS if on_rbd else NBDKIT_THREADS


def valid_thread_count(threads) -> bool:
    """Whether ``threads`` is a worker-thread count nbdkit_argv accepts."""
    return (isinstance(threads, int) and not isinstance(threads, bool)
            and 1 <= threads <= MAX_NBDKIT_THREADS)


def nbdkit_argv(*, plugin_script: Path, container: Path, read_only: bool, discard: bool,
                keyfd: int | None, pidfile: Path, pause_control: Path,
                unix_socket: Path | None = None, tcp: tuple[str, int] | None = None,
                exit_with_parent: bool = False, tls: str = "off",
                tls_psk: Path | None = None, tls_certificates: Path | None = None,
                threads: int = NBDKIT_THREADS,
                cow_control: Path | None = None,
                snapshot_dir: Path | None = None,
                volume_params: Sequence[str] | None = None) -> list[str]:
    """nbdkit serving one container through the blockcrypt Python plugin.

    The pause filter is always stacked on top so a snapshot can quiesce I/O
    through ``pause_control`` while the disk is in use.  ``keyfd`` names an
    inherited descriptor carrying the data key (None for unencrypted disks).
    ``cow_control``: the plugin's copy-before-write snapshot socket (nbd/cow.py);
    ``snapshot_dir``: where a detached disk's snapshot copy waits to be taken over.
    tls: "off", "on" or "require" (nbdkit's --tls); with "on"/"require" exactly
    one of tls_psk / tls_certificates must be given; with certificates every
    client must present one signed by the directory's CA (``--tls-verify-peer``).
    ``threads``: nbdkit worker threads per connection (see NBDKIT_THREADS).
    ``volume_params``: the plugin's ``key=value`` parameters naming a disk that is not a
    file (an RBD image: ``rbd-*``, never a key); they replace ``file=container``.
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
            # Without --tls-verify-peer nbdkit asks no client certificate at all:
            # any client that trusts the server would get the decrypted disk.
            argv += [f"--tls-certificates={tls_certificates}", "--tls-verify-peer"]
    if read_only:
        argv.append("--readonly")
    argv += ["--filter=pause", "python", str(plugin_script)]
    argv += list(volume_params) if volume_params is not None else [f"file={container}"]
    if keyfd is not None:
        argv.append(f"keyfd={keyfd}")
    argv += [f"readonly={'true' if read_only else 'false'}",
             f"discard={'true' if discard else 'false'}",
             f"pause-control={pause_control}"]
    if cow_control is not None:
        argv.append(f"cowctl={cow_control}")
    if snapshot_dir is not None:
        argv.append(f"snapdir={snapshot_dir}")
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
