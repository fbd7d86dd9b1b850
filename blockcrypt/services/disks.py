"""The disk service: create, list, show, delete, attach, detach, serve and copy disks.

A disk is a container file ``<home>/disks/<id>.bcd`` (see docs/FORMAT.md) plus a
row in the catalog.  An encrypted disk's data key (DK) exists in plaintext only
in this process while it is being generated or unwrapped, and in the nbdkit
process serving the disk; it is never written to argv, the environment, a log
or a file.

Crash safety of create and delete (no orphan rows, no orphan files)
-----------------------------------------------------------------------
create: 1. write the container to ``disks/<id>.bcd.tmp-<pid>-<start>`` (fsynced);
        2. insert the catalog row (a committed transaction);
        3. rename the file to ``disks/<id>.bcd`` and fsync the directory.
delete: 1. in one write transaction: rename ``<id>.bcd`` to ``<id>.bcd.deleted``
           (or, if a create committed but has not renamed yet, its temp file:
           :func:`doom`; the creator's rename then finds nothing, :func:`publish`),
           delete the row, commit;
        2. unlink ``<id>.bcd.deleted``.
Snapshots (blockcrypt.services.snapshots) follow the same scheme under ``snapshots/``.
So a ``<id>.bcd`` file always has a committed row, and recovery
(:meth:`DiskService.recover_files`, run by every disk command, under the
database write lock) only ever acts on the two marker names:
- ``.tmp-<pid>-<start>`` whose creator is gone: with a row, the create committed,
  so finish it (rename); without one, it never committed, so remove the file;
  with a row *and* ``<id>.bcd`` present, it is the replacement an interrupted
  ``disk reset``/``reinit`` was building (they swap by renaming it over the old
  file, see blockcrypt.services.snapshots), so remove it;
- ``.deleted``: with a row, the delete never committed, so rename it back;
  without one, finish it (unlink).
A plain ``<id>.bcd`` is never removed automatically, nor a row whose file is
missing: those are left to the operator.

Attach (``disk attach``)
------------------------
Checks run before anything starts: the disk exists, it is not in use, its CMK
is usable (a disabled, pending-deletion or missing key refuses here).  Then the
attachment is *claimed*: a row in state ``attaching`` inserted inside ``BEGIN
IMMEDIATE`` (the table's primary key makes it one per disk, so of many
concurrent attaches exactly one proceeds, and the others fail before paying for
the passphrase KDF).  Then the DK is unwrapped and:

- nbdkit in the background: ``--foreground`` in its own session under a
  supervisor shell (see :func:`blockcrypt.system.proc.supervised_argv`), so it does
  not fork and the process holding the key is the one that mlocked it,
  with the pause filter (snapshots quiesce I/O through its control socket),
  its socket, control socket, pid file and log in ``<home>/run/<name>/`` (0700);
  the DK goes through a pipe whose read end nbdkit inherits (``keyfd=N``);
- a block device: ``nbd-client -unix SOCK /dev/nbdN`` when the kernel has the
  nbd driver, else nbdfuse exposing the export as ``run/<name>/fuse/disk`` and
  ``losetup --sector-size`` on that file.

The row then moves to ``attached``.  Any failure tears down what was started
and removes the claim.  ``disk serve`` claims the same way (method ``serve``),
runs nbdkit as its own child with ``--exit-with-parent`` until a signal, and
removes the row when it stops.

Detach refuses while the device or a partition of it is mounted (naming the
mount point), has holders (dm, md) or is claimed exclusively; otherwise it marks
the row ``detaching``, flushes the device, disconnects it (losetup -d /
nbd-client -d), unmounts the fuse file, stops nbdkit (SIGTERM, then SIGKILL
after 10 s), removes the run directory and deletes the row.

Stale attachments
-----------------
An ``attached`` row is stale when its nbdkit (or its nbdfuse) is gone: no live
process with that pid whose argv names the run directory (a reused pid fails
that test).  An ``attaching``/``detaching`` row is stale when the CLI process
that owns it (pid and start time) is gone.  ``disk list/show/attach/detach``
clean stale rows: under the write lock they stop any leftover processes (found
by the run directory in their argv), detach loop devices backed by the fuse
file, unmount the fuse mount, remove the run directory and delete the row.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import signal
import socket as socketlib
import sqlite3
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .. import errors, names
from ..constants import utc_timestamp
from ..crypto.secret import Secret
from ..kms.envelope import parse_wrapped
from ..nbd.launch import plugin_env, plugin_path
from ..storage import catalog, container, db
from ..storage.home import ensure_private_dir, fsync_dir, private_umask
from ..system import proc, quiesce
from ..testing.crashpoints import crashpoint

ATTACH_NBD = "nbd-client"
ATTACH_LOOP = "nbdfuse-loop"
SERVE = "serve"

# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX_BYTES = 107
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
LOCK_WAIT_TIMEOUT_S = 120.0   # attach waits this long for a snapshot copy to finish
LOG_TAIL_CHARS = 1500
DEFAULT_SECTOR_SIZE = 4096

# Names inside a run directory.
NBD_SOCKET = "nbd.sock"
CONTROL_SOCKET = "ctl.sock"
NBDKIT_PIDFILE = "nbdkit.pid"
NBDKIT_LOG = "nbdkit.log"
NBDFUSE_PIDFILE = "nbdfuse.pid"
NBDFUSE_LOG = "nbdfuse.log"
FUSE_DIR = "fuse"
FUSE_FILE = "disk"

_TMP_MARK = ".tmp-"
_DELETED_MARK = ".deleted"



def _log_tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no log)"
    return text[-LOG_TAIL_CHARS:] or "(empty log)"


def _require_root(action: str) -> None:
    if os.geteuid() != 0:
        raise errors.NotRoot(action=action)


def _require_tools(*tools: str) -> None:
    """MissingTool before anything starts (nbdkit runs under a shell, which would
    only report "not found" as exit status 127)."""
    for tool in tools:
        if shutil.which(tool) is None:
            raise errors.MissingTool(tool=tool, package=proc.PACKAGES.get(tool, tool))


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(str(path))) > UNIX_PATH_MAX_BYTES:
        raise errors.InvalidInput(
            detail=f"socket path {path} is longer than {UNIX_PATH_MAX_BYTES} bytes, the "
                   "limit of a Unix socket; use a shorter --home or disk name")


# -- serve endpoints ---------------------------------------------------------

def parse_tcp_endpoint(text: str) -> tuple[str, int]:
    """'127.0.0.1:10809' or '[::1]:10809' -> (host, port).  Host must be an IP address."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise errors.InvalidInput(detail=f"--tcp {text!r}: use HOST:PORT, e.g. 127.0.0.1:10809")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise errors.InvalidInput(
            detail=f"--tcp {text!r}: {host!r} is not an IP address (a hostname could resolve "
                   "to several addresses; give the one to listen on)") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise errors.InvalidInput(detail=f"--tcp {text!r}: port must be 1-65535")
    return host, int(port_text)


