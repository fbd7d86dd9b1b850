"""Key versions of a ``kmip`` provider: AES-256 objects on a KMIP server, used for GCM there.

Each key version is one symmetric key object created on the server (Create, AES,
256 bits, usage mask Encrypt|Decrypt, Name ``blockcrypt:<key id>:v<version>``) and
activated at once; the catalog keeps the server's Unique Identifier
(``kms_key_versions.material`` holds its ASCII bytes).  Rotation creates a new
object; older objects stay Active and keep decrypting.

A data key is wrapped by the server with KMIP Encrypt, AES-GCM, a 12-byte IV chosen
here, a 16-byte tag, and the blob header + canonical encryption context as AAD
(:mod:`.protocol`); the blob has the envelope layout of algorithm 3, which carries
the server uid so that another host the server authorises can unwrap it
(:mod:`blockcrypt.kms.envelope`).  The CMK never reaches this host.

States: blockcrypt's catalog keeps Enabled / Disabled / PendingDeletion (and the
window); the server's object stays Active through them, because KMIP cannot
re-activate a revoked object and a cancelled deletion must leave a working key.
When the window has passed, each version is revoked (cessation of operation)
and destroyed on the server before the catalog forgets it.  A server object
revoked or destroyed behind blockcrypt's back is reported as
:class:`~blockcrypt.errors.KeyManagerStateError`; a host the server does not
authorise for the key gets :class:`~blockcrypt.errors.KeyManagerNotAuthorised`;
an unreachable server :class:`~blockcrypt.errors.ProviderUnavailable`.
"""
from __future__ import annotations

import os

from ... import errors
from ...crypto.secret import Secret
from .. import envelope
from ..backend import KeyBackend
from .config import KMIP, KmipConfig, check_key_file
from .protocol import Connection, KmipNoBinding, KmipRefused, KmipUnreachable

# ResultReason names (KMIP 1.4 §11.11) and what they mean for a key object.
NOT_FOUND = "ITEM_NOT_FOUND"
DENIED = "PERMISSION_DENIED"
PROBE_AAD = b"blockcrypt: does this server authenticate the additional data?"

STATE_WORDS = {"DEACTIVATED": "revoked (Deactivated)", "COMPROMISED": "revoked (Compromised)",
               "DESTROYED": "destroyed", "DESTROYED_COMPROMISED": "destroyed",
               "PRE_ACTIVE": "not activated (Pre-Active)"}


