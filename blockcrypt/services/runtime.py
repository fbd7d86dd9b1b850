"""The processes and the block device behind one attachment, and their teardown.

Owns: starting nbdkit for a disk and waiting until it serves (the data key (DK)
goes through a pipe whose read end nbdkit inherits, ``keyfd=N``: never argv, the
environment or a file), connecting a block device to it (``nbd-client -unix SOCK
/dev/nbdN`` when the kernel has the nbd driver, else nbdfuse exposing the export
as ``run/<name>/fuse/disk`` and ``losetup --sector-size`` on that file), the
names inside a run directory, the checks made before anything starts, and
:func:`teardown`, which undoes all of it (also what a crash left behind).

It does not touch the catalog: the attachment row belongs to
:mod:`blockcrypt.services.attach`, which passes in what it needs (the row, a
callback for the nbdfuse pid).  Programs are started through
:mod:`blockcrypt.system.proc` with argv from :mod:`blockcrypt.system.commands`.
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .. import errors
from ..crypto.secret import Secret
from ..nbd.launch import plugin_env, plugin_path
from ..storage.home import ensure_private_dir, private_umask
from ..system import commands, devices, proc
from ..testing.crashpoints import crashpoint

# How an attachment is served (the catalog's ``method`` column).
ATTACH_NBD = "nbd-client"
ATTACH_LOOP = "nbdfuse-loop"
SERVE = "serve"

# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX_BYTES = 107
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 1500

# Names inside a run directory.
NBD_SOCKET = "nbd.sock"
CONTROL_SOCKET = "ctl.sock"
# The plugin's copy-before-write snapshot socket (blockcrypt/nbd/cow.py), beside
# the pause filter's: snapshots find it from the attachment's control_socket.
COW_SOCKET = "cow.sock"
# Beside the disks' run directories (a name no disk has): snapshots in progress, and
# the sockets where a detached disk's copy waits to be taken over (nbd/cow.py).
SNAPSHOTS_DIR = ".snapshots"
NBDKIT_PIDFILE = "nbdkit.pid"
NBDKIT_LOG = "nbdkit.log"
NBDFUSE_PIDFILE = "nbdfuse.pid"
NBDFUSE_LOG = "nbdfuse.log"
FUSE_DIR = "fuse"
FUSE_FILE = "disk"


# -- checks before anything starts ------------------------------------------------

def require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise errors.NotRoot(action=action)


def require_tools(*tools: str) -> None:
    """MissingTool before anything starts (nbdkit runs under a shell, which would
    only report "not found" as exit status 127)."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise errors.MissingTool(tool=tool, package=commands.PACKAGES.get(tool, tool))


def check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > UNIX_PATH_MAX_BYTES:
        raise errors.InvalidInput(
            detail=f"socket path {path} is longer than {UNIX_PATH_MAX_BYTES} bytes, the "
                   "limit of a Unix socket; use a shorter --home or disk name")


def check_threads(threads: int | None) -> None:
    """Refuse a worker-thread count nbdkit should not get (before anything starts)."""
    if threads is not None and not commands.valid_thread_count(threads):
        raise errors.InvalidInput(
            detail=f"--threads must be between 1 and {commands.MAX_NBDKIT_THREADS}, got "
                   f"{threads}; the default is {commands.NBDKIT_THREADS} "
                   f"({commands.RBD_NBDKIT_THREADS} for disks on Ceph RBD)")


# -- starting -------------------------------------------------------------------------

def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:] or "(empty log)"


def _tighten(run_dir: Path) -> None:
    """Make the files nbdkit/nbdfuse created in run_dir (pid files, sockets:
    they use umask 022) 0600 like every other file of the home."""
    for entry in os.scandir(run_dir):
        if not entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
            os.chmod(entry.path, 0o600)


