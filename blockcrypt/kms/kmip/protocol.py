"""Every KMIP request blockcrypt makes, at KMIP 1.4 over mutually authenticated TLS.

This is the one module that speaks KMIP (through PyKMIP's client, pinned to
0.11.0 in pyproject.toml because this module relies on how it encodes requests).
Rules found by running PyKMIP (../shared/KMS.md):

- PyKMIP's high-level ``encrypt``/``decrypt`` never send the GCM additional
  authenticated data and drop the returned tag, and at its default protocol
  version (1.2) the AAD and tag fields are silently not encoded at all.  So the
  protocol version is pinned to :data:`KMIP_VERSION` (1.4, the first with
  Authenticated Encryption Additional Data and Tag) and the Encrypt / Decrypt
  request payloads are built here, with AES-GCM, a 16-byte tag, an IV chosen
  here (12 random bytes) and the AAD.  A response without a 16-byte tag, or with
  a ciphertext of the wrong length, is refused (:class:`KmipNoBinding`): nothing
  falls back to a mode that does not bind the context.
- PyKMIP's client checks the server's certificate chain against the CA file but
  not its name: :meth:`Connection.open` checks that the certificate names the
  configured host (subjectAltName IP address or DNS name).
- PyKMIP logs whole messages in hex at DEBUG level (they hold data keys): its
  loggers are silenced here for the life of the process.
- Without ``config_file`` the client reads ``~/.pykmip/pykmip.conf`` and
  ``/etc/pykmip``: it is given ``/dev/null`` so only blockcrypt's settings count.

Failures come out as :class:`KmipRefused` (the server answered with a result
status: reason and message as sent) or :class:`KmipUnreachable` (no TLS
connection, or it broke); :mod:`.backend` turns them into blockcrypt errors that
name the key, the provider and the server.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import threading

from .config import KmipConfig

TIMEOUT_S = 10
GCM_TAG_BYTES = 16
GCM_IV_BYTES = 12

_quiet = logging.getLogger("kmip")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False
_quiet.setLevel(logging.CRITICAL)


class KmipRefused(Exception):
    """The server answered with a failure (``reason`` is the ResultReason name)."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class KmipUnreachable(Exception):
    """No usable TLS connection to the server."""


class KmipNoBinding(Exception):
    """The server's answer shows it did not authenticate the AAD (no tag, wrong sizes)."""


def _kmip():
    from kmip.core import enums
    return enums


KMIP_VERSION_NAME = "1.4"


def _version():
    return _kmip().KMIPVersion.KMIP_1_4