class KmipBackend(KeyBackend):
    """The server operations of one kmip provider."""

    type = KMIP
    algorithm = envelope.ALG_KMIP_AES256GCM_DK64
    needs_kek = False
    imports_material = False
    """Importing through the host would put the material on the host; a key manager
    imports it with its own tools (create_key refuses origin 'external' first)."""

    def __init__(self, name: str, config: KmipConfig):
        super().__init__(name)
        self.config = config
        self._conn = Connection(config)

    def new_import_key(self, key_id: str, oaep_hash: str, prepared) -> dict:
        raise no_import(self.name)

    def import_material(self, key_id: str, version: int, private_ref: bytes,
                        wrapped: bytes) -> tuple[bytes, bytes]:
        raise no_import(self.name)

    # -- errors --------------------------------------------------------------------------
    def _identity(self) -> str:
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID
            with open(self.config.cert, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            return str(cns[0].value) if cns else cert.subject.rfc4514_string()
        except (OSError, ValueError):
            return "?"

    def _unavailable(self, what: str, e: KmipUnreachable) -> errors.ProviderUnavailable:
        return errors.ProviderUnavailable(
            provider=self.name,
            reason=f"cannot reach the KMIP server {self.config.server} for {what} ({e}); check "
                   "that the server runs and this host reaches it, then run the command again")

    def _request(self, what: str, fn):
        check_key_file(self.name, self.config.key)
        try:
            return fn()
        except KmipUnreachable as e:
            raise self._unavailable(what, e) from None

    def _refusal(self, e: KmipRefused, key_id: str, version: int, uid: str,
                 operation: str) -> errors.BlockcryptError:
        """A server refusal about one key object, as the error that says what happened."""
        if e.reason == NOT_FOUND:
            return self._state_error(key_id, version, "destroyed or missing")
        if e.reason == DENIED and "Active state" in e.message:
            state = self._server_state(uid)
            return self._state_error(key_id, version, STATE_WORDS.get(state, state.lower()))
        if e.reason == DENIED:
            return errors.KeyManagerNotAuthorised(
                key_id=key_id, server=self.config.server, provider=self.name,
                identity=self._identity(), operation=operation)
        return errors.TokenOperationFailed(provider=self.name, operation=operation,
                                           reason=f"the KMIP server {self.config.server} "
                                                  f"answered {e}")

    def _server_state(self, uid: str) -> str:
        try:
            return self._conn.state(uid)
        except (KmipRefused, KmipUnreachable):
            return "NOT_ACTIVE"

    def _state_error(self, key_id: str, version: int, state: str) -> errors.KeyManagerStateError:
        return errors.KeyManagerStateError(
            key_id=key_id, version=version, state=state, server=self.config.server,
            provider=self.name,
            detail="data wrapped by that version cannot be unwrapped; disks already attached "
                   "keep serving until detached.  If this was not intended, ask the key "
                   "manager's administrator; to keep the data, copy it (while attached) to a "
                   "disk under another key")

    # -- KeyBackend ----------------------------------------------------------------------
    def check(self) -> None:
        """The server is reachable as this host, speaks KMIP 1.4 or later, and binds the
        AAD of AES-GCM (a probe key: encrypt, then decrypt with the wrong AAD must fail);
        ContextBindingUnsupported otherwise."""
        info = self._request("a check", self._conn.server_info)
        versions = [tuple(int(x) for x in v.split(".")) for v in info["protocol_versions"]]
        if versions and max(versions) < (1, 4):
            raise errors.ContextBindingUnsupported(
                provider=self.name, server=self.config.server,
                reason=f"speaks KMIP {', '.join(info['protocol_versions'])} only; "
                       "authenticated encryption with additional data needs KMIP 1.4")
        self._request("a check", self._probe)

    def _probe(self) -> None:
        uid = None
        try:
            uid = self._conn.create_aes256("blockcrypt:probe")
            iv = os.urandom(12)
            ct, tag = self._conn.encrypt_gcm(uid, iv, PROBE_AAD, PROBE_AAD)
            if self._conn.decrypt_gcm(uid, iv, ct, tag, PROBE_AAD) != PROBE_AAD:
                raise KmipNoBinding("returned wrong data for an AES-GCM Decrypt")
            try:
                self._conn.decrypt_gcm(uid, iv, ct, tag, PROBE_AAD[::-1])
            except KmipRefused:
                pass
            else:
                raise KmipNoBinding("decrypted AES-GCM data under the wrong additional data")
        except KmipNoBinding as e:
            raise errors.ContextBindingUnsupported(provider=self.name,
                                                   server=self.config.server,
                                                   reason=str(e)) from None
        except KmipRefused as e:
            if e.reason == DENIED:
                raise errors.KeyManagerNotAuthorised(
                    key_id="(a probe key)", server=self.config.server, provider=self.name,
                    identity=self._identity(), operation="creating and using a key") from None
            raise errors.ContextBindingUnsupported(
                provider=self.name, server=self.config.server,
                reason=f"refused AES-GCM with a 16-byte tag and additional data ({e})") from None
        finally:
            if uid is not None:
                for step in (self._conn.revoke, self._conn.destroy):
                    try:
                        step(uid)
                    except KmipRefused:
                        pass

    def new_material(self, key_id: str, version: int) -> bytes:
        def make():
            try:
                return self._conn.create_aes256(f"blockcrypt:{key_id}:v{version}")
            except KmipRefused as e:
                if e.reason == DENIED:
                    raise errors.KeyManagerNotAuthorised(
                        key_id=key_id, server=self.config.server, provider=self.name,
                        identity=self._identity(), operation="creating a key") from None
                raise errors.TokenOperationFailed(
                    provider=self.name, operation="creating an AES-256 key",
                    reason=f"the KMIP server {self.config.server} answered {e}") from None
        return self._request("creating a key", make).encode("ascii")

    def wrap(self, key_id: str, version: int, ref: bytes, dk: Secret, context: dict) -> bytes:
        uid = bytes(ref).decode("ascii")
        header, nonce, aad = envelope.seal_parts(key_id, version, context, self.algorithm,
                                                 server_ref=uid)

        def enc():
            try:
                # PyKMIP takes bytes: an unwipeable copy of the DK (docs/KEYS.md, Limits).
                return self._conn.encrypt_gcm(uid, nonce, dk.view().tobytes(), aad)
            except KmipRefused as e:
                raise self._refusal(e, key_id, version, uid, "wrapping a data key") from None
            except KmipNoBinding as e:
                raise errors.ContextBindingUnsupported(
                    provider=self.name, server=self.config.server, reason=str(e)) from None
        ct, tag = self._request("wrapping a data key", enc)
        return header + nonce + ct + tag

    def unwrap(self, parsed: envelope.WrappedKey, ref: bytes, context: dict) -> Secret:
        uid = bytes(ref).decode("ascii")
        if parsed.algorithm != self.algorithm or parsed.server_ref != uid:
            raise envelope.unwrap_failed(parsed)
        aad = parsed.header + envelope.canonical_context(context)
        ct, tag = parsed.ciphertext[:-envelope.TAG_BYTES], parsed.ciphertext[-envelope.TAG_BYTES:]

        def dec():
            try:
                return self._conn.decrypt_gcm(uid, parsed.nonce, ct, tag, aad)
            except KmipRefused as e:
                if e.reason in (NOT_FOUND, DENIED):
                    raise self._refusal(e, parsed.key_id, parsed.key_version, uid,
                                        "unwrapping a data key") from None
                raise envelope.unwrap_failed(parsed) from None   # a wrong tag or AAD
        dk = Secret(self._request("unwrapping a data key", dec))
        if len(dk) != len(ct):
            dk.wipe()
            raise envelope.unwrap_failed(parsed)
        return dk

    def destroy(self, key_id: str, refs: list[tuple[int, bytes]]) -> None:
        """Revoke, then destroy, each version's object; one already gone is not an error."""
        def kill():
            for version, ref in refs:
                uid = bytes(ref).decode("ascii")
                for step in (self._conn.revoke, self._conn.destroy):
                    try:
                        step(uid)
                    except KmipRefused as e:
                        if e.reason == NOT_FOUND:
                            break                   # destroyed already
                        if step == self._conn.revoke:
                            continue                # revoked already: destroy it
                        raise self._refusal(e, key_id, version, uid,
                                            "destroying a key") from None
        self._request("destroying a key", kill)

    def close(self) -> None:
        self._conn.close()

    # -- reporting -------------------------------------------------------------------------
    def describe(self) -> dict:
        """The server as ``provider show`` reports it: reachable or not, its identity
        (certificate subject, vendor) and protocol versions, and this host's identity."""
        out = {"server": self.config.server, "client_identity": self._identity(),
               "protocol_version_used": "1.4"}
        try:
            info = self._request("provider show", self._conn.server_info)
        except errors.BlockcryptError as e:
            out.update(reachable=False, error=e.message)
            return out
        out.update(reachable=True, server_identity=info["peer_subject"],
                   vendor=info["vendor"], protocol_versions=info["protocol_versions"])
        return out

    def version_states(self, refs: list[tuple[int, bytes]]) -> dict[int, str]:
        """Each version's state on the server (ACTIVE, DEACTIVATED, ..., NOT_AUTHORISED,
        MISSING, UNREACHABLE); never raises."""
        out = {}
        for version, ref in refs:
            try:
                check_key_file(self.name, self.config.key)
                out[version] = self._conn.state(bytes(ref).decode("ascii"))
            except KmipRefused as e:
                out[version] = "MISSING" if e.reason == NOT_FOUND else "NOT_AUTHORISED"
            except (KmipUnreachable, errors.BlockcryptError):
                out[version] = "UNREACHABLE"
        return out


def no_import(provider: str) -> errors.InvalidInput:
    return errors.InvalidInput(
        detail=f"key provider {provider!r} is a KMIP key manager: its keys are made on the "
               "server, and blockcrypt does not import material through the host; import it "
               "with the key manager's own tools, or create the key without --origin external")