def _wait_ready(p: subprocess.Popen, ready: Callable[[], bool],
                exited: Callable[[int], errors.BlockcryptError],
                timed_out: Callable[[], errors.BlockcryptError]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        rc = p.poll()
        if rc is not None:
            raise exited(rc)
        if time.monotonic() > deadline:
            raise timed_out()
        time.sleep(0.02)


def start_nbdkit(name: str, container: Path, *, discard: bool, dk: Secret | None,
                 run_dir: Path, read_only: bool, unix_socket: Path | None = None,
                 tcp: tuple[str, int] | None = None, tls: str = "off",
                 tls_psk: Path | None = None, tls_certificates: Path | None = None,
                 serve: bool = False,
                 threads: int | None = None,
                 volume_params: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """Start nbdkit serving ``container`` and wait until it serves; returns (the
    process we started, nbdkit's pid): for attach the process is the supervisor
    shell (see :func:`blockcrypt.system.commands.supervised_argv`), for serve
    nbdkit itself.

    The DK is written into a pipe (64 bytes fit its buffer), the write end
    closed, and only the read end's number goes on the command line.
    """
    log_path = run_dir / NBDKIT_LOG
    pidfile = run_dir / NBDKIT_PIDFILE
    keyfd = None
    try:
        if dk is not None:
            keyfd, wfd = os.pipe()
            try:
                os.write(wfd, dk.view())
            finally:
                os.close(wfd)
        argv = commands.nbdkit_argv(
            plugin_script=plugin_path(), container=container, read_only=read_only,
            discard=discard, keyfd=keyfd, pidfile=pidfile,
            pause_control=run_dir / CONTROL_SOCKET, unix_socket=unix_socket, tcp=tcp,
            exit_with_parent=serve, tls=tls, tls_psk=tls_psk, tls_certificates=tls_certificates,
            threads=(commands.default_threads(on_rbd=volume_params is not None)
                     if threads is None else threads),
            cow_control=None if read_only or volume_params is not None else run_dir / COW_SOCKET,
            snapshot_dir=None if read_only or volume_params is not None
            else run_dir.parent / SNAPSHOTS_DIR,
            volume_params=volume_params)
        with private_umask():
            log = open(log_path, "ab")
        with log:
            # serve: nbdkit is our child, exits with us (--exit-with-parent) and
            # its messages go to the user's stderr.  attach: it must outlive us,
            # so a supervisor shell is its parent; messages go to the run dir.
            p = proc.spawn(argv if serve else commands.supervised_argv(argv), env=plugin_env(),
                           pass_fds=() if keyfd is None else (keyfd,),
                           stdout=log, stderr=None if serve else log)
    finally:
        if keyfd is not None:
            os.close(keyfd)
    _wait_ready(p, lambda: proc.pid_matches(proc.read_pidfile(pidfile), "nbdkit",
                                            f"{run_dir}/"),
                lambda rc: errors.ServerError(
                    name=name, reason=f"nbdkit exited with status {rc} before serving"
                                      + ("" if serve else ": " + _log_tail(log_path))),
                lambda: errors.ServerError(
                    name=name, reason=f"nbdkit not ready after {START_TIMEOUT_S:g} s"))
    _tighten(run_dir)
    return p, proc.read_pidfile(pidfile)


# -- block devices ----------------------------------------------------------------------

def nbd_available() -> bool:
    """Does the kernel have the nbd driver (loading it if needed)?"""
    if not Path("/sys/module/nbd").exists():
        try:
            proc.run(commands.modprobe_argv("nbd"), check=False, timeout_s=30)
        except errors.MissingTool:
            return False
    return Path("/sys/block/nbd0").exists() and shutil.which("nbd-client") is not None


def connect_nbd(name: str, *, sector_size: int, run_dir: Path, read_only: bool) -> str:
    """Connect a free /dev/nbdN to the run directory's socket; returns the device."""
    last: errors.BlockcryptError | None = None
    for device in devices.free_nbd_devices()[:8]:
        try:
            proc.run(commands.nbd_client_connect_argv(
                unix_socket=run_dir / NBD_SOCKET, device=device,
                sector_size=sector_size, export_name=name, read_only=read_only))
            return device
        except errors.CommandFailed as e:  # raced with another attach: try the next
            last = e
    why = last.message if last else "none is free"
    raise errors.NoBlockDevice(name=name, reason=f"no /dev/nbd* device could be "
                                                  f"connected ({why})")


def connect_loop(name: str, *, sector_size: int, run_dir: Path, read_only: bool,
                 on_helper_pid: Callable[[int], None]) -> tuple[str, int]:
    """nbdfuse + losetup; returns (loop device, nbdfuse pid).  ``on_helper_pid``
    records nbdfuse's pid as soon as it is started (before it is ready)."""
    fuse_dir = ensure_private_dir(run_dir / FUSE_DIR)
    fuse_file = fuse_dir / FUSE_FILE
    pidfile = run_dir / NBDFUSE_PIDFILE
    log_path = run_dir / NBDFUSE_LOG
    with private_umask():
        log = open(log_path, "ab")
    with log:
        p = proc.spawn(commands.nbdfuse_argv(fuse_file=fuse_file,
                                             unix_socket=run_dir / NBD_SOCKET,
                                             pidfile=pidfile, read_only=read_only),
                       stdout=log, stderr=log)
    on_helper_pid(p.pid)
    _wait_ready(p, lambda: proc.read_pidfile(pidfile) == p.pid and fuse_file.exists(),
                lambda rc: errors.NoBlockDevice(
                    name=name, reason=f"nbdfuse exited with status {rc}: "
                                      f"{_log_tail(log_path)}"),
                lambda: errors.NoBlockDevice(
                    name=name, reason=f"nbdfuse not ready after {START_TIMEOUT_S:g} s"))
    _tighten(run_dir)
    crashpoint("disk-attach.after-nbdfuse")
    argv = commands.losetup_attach_argv(fuse_file, sector_size=sector_size, read_only=read_only)
    for attempt in range(5):  # losetup --find can race with another attach
        try:
            device = proc.run(argv).stdout.decode().strip()
            break
        except errors.CommandFailed:
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    if not device.startswith("/dev/loop"):
        raise errors.NoBlockDevice(name=name, reason=f"losetup printed {device!r}")
    return device, p.pid


# -- teardown ---------------------------------------------------------------------------

def mounts_left(att: sqlite3.Row, run_dir: Path) -> list[tuple[str, str]]:
    """(device, mount point) of every file system still mounted from an attachment's
    block device: the loop devices whose backing file is the run directory's fuse
    file (found from /sys, so a reused /dev/loopN of another disk never counts),
    or its /dev/nbdN.  Read from /proc/self/mountinfo."""
    devs = set(devices.loop_devices_backed_by(run_dir / FUSE_DIR / FUSE_FILE))
    if att["method"] == ATTACH_NBD and att["device"]:
        devs.add(att["device"])
    return [m for dev in sorted(devs) for m in devices.device_mounts(dev)]


def remove_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except OSError:
        pass


def teardown(att: sqlite3.Row | None, run_dir: Path, *, clean: bool) -> None:
    """Undo an attachment: block device, fuse mount, processes, run directory.

    Found from the row and from what exists (loop devices backed by the fuse
    file, processes whose argv names run_dir), so it also cleans the leftovers
    of a crash.  Idempotent.  clean=True (detach of a live attachment) flushes
    first and raises DeviceBusy instead of forcing when the device is still
    in use; clean=False (stale) forces: lazy fuse unmount, SIGKILL.
    """
    marker = f"{run_dir}/"
    fuse_dir = run_dir / FUSE_DIR
    fuse_file = fuse_dir / FUSE_FILE
    name = run_dir.name
    # 1. the block device
    if att is not None and att["method"] == ATTACH_NBD and att["device"]:
        if clean:
            proc.run(commands.blockdev_flush_argv(att["device"]))
        proc.run(commands.nbd_client_disconnect_argv(att["device"]), check=clean)
    loops = devices.loop_devices_backed_by(fuse_file)
    for dev in loops:
        if clean:
            proc.run(commands.blockdev_flush_argv(dev))
        proc.run(commands.losetup_detach_argv(dev), check=clean)
    if loops:
        deadline = time.monotonic() + (3.0 if clean else 0.5)
        while devices.loop_devices_backed_by(fuse_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = devices.loop_devices_backed_by(fuse_file)
        if busy and clean:
            raise errors.DeviceBusy(
                f"disk {name!r}: {busy[0]} is still open by a process; close it (see "
                f"`fuser -v {busy[0]}`) and retry `blockcrypt disk detach {name}`",
                name=name, mountpoint=busy[0])
    # 2. the fuse mount and nbdfuse
    if devices.is_mountpoint(fuse_dir):
        cp = proc.run(commands.fusermount_unmount_argv(fuse_dir), check=False)
        if cp.returncode != 0 and devices.is_mountpoint(fuse_dir):
            if clean:
                raise errors.DeviceBusy(
                    f"disk {name!r}: the nbdfuse mount {fuse_dir} is busy "
                    f"({cp.stderr.decode(errors='replace').strip()}); retry later",
                    name=name, mountpoint=str(fuse_dir))
            proc.run(commands.fusermount_unmount_argv(fuse_dir, lazy=True), check=False)
    helpers = set(proc.find_processes("nbdfuse", marker))
    if att is not None and att["helper_pid"]:
        helpers.add(att["helper_pid"])
    for pid in helpers:
        # after the unmount nbdfuse exits by itself; give it a moment
        if not proc.wait_gone(pid, "nbdfuse", marker, 2.0 if clean else 0.2):
            proc.stop_process(pid, "nbdfuse", marker, STOP_TIMEOUT_S)
    # 3. nbdkit
    servers = set(proc.find_processes("nbdkit", marker))
    if att is not None and att["nbdkit_pid"]:
        servers.add(att["nbdkit_pid"])
    for pid in servers:
        proc.stop_process(pid, "nbdkit", marker, STOP_TIMEOUT_S if clean else 2.0)
    # 4. files: the run directory, and a serve socket outside it
    if att is not None and att["method"] == SERVE and att["socket"] \
            and att["socket"].startswith("/"):
        remove_socket(Path(att["socket"]))
    if not devices.is_mountpoint(fuse_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