def _check_threads(threads: int | None) -> None:
    """Refuse a worker-thread count nbdkit should not get (before anything starts)."""
    if threads is not None and not proc.valid_thread_count(threads):
        raise errors.InvalidInput(
            detail=f"--threads must be between 1 and {proc.MAX_NBDKIT_THREADS}, got {threads}; "
                   f"the default is {proc.NBDKIT_THREADS}")


def serve_tls_mode(*, tcp: tuple[str, int] | None, tls_psk: Path | None,
                   tls_certificates: Path | None, no_tls: bool) -> str:
    """nbdkit's --tls mode for a serve request; raise InvalidInput if the
    combination is refused.  TCP requires TLS unless --no-tls on loopback."""
    if tls_psk is not None and tls_certificates is not None:
        raise errors.InvalidInput(detail="give only one of --tls-psk and --tls-certificates")
    if no_tls and (tls_psk is not None or tls_certificates is not None):
        raise errors.InvalidInput(detail="--no-tls contradicts --tls-psk/--tls-certificates")
    if tls_psk is not None:
        if not Path(tls_psk).is_file():
            raise errors.InvalidInput(detail=f"--tls-psk {tls_psk}: no such file")
        return "require"
    if tls_certificates is not None:
        if not Path(tls_certificates).is_dir():
            raise errors.InvalidInput(detail=f"--tls-certificates {tls_certificates}: "
                                             "no such directory")
        return "require"
    if tcp is None:
        return "off"  # a Unix socket: access is controlled by file permissions
    if not no_tls:
        raise errors.InvalidInput(
            detail="serving over TCP requires TLS: pass --tls-psk FILE or "
                   "--tls-certificates DIR (or --no-tls, allowed on loopback addresses only)")
    if not ipaddress.ip_address(tcp[0]).is_loopback:
        raise errors.InvalidInput(
            detail=f"--no-tls is only allowed on loopback addresses (127.0.0.0/8, ::1), "
                   f"not {tcp[0]}: anyone on the network could read and write the disk; "
                   "use --tls-psk FILE or --tls-certificates DIR")
    return "off"


# -- the service ----------------------------------------------------------------

