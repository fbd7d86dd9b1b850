"""``disk serve``: one disk over NBD in the foreground, on a Unix socket or TCP.

Owns: the endpoint and TLS rules (:func:`parse_tcp_endpoint`,
:func:`serve_tls_mode`: TCP requires TLS unless ``--no-tls`` on loopback) and
the serve loop (:func:`serve`).  The disk is claimed like an attach (method
``serve``, :class:`~blockcrypt.services.attach.Attachments`), so it cannot be
attached, served twice or deleted meanwhile; nbdkit runs as this process's child
with ``--exit-with-parent`` until a signal, and the row is removed when it stops.
Starting nbdkit is :func:`blockcrypt.services.runtime.start_nbdkit`'s job.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import socket as socketlib
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import errors
from ..storage import catalog, db
from ..storage.home import ensure_private_dir
from . import runtime
from .runtime import CONTROL_SOCKET, SERVE

if TYPE_CHECKING:
    from .disks import DiskService


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


def _check_unix_path(unix_path: Path) -> Path:
    """The absolute --unix path, its stale socket removed; InvalidInput if unusable."""
    unix_path = Path(os.path.abspath(unix_path))
    runtime.check_socket_path(unix_path)
    if not unix_path.parent.is_dir():
        raise errors.InvalidInput(detail=f"--unix {unix_path}: no such directory "
                                         f"{unix_path.parent}")
    if unix_path.exists() or unix_path.is_symlink():
        if not _is_dead_socket(unix_path):
            raise errors.InvalidInput(detail=f"--unix {unix_path} exists; remove it or "
                                             "choose another path")
        unix_path.unlink()
    return unix_path


def serve(disks: DiskService, name: str, *, unix_path: Path | None = None,
          tcp: str | None = None, read_only: bool = False, tls_psk: Path | None = None,
          tls_certificates: Path | None = None, no_tls: bool = False,
          on_ready: Callable[[dict], None] | None = None, threads: int | None = None) -> int:
    """Serve the disk with nbdkit in the foreground until SIGINT/SIGTERM/SIGHUP.

    While it runs the disk has a 'serve' attachment row, so it cannot be
    attached, served twice or deleted.  Returns 0 once stopped by a signal;
    ServerError if nbdkit fails to start or exits by itself with an error.
    ``threads``: nbdkit worker threads per connection (default
    :data:`blockcrypt.system.commands.NBDKIT_THREADS`).
    """
    attachments = disks.attachments
    runtime.check_threads(threads)
    if (unix_path is None) == (tcp is None):
        raise errors.InvalidInput(detail="give exactly one of --unix PATH and --tcp HOST:PORT")
    endpoint = parse_tcp_endpoint(tcp) if tcp is not None else None
    tls = serve_tls_mode(tcp=endpoint, tls_psk=tls_psk, tls_certificates=tls_certificates,
                         no_tls=no_tls)
    if unix_path is not None:
        unix_path = _check_unix_path(unix_path)
    disks.recover_files()
    disk = disks.disk_row(name)
    attachments.require_free(disk)
    run_dir = disks.run_dir_of(name)
    runtime.check_socket_path(run_dir / CONTROL_SOCKET)
    runtime.require_tools("nbdkit")
    header = disks.read_header(disk)
    if header.encrypted:
        disks.keys.check_usable(header.cmk_id)
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
        attachments.claim(disk, method=SERVE, read_only=read_only, run_dir=run_dir, sock=where,
                          control_socket=run_dir / CONTROL_SOCKET)
        try:
            dk = disks.unwrap(disk, header)
            # Serving can last days: close the key store now (its cached KEK is
            # wiped) and keep only a catalog connection.
            disks.conn = db.connect(disks.home.db_path)
            disks.keys.close()
            ensure_private_dir(disks.home.run_dir)
            ensure_private_dir(run_dir)
            try:
                p, _ = runtime.start_nbdkit(
                    name, disks.path_of(disk), discard=bool(disk["discard"]), dk=dk,
                    run_dir=run_dir, read_only=read_only, unix_socket=unix_path, tcp=endpoint,
                    tls=tls, tls_psk=tls_psk, tls_certificates=tls_certificates, serve=True,
                    threads=threads)
            except errors.ServerError:
                if stop["signal"] is not None:
                    return 0  # interrupted while starting
                raise
            if dk is not None:
                dk.wipe()
            if unix_path is not None:
                os.chmod(unix_path, 0o600)
            attachments.update(disk["id"], state="attached", nbdkit_pid=p.pid)
            if on_ready is not None:
                on_ready({"name": name, "endpoint": where, "read_only": read_only,
                          "tls": tls != "off", "nbdkit_pid": p.pid, "export_name": name,
                          "control_socket": str(run_dir / CONTROL_SOCKET)})
            if stop["signal"] is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
            rc = p.wait()
            if stop["signal"] is None and rc != 0:
                raise errors.ServerError(name=name, reason=f"nbdkit exited with status {rc}")
            return 0
        finally:
            att = catalog.get_attachment(disks.conn, disk["id"])
            try:
                runtime.teardown(att, run_dir, clean=False)
                if unix_path is not None:
                    runtime.remove_socket(unix_path)
            finally:
                attachments.release(disk["id"])
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if dk is not None:
            dk.wipe()
