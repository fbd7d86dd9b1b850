"""``disk serve``: one disk over NBD in the foreground, on a Unix socket or TCP.

Owns: the endpoint and TLS rules (:func:`parse_tcp_endpoint`,
:func:`serve_tls_mode`): TCP requires TLS, with certificates nbdkit also requires
and verifies a client certificate signed by the directory's CA
(``--tls-verify-peer``); the TLS-PSK file and the server key must be private to
their owner; plain TCP only with ``--insecure-plaintext-tcp`` on loopback, with a
warning.  And the serve loop (:func:`serve`).  The disk is claimed like an attach (method
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

from .. import errors, names
from ..storage import catalog, db
from ..storage.home import check_secret_mode, ensure_private_dir
from ..storage.rbd_image import held_error
from . import runtime
from .runtime import CONTROL_SOCKET, SERVE

if TYPE_CHECKING:
    from .disks import DiskService


PLAINTEXT_TCP_OPTION = "--insecure-plaintext-tcp"
# nbdkit's --tls-certificates layout (nbdkit-tls(1)).
TLS_CA_CERT, TLS_SERVER_CERT, TLS_SERVER_KEY = "ca-cert.pem", "server-cert.pem", "server-key.pem"


def parse_tcp_endpoint(text: str) -> tuple[str, int]:
    """'127.0.0.1:10809' or '[::1]:10809' -> (host, port).  Host must be an IP address;
    the port ASCII digits 1-65535."""
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
    if not names.is_ascii_digits(port_text, max_chars=5) or not 1 <= int(port_text) <= 65535:
        raise errors.InvalidInput(detail=f"--tcp {text!r}: port must be 1-65535 (ASCII digits)")
    return host, int(port_text)


def _check_secret_file(path: Path, what: str, option: str) -> None:
    """The file exists and only its owner may access it (InsecureFile otherwise)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise errors.InvalidInput(detail=f"{option}: cannot read {what} {path}: "
                                         f"{e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise errors.InvalidInput(detail=f"{option}: {what} {path} is not a regular file")
    check_secret_mode(st, path, what)


def check_tls_certificates(directory: Path) -> None:
    """nbdkit's certificate directory: CA, server certificate and a private server key.
    The CA also verifies every client (``--tls-verify-peer``)."""
    option = f"--tls-certificates {directory}"
    if not Path(directory).is_dir():
        raise errors.InvalidInput(detail=f"{option}: no such directory")
    missing = [f for f in (TLS_CA_CERT, TLS_SERVER_CERT, TLS_SERVER_KEY)
               if not (Path(directory) / f).is_file()]
    if missing:
        raise errors.InvalidInput(
            detail=f"{option}: missing {', '.join(missing)}; the directory needs "
                   f"{TLS_CA_CERT} (the CA that signs the server's and every allowed "
                   f"client's certificate), {TLS_SERVER_CERT} and {TLS_SERVER_KEY} "
                   "(see README, 'Serving over the network')")
    _check_secret_file(Path(directory) / TLS_SERVER_KEY, "TLS server key", option)


def serve_tls_mode(*, tcp: tuple[str, int] | None, tls_psk: Path | None,
                   tls_certificates: Path | None, insecure_plaintext_tcp: bool) -> str:
    """nbdkit's --tls mode for a serve request; raise InvalidInput (or InsecureFile)
    if the combination is refused.  TCP requires TLS unless --insecure-plaintext-tcp
    on loopback; the PSK file and the server key must be private to their owner."""
    if tls_psk is not None and tls_certificates is not None:
        raise errors.InvalidInput(detail="give only one of --tls-psk and --tls-certificates")
    if insecure_plaintext_tcp and (tls_psk is not None or tls_certificates is not None):
        raise errors.InvalidInput(detail=f"{PLAINTEXT_TCP_OPTION} contradicts "
                                         "--tls-psk/--tls-certificates")
    if tls_psk is not None:
        if not Path(tls_psk).exists():
            raise errors.InvalidInput(detail=f"--tls-psk {tls_psk}: no such file")
        _check_secret_file(Path(tls_psk), "TLS-PSK file", f"--tls-psk {tls_psk}")
        return "require"
    if tls_certificates is not None:
        check_tls_certificates(Path(tls_certificates))
        return "require"
    if tcp is None:
        if insecure_plaintext_tcp:
            raise errors.InvalidInput(detail=f"{PLAINTEXT_TCP_OPTION} only applies to --tcp")
        return "off"  # a Unix socket: access is controlled by file permissions
    if not insecure_plaintext_tcp:
        raise errors.InvalidInput(
            detail="serving over TCP requires TLS: pass --tls-psk FILE or "
                   "--tls-certificates DIR; local clients should use --unix PATH in a "
                   f"directory only you can enter (mode 0700); {PLAINTEXT_TCP_OPTION} "
                   "(loopback only) gives every local account the decrypted disk")
    if not ipaddress.ip_address(tcp[0]).is_loopback:
        raise errors.InvalidInput(
            detail=f"{PLAINTEXT_TCP_OPTION} is only allowed on loopback addresses "
                   f"(127.0.0.0/8, ::1), not {tcp[0]}: anyone on the network could read and "
                   "write the disk; use --tls-psk FILE or --tls-certificates DIR")
    return "off"


def plaintext_tcp_warning(name: str, tcp: str) -> str:
    """The stderr warning of ``disk serve --insecure-plaintext-tcp``."""
    return (f"warning: disk {name} is served WITHOUT TLS on tcp:{tcp}: every account on "
            "this machine can connect and read and write the decrypted disk. For local "
            "clients use --unix PATH in a directory only you can enter (mode 0700); for "
            "remote ones --tls-certificates DIR or --tls-psk FILE")


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
          tls_certificates: Path | None = None, insecure_plaintext_tcp: bool = False,
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
                         insecure_plaintext_tcp=insecure_plaintext_tcp)
    if unix_path is not None:
        unix_path = _check_unix_path(unix_path)
    disks.recover_files()
    disk = disks.disk_row(name)
    attachments.require_free(disk)
    run_dir = disks.run_dir_of(name)
    runtime.check_socket_path(run_dir / CONTROL_SOCKET)
    runtime.require_tools("nbdkit")
    header = disks.read_header(disk)
    holder = None if read_only else disks.holder(disk)
    if holder is not None:
        raise held_error(name, holder)
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
            # wiped; the passphrase was wiped when the KEK was derived) and keep
            # only a catalog connection.
            disks.keys.forget_secrets()
            disks.conn = db.connect(disks.home.db_path)
            disks.keys.close()
            ensure_private_dir(disks.home.run_dir)
            ensure_private_dir(run_dir)
            try:
                p, _ = runtime.start_nbdkit(
                    name, disks.path_of(disk), discard=bool(disk["discard"]), dk=dk,
                    run_dir=run_dir, read_only=read_only, unix_socket=unix_path, tcp=endpoint,
                    tls=tls, tls_psk=tls_psk, tls_certificates=tls_certificates, serve=True,
                    threads=threads, volume_params=disks.volume_params(disk))
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
