"""A real PyKMIP server for the tests of the ``kmip`` key provider, with its PKI.

:func:`start_server` makes a CA, a server certificate (``127.0.0.1``, EKU
serverAuth) and the server's configuration under a temporary directory with the
``cryptography`` library, starts ``kmip.services.server`` on 127.0.0.1 on a free
port, and waits until it accepts a TLS connection.  :meth:`KmipServer.client`
makes a client certificate (EKU clientAuth) whose subject CN is the identity
the server knows the host by: PyKMIP makes the CN that created a key its owner,
and under its default policy only the owner may use it (../shared/KMS.md).  The
client key file is written with mode 0600, as blockcrypt requires.

:meth:`KmipServer.decrypt_count` counts the Decrypt operations the server
processed (its log), so a test can tell how many unwraps an attach made.
PyKMIP is a test double: it keeps keys in plain SQLite.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from support.prereq import require
from support.wait import wait_for

STOP_TIMEOUT_S = 20.0
START_TIMEOUT_S = 30.0


def _import_crypto():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write_key(path: Path, key) -> None:
    _, _, serialization, *_ = _import_crypto()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert) -> None:
    _, _, serialization, *_ = _import_crypto()
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class ClientIdentity:
    """One host's client certificate and key for the KMIP server."""

    cn: str
    cert: Path
    key: Path


@dataclass
class KmipServer:
    base: Path
    host: str
    port: int
    ca: Path
    log: Path
    proc: subprocess.Popen | None = None
    _ca_key: object = field(default=None, repr=False)
    _ca_cert: object = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client(self, name: str, cn: str | None = None) -> ClientIdentity:
        """A client certificate (CN ``cn``, default ``name``) signed by the test CA,
        written as ``<name>.crt`` / ``<name>.key`` (0600)."""
        x509, hashes, _, ec, eku, oid = _import_crypto()
        d = self.base / "clients"
        d.mkdir(exist_ok=True)
        cert_path, key_path = d / f"{name}.crt", d / f"{name}.key"
        if cert_path.exists():
            return ClientIdentity(cn=cn or name, cert=cert_path, key=key_path)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, cn or name)]))
                .issuer_name(self._ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([eku.CLIENT_AUTH]), critical=False)
                .sign(self._ca_key, hashes.SHA256()))
        _write_cert(cert_path, cert)
        _write_key(key_path, key)
        return ClientIdentity(cn=cn or name, cert=cert_path, key=key_path)

    def provider_args(self, name: str, who: ClientIdentity, host: str | None = None,
                      port: int | None = None) -> list[str]:
        """The `blockcrypt provider add` arguments for this server as ``who``."""
        return ["provider", "add", name, "--type", "kmip", "--host", host or self.host,
                "--port", str(port or self.port), "--ca", str(self.ca), "--cert",
                str(who.cert), "--key", str(who.key)]

    def provider_options(self, who: ClientIdentity) -> dict:
        return {"host": self.host, "port": self.port, "ca": str(self.ca),
                "cert": str(who.cert), "key": str(who.key)}

    def admin(self, who: ClientIdentity):
        """A PyKMIP client as ``who`` (to change keys behind blockcrypt's back)."""
        from kmip.core import enums
        from kmip.pie.client import ProxyKmipClient
        c = ProxyKmipClient(hostname=self.host, port=self.port, cert=str(who.cert),
                            key=str(who.key), ca=str(self.ca), config_file=os.devnull,
                            kmip_version=enums.KMIPVersion.KMIP_1_4)
        c.open()
        return c

    def decrypt_count(self) -> int:
        """Decrypt operations the server has processed so far."""
        return self.log.read_text(errors="replace").count("Processing operation: Decrypt")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGINT stops it in ~2 s; SIGTERM only sets a flag checked every 10 s.
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_ca(base: Path):
    x509, hashes, _, ec, eku, oid = _import_crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(oid.COMMON_NAME, "blockcrypt test KMIP CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write_cert(base / "ca.crt", cert)
    return key, cert


def _server_cert(base: Path, ca_key, ca_cert) -> None:
    x509, hashes, _, ec, eku, oid = _import_crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(oid.COMMON_NAME, "localhost")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_cert(base / "server.crt", cert)
    _write_key(base / "server.key", key)


def start_server(base: Path) -> KmipServer:
    """A PyKMIP server on 127.0.0.1 with a fresh PKI and database under ``base``."""
    try:
        import kmip  # noqa: F401
    except ImportError:
        require(False, "PyKMIP is not installed (pip install -e '.[test]')")
    base.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _make_ca(base)
    _server_cert(base, ca_key, ca_cert)
    (base / "policies").mkdir(exist_ok=True)
    port = _free_port()
    conf = base / "server.conf"
    # ECDHE suites first: PyKMIP's default first choice has no forward secrecy.
    conf.write_text(
        "[server]\nhostname=127.0.0.1\n"
        f"port={port}\ncertificate_path={base / 'server.crt'}\nkey_path={base / 'server.key'}\n"
        f"ca_path={base / 'ca.crt'}\nauth_suite=TLS1.2\npolicy_path={base / 'policies'}\n"
        "enable_tls_client_auth=True\nlogging_level=INFO\n"
        f"database_path={base / 'pykmip.db'}\n"
        "tls_cipher_suites=ECDHE-ECDSA-AES256-SHA384 ECDHE-ECDSA-AES128-SHA256\n")
    log = base / "server.log"
    srv = KmipServer(base=base, host="127.0.0.1", port=port, ca=base / "ca.crt", log=log,
                     _ca_key=ca_key, _ca_cert=ca_cert)
    srv.proc = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-m", "kmip.services.server.server", "-f", str(conf),
         "-l", str(log)], stdout=subprocess.DEVNULL, stderr=open(base / "stderr", "wb"),
        start_new_session=True)
    probe = srv.client("probe")

    def ready() -> bool:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"the PyKMIP server exited: {(base / 'stderr').read_text()}"
                               f"{log.read_text() if log.exists() else ''}")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(str(srv.ca))
        ctx.load_cert_chain(str(probe.cert), str(probe.key))
        try:
            with socket.create_connection((srv.host, port), timeout=2) as s:
                with ctx.wrap_socket(s):
                    return True
        except OSError:
            return False

    try:
        wait_for(ready, timeout_s=START_TIMEOUT_S, what="the PyKMIP server to accept TLS")
    except BaseException:
        srv.stop()
        raise
    return srv


class Relay:
    """A TCP relay to the server on a port of its own: a host configured with the relay's
    port loses its key manager when :attr:`cut` is set (connections are closed at once),
    the way a network partition looks to it."""

    def __init__(self, server: KmipServer):
        import threading
        self.server = server
        self.cut = False
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self._threads: list = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self) -> None:
        import threading
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if self.cut:
                conn.close()
                continue
            try:
                up = socket.create_connection((self.server.host, self.server.port), timeout=10)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()
