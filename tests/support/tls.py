"""Throwaway X.509 material for TLS tests, made with pyca/cryptography.

A :class:`CA` issues server and client certificates (ECDSA P-256, valid one day).
:func:`server_dir` writes nbdkit's ``--tls-certificates`` layout (ca-cert.pem,
server-cert.pem, server-key.pem); :func:`client_dir` writes libnbd's client layout
(ca-cert.pem, client-cert.pem, client-key.pem: ``nbds://...?tls-certificates=DIR``),
the same files Linux ``nbd-client -cacertfile/-certfile/-keyfile`` takes.  Private keys are written 0600.
"""
from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass
class Issued:
    """A certificate and its private key."""
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())


class CA:
    """A self-signed certificate authority."""

    def __init__(self, common_name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(self.key, hashes.SHA256()))

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(PEM)

    def crl_pem(self, *revoked: Issued) -> bytes:
        """A certificate revocation list naming ``revoked`` (nbdkit's ca-crl.pem)."""
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
             .last_update(_now() - datetime.timedelta(minutes=5))
             .next_update(_now() + datetime.timedelta(days=1)))
        for r in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(r.cert.serial_number)
                .revocation_date(_now() - datetime.timedelta(minutes=5)).build())
        return b.sign(self.key, hashes.SHA256()).public_bytes(PEM)

    def issue(self, common_name: str, *, server: bool, dns: tuple[str, ...] = (),
              ips: tuple[str, ...] = ()) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
             .issuer_name(self.name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(_now() - datetime.timedelta(hours=1))
             .not_valid_after(_now() + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                          False), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i))
                                                  for i in ips]
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Issued(b.sign(self.key, hashes.SHA256()), key)


def _write_key(path: Path, pem: bytes) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_bytes(pem)


def server_dir(directory: Path, ca: CA, server: Issued) -> Path:
    """nbdkit's --tls-certificates directory (0700)."""
    directory.mkdir(mode=0o700)
    (directory / "ca-cert.pem").write_bytes(ca.cert_pem())
    (directory / "server-cert.pem").write_bytes(server.cert_pem())
    _write_key(directory / "server-key.pem", server.key_pem())
    return directory


def client_dir(directory: Path, trusted_ca: CA, client: Issued | None) -> Path:
    """libnbd's client directory: the CA that signs the server, and (unless None)
    the client's certificate and key."""
    directory.mkdir(mode=0o700)
    (directory / "ca-cert.pem").write_bytes(trusted_ca.cert_pem())
    if client is not None:
        (directory / "client-cert.pem").write_bytes(client.cert_pem())
        _write_key(directory / "client-key.pem", client.key_pem())
    return directory