class DiskService:
    """Disk operations on one home.

    ``conn`` is the catalog's SQLite connection; ``keys`` is the
    :class:`~blockcrypt.kms.provider.KeyProvider` that wraps and unwraps data
    keys (the services never read key tables themselves).
    """

    def __init__(self, home, conn: sqlite3.Connection, keys):
        self.home = home
        self.keys = keys
        self.conn: sqlite3.Connection = conn
        self._pid = os.getpid()
        self._start = proc.process_start_time(self._pid)

    # -- helpers --------------------------------------------------------------
    def disk_row(self, name: str) -> sqlite3.Row:
        """The catalog row of disk ``name``; DiskNotFound if there is none."""
        names.validate_name(name)
        row = catalog.get_disk(self.conn, name)
        if row is None:
            raise errors.DiskNotFound(name=name)
        return row

    def path_of(self, disk: sqlite3.Row) -> Path:
        return self.home.path / disk["path"]

    def run_dir_of(self, name: str) -> Path:
        return self.home.run_dir / name

    def _read_header(self, disk: sqlite3.Row):
        path = self.path_of(disk)
        if not path.exists():
            raise errors.StorageError(path=str(path),
                                      reason=f"the container of disk {disk['name']!r} is missing")
        header = container.read_header(path)
        check_header_matches(header, disk, path)
        return header

    def _unwrap(self, disk: sqlite3.Row, header) -> Secret | None:
        """The plaintext DK of an encrypted disk (caller wipes), None if unencrypted.
        Key state is checked first so a disabled key fails before any work."""
        if not header.encrypted:
            return None
        self.keys.check_usable(header.cmk_id)
        return self.keys.decrypt_data_key(header.wrapped_dk, container.key_context(header))

    # -- crash recovery of create/delete ---------------------------------------
    def recover_files(self) -> list[str]:
        """Finish or undo interrupted creates/deletes (see module doc); returns actions."""
        return recover_dir(self.conn, self.home.disks_dir, "disks")

    # -- create / list / show / delete ----------------------------------------------
    def create(self, name: str, size_bytes: int, *, encrypted: bool = True,
               key_ref: str | None = None, sector_size: int = DEFAULT_SECTOR_SIZE,
               discard: bool = False) -> dict:
        """Create a disk; returns its description (as :meth:`show`).

        Every argument is validated before anything is written.  An encrypted
        disk gets a fresh DK from the key store, wrapped by key_ref (default:
        the service key) under a context binding this container's identity.
        """
        names.validate_name(name)
        names.check_sector_size(sector_size)
        names.check_size(size_bytes, sector_size)
        # The container's own limit (data offset + size < 2^63), checked before the
        # key store is touched (the service key is created on first use).
        container.new_header(container.Kind.DISK, size_bytes, sector_size, encrypted=False)
        if key_ref is not None and not encrypted:
            raise errors.InvalidInput(detail="--key names the CMK of an encrypted disk; "
                                             "it cannot be used with --no-encrypted")
        self.recover_files()
        if catalog.get_disk(self.conn, name) is not None:
            raise errors.AlreadyExists(what="disk", name=name)
        self.home.create_dirs()

        uid = os.urandom(16)
        if encrypted:
            lineage = os.urandom(16)  # a data key's lineage; unencrypted disks have none
            key = self.keys.get_key(key_ref) if key_ref else self.keys.default_key()
            header = container.new_header(container.Kind.DISK, size_bytes, sector_size,
                                          encrypted=True, uid=uid, cmk_id=key["id"],
                                          lineage_id=lineage)
            dk, wrapped = self.keys.generate_data_key(key["id"], container.key_context(header))
            dk.wipe()  # create needs only the wrapped form
            header = header.replace(wrapped_dk=wrapped,
                                    cmk_version=parse_wrapped(wrapped).key_version)
        else:
            header = container.new_header(container.Kind.DISK, size_bytes, sector_size,
                                          encrypted=False, uid=uid)

        rel_path = f"disks/{header.uid_hex}.bcd"
        final = self.home.path / rel_path
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{self._pid}-{self._start}")
        with private_umask():
            container.create_container(tmp, header)
        crashpoint("disk-create.after-file")
        try:
            with db.write_txn(self.conn):
                if catalog.get_disk(self.conn, name) is not None:
                    raise errors.AlreadyExists(what="disk", name=name)
                catalog.insert_disk(
                    self.conn, id=header.uid_hex, name=name, path=rel_path,
                    size_bytes=size_bytes, sector_size=sector_size, encrypted=int(encrypted),
                    cmk_id=header.cmk_id, lineage_id=header.lineage_hex,
                    discard=int(discard), source_snapshot_id=None, created_at=utc_timestamp())
                row = catalog.get_disk_by_id(self.conn, header.uid_hex)
                crashpoint("disk-create.in-txn")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        crashpoint("disk-create.after-row")
        publish(tmp, final)
        return self.describe(row, None)   # as created (a delete may already follow)

    def describe(self, disk: sqlite3.Row, att: sqlite3.Row | None, stale: bool = False) -> dict:
        out = {
            "name": disk["name"], "id": disk["id"], "path": str(self.path_of(disk)),
            "size_bytes": disk["size_bytes"], "sector_size": disk["sector_size"],
            "encrypted": bool(disk["encrypted"]), "cmk_id": disk["cmk_id"],
            "lineage_id": disk["lineage_id"], "discard": bool(disk["discard"]),
            "source_snapshot_id": disk["source_snapshot_id"], "created_at": disk["created_at"],
            "state": "available", "device": None, "method": None, "read_only": None,
            "socket": None, "control_socket": None, "nbdkit_pid": None,
        }
        if att is not None:
            out.update(state="stale" if stale else att["state"], device=att["device"],
                       method=att["method"], read_only=bool(att["read_only"]),
                       socket=att["socket"], control_socket=att["control_socket"],
                       nbdkit_pid=att["nbdkit_pid"])
        return out

    def list(self) -> list[dict]:
        self.recover_files()
        stale = self._cleanup_stale_quietly()
        return [self.describe(d, catalog.get_attachment(self.conn, d["id"]), d["id"] in stale)
                for d in catalog.list_disks(self.conn)]

    def _require_free(self, disk) -> None:
        """Clean a stale attachment of disk, then refuse if it is still in use."""
        self.cleanup_stale(disk["id"])
        att = catalog.get_attachment(self.conn, disk["id"])
        if att is not None:
            raise self.in_use_error(disk["name"], att)

    def show(self, name: str) -> dict:
        self.recover_files()
        disk = self.disk_row(name)
        stale = self._cleanup_stale_quietly(disk["id"])
        return self.describe(disk, catalog.get_attachment(self.conn, disk["id"]),
                              disk["id"] in stale)

    def delete(self, name: str) -> None:
        """Delete a disk (refused while attached or served): file and row."""
        self.recover_files()
        disk = self.disk_row(name)
        self.cleanup_stale(disk["id"])
        d = self.home.disks_dir
        with db.write_txn(self.conn):
            disk = self.disk_row(name)
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is not None:
                raise self.in_use_error(disk["name"], att)
            doomed = doom(self.path_of(disk))
            catalog.delete_disk(self.conn, disk["id"])
            crashpoint("disk-delete.in-txn")
        crashpoint("disk-delete.after-row")
        doomed.unlink(missing_ok=True)
        fsync_dir(d)

    # -- attachments: state -----------------------------------------------------
    def _is_stale(self, att: sqlite3.Row) -> bool:
        if att["state"] in ("attaching", "detaching"):
            return not proc.process_alive(att["owner_pid"], att["owner_start"])
        marker = f"{att['run_dir']}/"
        if not proc.pid_matches(att["nbdkit_pid"], "nbdkit", marker):
            return True
        if att["method"] == ATTACH_LOOP and not proc.pid_matches(att["helper_pid"], "nbdfuse",
                                                                 marker):
            return True
        return False

    def in_use_error(self, name: str, att: sqlite3.Row) -> errors.DiskAttached:
        device = att["device"] or att["socket"]
        if att["state"] == "attaching":
            msg = (f"disk {name!r} is being attached by process {att['owner_pid']}; "
                   "wait for it to finish")
        elif att["state"] == "detaching":
            msg = (f"disk {name!r} is being detached by process {att['owner_pid']}; "
                   "wait for it to finish")
        elif att["method"] == SERVE:
            msg = (f"disk {name!r} is being served on {att['socket']} by `blockcrypt disk "
                   f"serve` (process {att['owner_pid']}); stop that server first")
        else:
            msg = None
        return errors.DiskAttached(msg, name=name, device=device)

    def cleanup_stale(self, disk_id: str | None = None) -> list[str]:
        """Clean stale attachments (all, or one disk's); returns the disk ids cleaned.

        Live attachments get a resume nudge instead: it ends an I/O pause left by
        a snapshot killed while it held it, and never disturbs a running one
        (:func:`blockcrypt.system.quiesce.nudge_resume`).
        """
        rows = ([catalog.get_attachment(self.conn, disk_id)] if disk_id
                else catalog.list_attachments(self.conn))
        cleaned = []
        for att in rows:
            if att is None:
                continue
            if not self._is_stale(att):
                if att["state"] == "attached" and att["control_socket"]:
                    quiesce.nudge_resume(att["control_socket"])
                continue
            with db.write_txn(self.conn):
                again = catalog.get_attachment(self.conn, att["disk_id"])
                if again is None or tuple(again) != tuple(att) or not self._is_stale(again):
                    continue  # changed meanwhile: someone else cleaned or re-attached
                self._teardown(again, Path(again["run_dir"]), clean=False)
                catalog.delete_attachment(self.conn, again["disk_id"])
            cleaned.append(att["disk_id"])
        return cleaned

    def _cleanup_stale_quietly(self, disk_id: str | None = None) -> set[str]:
        """For list/show: clean what can be cleaned; return ids still stale."""
        try:
            self.cleanup_stale(disk_id)
            return set()
        except errors.BlockcryptError:
            rows = ([catalog.get_attachment(self.conn, disk_id)] if disk_id
                    else catalog.list_attachments(self.conn))
            return {r["disk_id"] for r in rows if r is not None and self._is_stale(r)}

    def _claim(self, disk: sqlite3.Row, *, method: str, read_only: bool, run_dir: Path,
               sock: str | None, control_socket: Path) -> None:
        """Insert the attachment row in state 'attaching' (one winner per disk)."""
        with db.write_txn(self.conn):
            if catalog.get_disk_by_id(self.conn, disk["id"]) is None:  # deleted meanwhile
                raise errors.DiskNotFound(name=disk["name"])
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is not None:
                if not self._is_stale(att):
                    raise self.in_use_error(disk["name"], att)
                self._teardown(att, Path(att["run_dir"]), clean=False)
                catalog.delete_attachment(self.conn, disk["id"])
            if run_dir.exists():  # leftovers without a row (e.g. a crash during cleanup)
                self._teardown(None, run_dir, clean=False)
            catalog.insert_attachment(
                self.conn, disk_id=disk["id"], state="attaching", owner_pid=self._pid,
                owner_start=self._start, device=None, method=method, read_only=int(read_only),
                nbdkit_pid=None, helper_pid=None, run_dir=str(run_dir), socket=sock,
                control_socket=str(control_socket), attached_at=utc_timestamp())

    def _update(self, disk_id: str, **changes) -> None:
        with db.write_txn(self.conn):
            catalog.update_attachment(self.conn, disk_id, **changes)

    def _release(self, disk_id: str) -> None:
        with db.write_txn(self.conn):
            catalog.delete_attachment(self.conn, disk_id)

    # -- attachments: processes ----------------------------------------------------
    def _start_nbdkit(self, name: str, disk: sqlite3.Row, dk: Secret | None, run_dir: Path, *,
                      read_only: bool, unix_socket: Path | None = None,
                      tcp: tuple[str, int] | None = None, tls: str = "off",
                      tls_psk: Path | None = None, tls_certificates: Path | None = None,
                      serve: bool = False,
                      threads: int | None = None) -> tuple[subprocess.Popen, int]:
        """Start nbdkit for the disk and wait until it serves; returns (the
        process we started, nbdkit's pid): for attach the process is the
        supervisor shell (see proc.supervised_argv), for serve nbdkit itself.

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
            argv = proc.nbdkit_argv(
                plugin_script=plugin_path(), container=self.path_of(disk), read_only=read_only,
                discard=bool(disk["discard"]), keyfd=keyfd, pidfile=pidfile,
                pause_control=run_dir / CONTROL_SOCKET, unix_socket=unix_socket, tcp=tcp,
                exit_with_parent=serve, tls=tls,
                tls_psk=tls_psk, tls_certificates=tls_certificates,
                threads=proc.NBDKIT_THREADS if threads is None else threads)
            with private_umask():
                log = open(log_path, "ab")
            with log:
                # serve: nbdkit is our child, exits with us (--exit-with-parent) and
                # its messages go to the user's stderr.  attach: it must outlive us,
                # so a supervisor shell is its parent; messages go to the run dir.
                p = proc.spawn(argv if serve else proc.supervised_argv(argv), env=plugin_env(),
                               pass_fds=() if keyfd is None else (keyfd,),
                               stdout=log, stderr=None if serve else log)
        finally:
            if keyfd is not None:
                os.close(keyfd)
        self._wait_ready(p, lambda: proc.pid_matches(proc.read_pidfile(pidfile), "nbdkit",
                                                    f"{run_dir}/"),
                         lambda rc: errors.ServerError(
                             name=name, reason=f"nbdkit exited with status {rc} before serving"
                                               + ("" if serve else ": " + _log_tail(log_path))),
                         lambda: errors.ServerError(
                             name=name, reason=f"nbdkit not ready after {START_TIMEOUT_S:g} s"))
        _tighten(run_dir)
        return p, proc.read_pidfile(pidfile)

    @staticmethod
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

    def _nbd_available(self) -> bool:
        """Does the kernel have the nbd driver (loading it if needed)?"""
        if not Path("/sys/module/nbd").exists():
            try:
                proc.run(proc.modprobe_argv("nbd"), check=False, timeout_s=30)
            except errors.MissingTool:
                return False
        return Path("/sys/block/nbd0").exists() and shutil.which("nbd-client") is not None

    def _connect_nbd(self, name: str, disk: sqlite3.Row, run_dir: Path, read_only: bool) -> str:
        last: errors.BlockcryptError | None = None
        for device in proc.free_nbd_devices()[:8]:
            try:
                proc.run(proc.nbd_client_connect_argv(
                    unix_socket=run_dir / NBD_SOCKET, device=device,
                    sector_size=disk["sector_size"], export_name=name, read_only=read_only))
                return device
            except errors.CommandFailed as e:  # raced with another attach: try the next
                last = e
        why = last.message if last else "none is free"
        raise errors.NoBlockDevice(name=name, reason=f"no /dev/nbd* device could be "
                                                      f"connected ({why})")

    def _connect_loop(self, name: str, disk: sqlite3.Row, run_dir: Path,
                      read_only: bool) -> tuple[str, int]:
        """nbdfuse + losetup; returns (loop device, nbdfuse pid)."""
        fuse_dir = ensure_private_dir(run_dir / FUSE_DIR)
        fuse_file = fuse_dir / FUSE_FILE
        pidfile = run_dir / NBDFUSE_PIDFILE
        log_path = run_dir / NBDFUSE_LOG
        with private_umask():
            log = open(log_path, "ab")
        with log:
            p = proc.spawn(proc.nbdfuse_argv(fuse_file=fuse_file, unix_socket=run_dir / NBD_SOCKET,
                                             pidfile=pidfile, read_only=read_only),
                           stdout=log, stderr=log)
        self._update(disk["id"], helper_pid=p.pid)
        self._wait_ready(p, lambda: proc.read_pidfile(pidfile) == p.pid and fuse_file.exists(),
                         lambda rc: errors.NoBlockDevice(
                             name=name, reason=f"nbdfuse exited with status {rc}: "
                                               f"{_log_tail(log_path)}"),
                         lambda: errors.NoBlockDevice(
                             name=name, reason=f"nbdfuse not ready after {START_TIMEOUT_S:g} s"))
        _tighten(run_dir)
        crashpoint("disk-attach.after-nbdfuse")
        argv = proc.losetup_attach_argv(fuse_file, sector_size=disk["sector_size"],
                                        read_only=read_only)
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

    def _teardown(self, att: sqlite3.Row | None, run_dir: Path, *, clean: bool) -> None:
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
                proc.run(proc.blockdev_flush_argv(att["device"]))
            proc.run(proc.nbd_client_disconnect_argv(att["device"]), check=clean)
        loops = proc.loop_devices_backed_by(fuse_file)
        for dev in loops:
            if clean:
                proc.run(proc.blockdev_flush_argv(dev))
            proc.run(proc.losetup_detach_argv(dev), check=clean)
        if loops:
            deadline = time.monotonic() + (3.0 if clean else 0.5)
            while proc.loop_devices_backed_by(fuse_file) and time.monotonic() < deadline:
                time.sleep(0.05)
            busy = proc.loop_devices_backed_by(fuse_file)
            if busy and clean:
                raise errors.DeviceBusy(
                    f"disk {name!r}: {busy[0]} is still open by a process; close it (see "
                    f"`fuser -v {busy[0]}`) and retry `blockcrypt disk detach {name}`",
                    name=name, mountpoint=busy[0])
        # 2. the fuse mount and nbdfuse
        if proc.is_mountpoint(fuse_dir):
            cp = proc.run(proc.fusermount_unmount_argv(fuse_dir), check=False)
            if cp.returncode != 0 and proc.is_mountpoint(fuse_dir):
                if clean:
                    raise errors.DeviceBusy(
                        f"disk {name!r}: the nbdfuse mount {fuse_dir} is busy "
                        f"({cp.stderr.decode(errors='replace').strip()}); retry later",
                        name=name, mountpoint=str(fuse_dir))
                proc.run(proc.fusermount_unmount_argv(fuse_dir, lazy=True), check=False)
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
            _remove_socket(Path(att["socket"]))
        if not proc.is_mountpoint(fuse_dir):
            shutil.rmtree(run_dir, ignore_errors=True)

    # -- attach / detach -------------------------------------------------------------
    def attach(self, name: str, *, read_only: bool = False,
               threads: int | None = None) -> dict:
        """Attach the disk as a local block device; returns the description.

        ``threads``: nbdkit worker threads per connection (default
        :data:`proc.NBDKIT_THREADS`).
        """
        _check_threads(threads)
        _require_root("blockcrypt disk attach")
        self.recover_files()
        disk = self.disk_row(name)
        self._require_free(disk)
        run_dir = self.run_dir_of(name)
        for sock in (run_dir / NBD_SOCKET, run_dir / CONTROL_SOCKET):
            _check_socket_path(sock)
        header = self._read_header(disk)
        method = ATTACH_NBD if self._nbd_available() else ATTACH_LOOP
        _require_tools("nbdkit", "blockdev",
                       *(("nbd-client",) if method == ATTACH_NBD else
                         ("nbdfuse", "losetup", "fusermount3")))
        if header.encrypted:
            self.keys.check_usable(header.cmk_id)  # cheap refusal before the claim
        dk = None
        try:
            # Claim first, then unwrap: of many concurrent attaches, the losers
            # fail here without paying for the passphrase KDF.
            self._claim(disk, method=method, read_only=read_only, run_dir=run_dir,
                        sock=str(run_dir / NBD_SOCKET), control_socket=run_dir / CONTROL_SOCKET)
            crashpoint("disk-attach.after-claim")
            try:
                _wait_for_container_lock(self.path_of(disk), exclusive=not read_only,
                                         name=name)
                dk = self._unwrap(disk, header)
                ensure_private_dir(self.home.run_dir)
                ensure_private_dir(run_dir)
                _, nbdkit_pid = self._start_nbdkit(name, disk, dk, run_dir,
                                                   read_only=read_only,
                                                   unix_socket=run_dir / NBD_SOCKET,
                                                   threads=threads)
                if dk is not None:
                    dk.wipe()
                crashpoint("disk-attach.after-nbdkit")
                self._update(disk["id"], nbdkit_pid=nbdkit_pid)
                helper_pid = None
                if method == ATTACH_NBD:
                    device = self._connect_nbd(name, disk, run_dir, read_only)
                else:
                    device, helper_pid = self._connect_loop(name, disk, run_dir, read_only)
                crashpoint("disk-attach.after-device")
                self._update(disk["id"], state="attached", device=device, helper_pid=helper_pid,
                             owner_pid=None, owner_start=None)
            except BaseException:
                att = catalog.get_attachment(self.conn, disk["id"])
                try:
                    self._teardown(att, run_dir, clean=False)
                finally:
                    self._release(disk["id"])
                raise
        finally:
            if dk is not None:
                dk.wipe()
        return self.show(name)

    def detach(self, name: str) -> dict:
        """Detach an attached disk: refuse if mounted, else flush, disconnect, stop.

        Returns {"name", "device", "stale": bool}; a stale attachment is just
        cleaned."""
        _require_root("blockcrypt disk detach")
        disk = self.disk_row(name)
        att = catalog.get_attachment(self.conn, disk["id"])
        if att is not None and self.cleanup_stale(disk["id"]):
            return {"name": name, "device": att["device"], "stale": True}
        with db.write_txn(self.conn):
            att = catalog.get_attachment(self.conn, disk["id"])
            if att is None:
                raise errors.DiskNotAttached(name=name)
            if att["state"] != "attached" or att["method"] == SERVE:
                raise self.in_use_error(name, att)
            device = att["device"]
            self._check_not_busy(name, device)
            catalog.update_attachment(self.conn, disk["id"], state="detaching",
                                      owner_pid=self._pid, owner_start=self._start)
        crashpoint("disk-detach.after-mark")
        try:
            self._teardown(att, Path(att["run_dir"]), clean=True)
        except BaseException:
            self._update(disk["id"], state="attached", owner_pid=None, owner_start=None)
            raise
        crashpoint("disk-detach.after-teardown")
        self._release(disk["id"])
        return {"name": name, "device": device, "stale": False}

    # -- copy (the supported conversion path) --------------------------------------
    def copy(self, src_name: str, dst_name: str, *, progress: bool = False) -> dict:
        """Copy the files of SRC's file system onto DST's, both disks detached.

        This is how data moves between an unencrypted and an encrypted disk (or
        between CMKs): blockcrypt never converts a disk in place.  SRC is
        attached read-only and mounted read-only; DST is attached read-write and
        gets a file system of SRC's type if it has none.  ``rsync -aHAX``
        copies (hard links, ACLs, extended attributes), with a progress display
        when ``progress``.  Both are unmounted and detached afterwards, also
        on failure.  Refused (DiskAttached) if either disk is in use.
        """
        _require_root("blockcrypt disk copy")
        _require_tools("rsync", "blkid", "mount", "umount")
        if src_name == dst_name:
            raise errors.InvalidInput(detail=f"disk copy needs two different disks, got "
                                             f"{src_name!r} twice")
        self.recover_files()
        disks = [self.disk_row(src_name), self.disk_row(dst_name)]
        for d in disks:
            self._require_free(d)
        ensure_private_dir(self.home.run_dir)
        work = Path(tempfile.mkdtemp(prefix="copy-", dir=self.home.run_dir))
        attached: list[str] = []
        mounted: list[Path] = []
        try:
            src_dev = self.attach(src_name, read_only=True)["device"]
            attached.append(src_name)
            dst_dev = self.attach(dst_name)["device"]
            attached.append(dst_name)
            fstype = _fs_type(src_dev)
            if fstype is None:
                raise errors.InvalidInput(detail=f"disk {src_name!r} has no file system to "
                                                 "copy (nothing recognised by blkid)")
            dst_type = _fs_type(dst_dev)
            if dst_type is None:
                proc.run(proc.mkfs_argv(fstype, dst_dev), timeout_s=None)
            for dev, sub, ro in ((src_dev, "src", True), (dst_dev, "dst", False)):
                mnt = work / sub
                mnt.mkdir()
                proc.run(proc.mount_argv(dev, mnt, read_only=ro))
                mounted.append(mnt)
            argv = proc.rsync_argv(mounted[0], mounted[1], progress=progress)
            if progress:
                proc.run_visible(argv)
            else:
                proc.run(argv, timeout_s=None)
        finally:
            problems = []
            for mnt in reversed(mounted):
                cp = proc.run(proc.umount_argv(mnt), check=False)
                if cp.returncode != 0:
                    problems.append(f"umount {mnt}: {cp.stderr.decode(errors='replace')}")
            for name in reversed(attached):
                try:
                    self.detach(name)
                except errors.BlockcryptError as e:
                    problems.append(e.message)
            if not problems:
                shutil.rmtree(work, ignore_errors=True)
        if problems:
            raise errors.EnvironmentProblem(detail="disk copy finished but cleaning up "
                                            "failed: " + "; ".join(problems))
        return {"source": src_name, "destination": dst_name, "file_system": fstype,
                "made_file_system": dst_type is None}

    @staticmethod
    def _check_not_busy(name: str, device: str | None) -> None:
        if not device:
            return
        mounts = proc.device_mounts(device)
        if mounts:
            dev, mountpoint = mounts[0]
            raise errors.DeviceBusy(name=name, mountpoint=mountpoint)
        holders = proc.device_holders(device)
        if holders:
            raise errors.DeviceBusy(
                f"disk {name!r} ({device}) is in use by /dev/{holders[0]}; remove that "
                f"device first (e.g. `dmsetup remove {holders[0]}`)",
                name=name, mountpoint=f"/dev/{holders[0]}")
        if Path(device).exists() and proc.open_exclusively_busy(device):
            raise errors.DeviceBusy(
                f"disk {name!r} ({device}) is in use (mounted in another mount namespace "
                f"or claimed by another program); release it and retry",
                name=name, mountpoint=device)

    # -- serve ---------------------------------------------------------------------
    def serve(self, name: str, *, unix_path: Path | None = None, tcp: str | None = None,
              read_only: bool = False, tls_psk: Path | None = None,
              tls_certificates: Path | None = None, no_tls: bool = False,
              on_ready: Callable[[dict], None] | None = None,
              threads: int | None = None) -> int:
        """Serve the disk with nbdkit in the foreground until SIGINT/SIGTERM/SIGHUP.

        While it runs the disk has a 'serve' attachment row, so it cannot be
        attached, served twice or deleted.  Returns 0 once stopped by a signal;
        ServerError if nbdkit fails to start or exits by itself with an error.
        ``threads``: nbdkit worker threads per connection (default
        :data:`proc.NBDKIT_THREADS`).
        """
        _check_threads(threads)
        if (unix_path is None) == (tcp is None):
            raise errors.InvalidInput(detail="give exactly one of --unix PATH and --tcp HOST:PORT")
        endpoint = parse_tcp_endpoint(tcp) if tcp is not None else None
        tls = serve_tls_mode(tcp=endpoint, tls_psk=tls_psk, tls_certificates=tls_certificates,
                             no_tls=no_tls)
        if unix_path is not None:
            unix_path = Path(os.path.abspath(unix_path))
            _check_socket_path(unix_path)
            if not unix_path.parent.is_dir():
                raise errors.InvalidInput(detail=f"--unix {unix_path}: no such directory "
                                                 f"{unix_path.parent}")
            if unix_path.exists() or unix_path.is_symlink():
                if not _is_dead_socket(unix_path):
                    raise errors.InvalidInput(detail=f"--unix {unix_path} exists; remove it or "
                                                     "choose another path")
                unix_path.unlink()
        self.recover_files()
        disk = self.disk_row(name)
        self._require_free(disk)
        run_dir = self.run_dir_of(name)
        _check_socket_path(run_dir / CONTROL_SOCKET)
        _require_tools("nbdkit")
        header = self._read_header(disk)
        if header.encrypted:
            self.keys.check_usable(header.cmk_id)
        where = str(unix_path) if unix_path is not None else f"tcp:{tcp}"
        dk = None
        stop = {"signal": None}
        p: subprocess.Popen | None = None

        def on_signal(signo, _frame):
            stop["signal"] = signo
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM,
                                                         signal.SIGHUP)}
        try:
            self._claim(disk, method=SERVE, read_only=read_only, run_dir=run_dir, sock=where,
                        control_socket=run_dir / CONTROL_SOCKET)
            try:
                dk = self._unwrap(disk, header)
                # Serving can last days: close the key store now (its cached KEK is
                # wiped) and keep only a catalog connection.
                self.conn = db.connect(self.home.db_path)
                self.keys.close()
                ensure_private_dir(self.home.run_dir)
                ensure_private_dir(run_dir)
                try:
                    p, _ = self._start_nbdkit(name, disk, dk, run_dir, read_only=read_only,
                                           unix_socket=unix_path, tcp=endpoint, tls=tls,
                                           tls_psk=tls_psk, tls_certificates=tls_certificates,
                                           serve=True, threads=threads)
                except errors.ServerError:
                    if stop["signal"] is not None:
                        return 0  # interrupted while starting
                    raise
                if dk is not None:
                    dk.wipe()
                if unix_path is not None:
                    os.chmod(unix_path, 0o600)
                self._update(disk["id"], state="attached", nbdkit_pid=p.pid)
                if on_ready is not None:
                    on_ready({"name": name, "endpoint": where, "read_only": read_only,
                              "tls": tls != "off", "nbdkit_pid": p.pid,
                              "export_name": name,
                              "control_socket": str(run_dir / CONTROL_SOCKET)})
                if stop["signal"] is not None and p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                rc = p.wait()
                if stop["signal"] is None and rc != 0:
                    raise errors.ServerError(name=name, reason=f"nbdkit exited with status {rc}")
                return 0
            finally:
                att = catalog.get_attachment(self.conn, disk["id"])
                try:
                    self._teardown(att, run_dir, clean=False)
                    if unix_path is not None:
                        _remove_socket(unix_path)
                finally:
                    self._release(disk["id"])
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if dk is not None:
                dk.wipe()


def publish(tmp: Path, final: Path) -> bool:
    """Rename a committed container from its temp name to its final name and
    fsync the directory; False if a concurrent delete took it first (see doom)."""
    try:
        os.rename(tmp, final)
    except FileNotFoundError:
        return False
    fsync_dir(final.parent)
    return True


def doom(final: Path) -> Path:
    """Move a container out of the way of its delete (inside the delete's write
    transaction): ``<id>.bcd`` -> ``<id>.bcd.deleted``.  A create commits its row
    before it renames its temp file into place, so if ``<id>.bcd`` is not there
    yet, its committed temp file is taken instead (the creator's rename then
    finds nothing and leaves it).  Returns the ``.deleted`` path to unlink
    after the commit."""
    doomed = final.with_name(final.name + _DELETED_MARK)
    for _ in range(100):
        try:
            os.rename(final, doomed)
            return doomed
        except FileNotFoundError:
            pass
        temps = sorted(final.parent.glob(final.name + _TMP_MARK + "*"))
        if not temps:
            return doomed       # no file at all (left to the operator): drop the row
        try:
            os.rename(temps[0], doomed)
            return doomed
        except FileNotFoundError:
            continue            # the creator renamed it just now: take <id>.bcd
    raise errors.StateError(detail=f"{final.name} keeps changing; retry the delete")


def recover_dir(conn: sqlite3.Connection, d: Path, table: str) -> list[str]:
    """Finish or undo interrupted creates/deletes of the containers in d whose
    rows live in table (``disks`` or ``snapshots``); see the module doc.
    Runs under the database write lock; returns what it did."""
    assert table in ("disks", "snapshots")   # interpolated into SQL below
    try:
        pending = [n for n in os.listdir(d) if _TMP_MARK in n or n.endswith(_DELETED_MARK)]
    except FileNotFoundError:
        return []
    if not pending:
        return []
    actions = []
    with db.write_txn(conn):
        for fname in pending:
            path = d / fname
            if not path.exists():
                continue  # someone else recovered it meanwhile
            obj_id = fname.split(".", 1)[0]
            final = d / f"{obj_id}.bcd"
            has_row = conn.execute(f"SELECT 1 FROM {table} WHERE id = ?",
                                   (obj_id,)).fetchone() is not None
            if _TMP_MARK in fname:
                owner = fname.split(_TMP_MARK, 1)[1].split("-")
                try:
                    pid, start = int(owner[0]), int(owner[1])
                except (IndexError, ValueError):
                    continue  # not ours: leave it
                if proc.process_alive(pid, start):
                    continue  # a create in progress
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"completed creation of {final.name}")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed unfinished {fname}")
                else:  # row and file both exist: a reset/reinit that never swapped
                    path.unlink()
                    actions.append(f"removed unfinished replacement {fname}")
            else:
                if has_row and not final.exists():
                    os.rename(path, final)
                    actions.append(f"restored {final.name} (delete did not commit)")
                elif not has_row:
                    path.unlink()
                    actions.append(f"removed deleted {fname}")
        fsync_dir(d)
    return actions


def check_header_matches(header: container.Header, row: sqlite3.Row, path: Path) -> None:
    """Refuse a container whose identity or encryption contradicts its catalog row.

    The header checksum is not a MAC (docs/FORMAT.md): someone with write access
    could rewrite an encrypted disk's header as unencrypted, and a server would
    then store every later write in plaintext.  The fields of an encrypted
    header that matter to the key (lineage, CMK, geometry) are bound by the
    key context, so tampering with them makes unwrapping fail; the id and the
    encrypted flag are checked here, against the catalog.
    """
    if header.uid_hex != row["id"]:
        raise errors.FormatError(path=str(path), reason=f"its id {header.uid_hex} is not the "
                                 f"catalog's {row['id']} for {row['name']!r}")
    if header.encrypted != bool(row["encrypted"]):
        raise errors.FormatError(
            path=str(path), reason=f"its header says {'en' if header.encrypted else 'un'}"
            f"crypted but the catalog records {row['name']!r} as "
            f"{'en' if row['encrypted'] else 'un'}crypted; the header was tampered with, so "
            "the file is not used")


def _wait_for_container_lock(path: Path, *, exclusive: bool, name: str,
                             timeout_s: float = LOCK_WAIT_TIMEOUT_S) -> None:
    """Wait until the server could take the container's whole-file flock.

    ``snapshot create`` copies a detached disk under a shared flock; the
    plugin takes its lock without waiting and would fail to start.  Called
    after the attachment is claimed: a snapshot that locks the file later sees
    the claim and backs off (blockcrypt.services.snapshots), so the window in which
    both could proceed is the instant between this check and nbdkit's own.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise errors.StateError(
                        detail=f"disk {name!r} is busy (a snapshot is being copied, or "
                               "another program holds its file); retry `blockcrypt disk "
                               f"attach {name}` later") from None
                time.sleep(0.1)
    finally:
        os.close(fd)


def _fs_type(device: str) -> str | None:
    """The file system type on device (blkid), None if it has none."""
    cp = proc.run(proc.blkid_type_argv(device), check=False)
    if cp.returncode == 2:          # nothing found
        return None
    if cp.returncode != 0:
        raise errors.CommandFailed(cmd=" ".join(proc.blkid_type_argv(device)),
                                   rc=cp.returncode,
                                   stderr=cp.stderr.decode(errors="replace").strip())
    return cp.stdout.decode().strip() or None


def _tighten(run_dir: Path) -> None:
    """Make the files nbdkit/nbdfuse created in run_dir (pid files, sockets:
    they use umask 022) 0600 like every other file of the home."""
    for entry in os.scandir(run_dir):
        if not entry.is_dir(follow_symlinks=False) and not entry.is_symlink():
            os.chmod(entry.path, 0o600)


def _is_dead_socket(path: Path) -> bool:
    """A socket file nobody listens on (left by a killed server)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    s = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    try:
        s.connect(str(path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


def _remove_socket(path: Path) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except OSError:
        pass