class Connection:
    """One TLS connection to a KMIP server as this host, opened on first use and reused
    (re-opened after a fork or a broken connection); one request at a time."""

    def __init__(self, cfg: KmipConfig):
        self.cfg = cfg
        self._client = None
        self._pid = None
        self._lock = threading.Lock()
        self.peer_subject: str | None = None

    # -- connection -------------------------------------------------------------------
    def _open(self):
        from kmip.pie.client import ProxyKmipClient
        c = ProxyKmipClient(hostname=self.cfg.host, port=self.cfg.port, cert=self.cfg.cert,
                            key=self.cfg.key, ca=self.cfg.ca, config_file=os.devnull,
                            kmip_version=_version())
        c.proxy.timeout = TIMEOUT_S
        try:
            c.open()
        except Exception as e:  # noqa: BLE001 - every way a connection fails, reported
            raise KmipUnreachable(_describe(e)) from None
        try:
            self.peer_subject = _check_peer(c.proxy.socket, self.cfg.host)
        except BaseException:
            _close_quietly(c)
            raise
        return c

    def _get(self):
        if self._client is None or self._pid != os.getpid():
            self._client = None       # a parent's TLS session is never used by a child
            self._client = self._open()
            self._pid = os.getpid()
        return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                _close_quietly(self._client)
            self._client = None

    def _call(self, fn, *, retry: bool):
        """``fn(client)`` with the server's failure as KmipRefused; a broken connection
        is re-opened and, for idempotent requests (``retry``), the request sent again."""
        from kmip.core import exceptions as core_exc
        from kmip.pie import exceptions as pie_exc
        with self._lock:
            for attempt in (1, 2):
                fresh = self._client is None or self._pid != os.getpid()
                client = self._get()
                try:
                    return fn(client)
                except (pie_exc.KmipOperationFailure, core_exc.OperationFailure) as e:
                    message = getattr(e, "message", None) or str(e)
                    raise KmipRefused(getattr(e.reason, "name", str(e.reason)),
                                      str(message)) from None
                except Exception as e:  # noqa: BLE001 - the connection broke
                    _close_quietly(client)
                    self._client = None
                    if attempt == 2 or fresh or not retry:
                        raise KmipUnreachable(_describe(e)) from None
        raise AssertionError("unreachable")

    # -- requests -----------------------------------------------------------------------
    def server_info(self) -> dict:
        """The server's vendor identification and the protocol versions it speaks."""
        enums = _kmip()

        def ask(c):
            versions = c.proxy.discover_versions().protocol_versions or []
            q = c.proxy.query(query_functions=[enums.QueryFunction.QUERY_SERVER_INFORMATION])
            return {"vendor": q.vendor_identification or "",
                    "protocol_versions": [f"{v.major}.{v.minor}" for v in versions]}
        info = self._call(ask, retry=True)
        info["peer_subject"] = self.peer_subject
        return info

    def create_aes256(self, name: str) -> str:
        """A new AES-256 key object usable only to encrypt and decrypt, activated; its uid."""
        enums = _kmip()

        def make(c):
            return c.create(enums.CryptographicAlgorithm.AES, 256, name=name,
                            cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                                                      enums.CryptographicUsageMask.DECRYPT])
        uid = self._call(make, retry=False)
        self._call(lambda c: c.activate(uid), retry=True)
        return uid

    def state(self, uid: str) -> str:
        """The object's KMIP State name (ACTIVE, DEACTIVATED, COMPROMISED, ...)."""
        def get(c):
            _, attrs = c.get_attributes(uid, ["State"])
            for a in attrs:
                if a.attribute_name.value == "State":
                    return a.attribute_value.value.name
            return "UNKNOWN"
        return self._call(get, retry=True)

    def revoke(self, uid: str) -> None:
        enums = _kmip()
        self._call(lambda c: c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid,
                                      "blockcrypt: key destroyed"), retry=True)

    def destroy(self, uid: str) -> None:
        self._call(lambda c: c.destroy(uid), retry=True)

    def _gcm(self):
        from kmip.core.attributes import CryptographicParameters
        enums = _kmip()
        return CryptographicParameters(cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
                                       block_cipher_mode=enums.BlockCipherMode.GCM,
                                       tag_length=GCM_TAG_BYTES)

    def encrypt_gcm(self, uid: str, iv: bytes, data: bytes, aad: bytes) -> tuple[bytes, bytes]:
        """(ciphertext, tag) of AES-GCM on the server; KmipNoBinding if the answer lacks a
        16-byte tag or changed the length."""
        from kmip.core.messages import payloads
        enums = _kmip()
        if len(iv) != GCM_IV_BYTES:
            raise ValueError("GCM IV must be 12 bytes")
        payload = payloads.EncryptRequestPayload(
            unique_identifier=uid, cryptographic_parameters=self._gcm(), data=data,
            iv_counter_nonce=iv, auth_additional_data=aad)
        r = self._call(lambda c: c.proxy.send_request_payload(enums.Operation.ENCRYPT, payload),
                       retry=True)
        tag = r.auth_tag
        if tag is None or len(tag) != GCM_TAG_BYTES or len(r.data or b"") != len(data):
            raise KmipNoBinding("answered an AES-GCM Encrypt without a 16-byte authentication "
                                "tag (it does not support KMIP 1.4 authenticated encryption)")
        if r.iv_counter_nonce not in (None, iv):
            raise KmipNoBinding("used another IV than the one blockcrypt chose")
        return r.data, tag

    def decrypt_gcm(self, uid: str, iv: bytes, ct: bytes, tag: bytes, aad: bytes) -> bytes:
        """The plaintext; KmipRefused if the server refuses (a wrong tag or AAD included)."""
        from kmip.core.messages import payloads
        enums = _kmip()
        payload = payloads.DecryptRequestPayload(
            unique_identifier=uid, cryptographic_parameters=self._gcm(), data=ct,
            iv_counter_nonce=iv, auth_additional_data=aad, auth_tag=tag)
        r = self._call(lambda c: c.proxy.send_request_payload(enums.Operation.DECRYPT, payload),
                       retry=True)
        return r.data or b""


def _close_quietly(c) -> None:
    try:
        c.close()
    except Exception:  # noqa: BLE001 - already broken
        pass


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_peer(sock, host: str) -> str:
    """The server certificate's subject, after checking it names ``host`` (IP or DNS
    subjectAltName); KmipUnreachable otherwise."""
    from cryptography import x509
    der = sock.getpeercert(binary_form=True) if sock is not None else None
    if not der:
        raise KmipUnreachable("the server presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    ips = [str(i) for i in san.get_values_for_type(x509.IPAddress)] if san else []
    names = [n.lower() for n in san.get_values_for_type(x509.DNSName)] if san else []
    try:
        ok = str(ipaddress.ip_address(host)) in ips
    except ValueError:
        h = host.lower().rstrip(".")
        ok = h in names or any(n.startswith("*.") and h.split(".", 1)[-1] == n[2:]
                               and h.count(".") == n.count(".") for n in names)
    if not ok:
        raise KmipUnreachable(f"the server's certificate is not for {host!r} (it names "
                              f"{', '.join(ips + names) or 'no subjectAltName'})")
    return cert.subject.rfc4514_string()
