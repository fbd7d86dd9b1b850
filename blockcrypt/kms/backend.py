"""Where a key's material lives: the one thing that differs between key providers.

blockcrypt keeps one key catalog for every provider (:mod:`blockcrypt.kms.local`:
ids, aliases, states, versions, the deletion window, BYOK bookkeeping and the
audit chain), so the state machine and its refusals are the same code for every
key.  The catalog hands only the operations on material to a :class:`KeyBackend`:

- make the material of a new key version (returning what the catalog stores in
  ``kms_key_versions.material``: sealed material for ``local``, the token
  object's CKA_ID for ``pkcs11``);
- wrap and unwrap a data key under one version, with the blob header and the
  encryption context as associated data (:mod:`blockcrypt.kms.envelope`);
- destroy the material of versions (``local``: the catalog erases the row's
  column; ``pkcs11``: the token objects are destroyed first);
- bring your own key: make an RSA import wrapping key, and unwrap imported
  material with it into the provider (returning the stored value and the
  material's check value, :func:`check_value`).

States are checked by the catalog *before* a backend is called: a Disabled key
never reaches the token.

:class:`LocalBackend` is the built-in ``local`` provider: material sealed under
the store's KEK (:mod:`blockcrypt.kms.local.vault`), GCM in software.
"""
from __future__ import annotations

import abc
from typing import ClassVar

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..crypto.secret import Secret
from . import byok, envelope

LOCAL = "local"
"""The name and type of the built-in provider."""

KCV_NONCE = b"\xff" * 12
KCV_AAD = b"blockcrypt key check value v1"


def check_value(material: Secret) -> bytes:
    """The key check value of imported material: the AES-256-GCM tag over no plaintext
    with a fixed nonce (no data key ever uses it) and a fixed label.  The same for
    every provider (a token computes it with CKM_AES_GCM), so re-imported material
    is known to be the same without keeping it."""
    return AESGCM(material.view()).encrypt(KCV_NONCE, b"", KCV_AAD)


class KeyBackend(abc.ABC):
    """Key material operations of one provider (see the module doc)."""

    type: ClassVar[str]
    algorithm: ClassVar[int]
    """The envelope algorithm id of the blobs it makes."""
    needs_kek: ClassVar[bool]
    """True if using its material needs the store passphrase."""
    imports_material: ClassVar[bool] = True
    """False if keys of this provider cannot take imported material (BYOK)."""

    def __init__(self, name: str):
        self.name = name

    @abc.abstractmethod
    def new_material(self, key_id: str, version: int) -> bytes:
        """Fresh material for one key version; returns what the catalog stores for it."""

    @abc.abstractmethod
    def wrap(self, key_id: str, version: int, ref: bytes, dk: Secret, context: dict) -> bytes:
        """The blob of ``dk`` under one version (``ref`` = its stored value)."""

    @abc.abstractmethod
    def unwrap(self, parsed: envelope.WrappedKey, ref: bytes, context: dict) -> Secret:
        """The data key of a parsed blob; UnwrapError if it does not open."""

    def destroy(self, key_id: str, refs: list[tuple[int, bytes]]) -> None:
        """Destroy the material of these versions (idempotent); the catalog then erases
        the stored values."""

    def check(self) -> None:
        """Raise the provider's error if it cannot be used now (``provider add`` runs it)."""

    def prepare_import_key(self, oaep_hash: str):
        """Checks and slow work for :meth:`new_import_key` done before the catalog's write
        lock is taken (local: the RSA key generation); what it returns is handed over."""
        return None

    def discard_prepared(self, prepared) -> None:
        """Wipe what :meth:`prepare_import_key` returned."""

    @abc.abstractmethod
    def new_import_key(self, key_id: str, oaep_hash: str, prepared) -> dict:
        """A fresh RSA key pair for importing material: {"ref": the value the catalog
        keeps for the private half, "pem": the public half, "spec": e.g. RSA_4096,
        "algorithm": e.g. RSAES_OAEP_SHA_256}."""

    @abc.abstractmethod
    def import_material(self, key_id: str, version: int, private_ref: bytes,
                        wrapped: bytes) -> tuple[bytes, bytes]:
        """Unwrap RSA-OAEP-wrapped 32-byte material as the key's ``version``: (the value
        the catalog keeps for that version, the material's check value)."""

    def destroy_import_key(self, private_ref: bytes) -> None:
        """Forget an import wrapping key (idempotent)."""

    def close(self) -> None:
        """Forget what this object holds (the process-wide token session stays)."""


class LocalBackend(KeyBackend):
    """Material sealed under the store's KEK, wrapping in software (AES-256-GCM)."""

    type = LOCAL
    algorithm = envelope.ALG_AES256GCM_DK64
    needs_kek = True

    def __init__(self, vault):
        super().__init__(LOCAL)
        self._vault = vault

    def new_material(self, key_id: str, version: int) -> bytes:
        with Secret.random(envelope.CMK_BYTES) as material:
            return self._vault.seal(material.view(), self._vault.material_ad(key_id, version))

    def _cmk(self, key_id: str, version: int, ref: bytes) -> Secret:
        return self._vault.unseal(ref, self._vault.material_ad(key_id, version),
                                  f"the material of key {key_id} version {version}")

    def wrap(self, key_id: str, version: int, ref: bytes, dk: Secret, context: dict) -> bytes:
        with self._cmk(key_id, version, ref) as cmk:
            return envelope.wrap(cmk, key_id, version, dk, context)

    def unwrap(self, parsed: envelope.WrappedKey, ref: bytes, context: dict) -> Secret:
        with self._cmk(parsed.key_id, parsed.key_version, ref) as cmk:
            return envelope.unwrap(cmk, parsed, context)

    def prepare_import_key(self, oaep_hash: str):
        byok.check_oaep_hash(oaep_hash, byok.LOCAL_OAEP_HASHES, self.name)
        return byok.new_wrapping_key()          # RSA-4096: slow, so outside the lock

    def discard_prepared(self, prepared) -> None:
        if prepared is not None:
            prepared[0].wipe()

    def new_import_key(self, key_id: str, oaep_hash: str, prepared) -> dict:
        private, pem = prepared
        return {"ref": self._vault.seal(private.view(), self._vault.import_ad(key_id)),
                "pem": pem, "spec": byok.WRAPPING_KEY_SPEC,
                "algorithm": byok.wrapping_algorithm(oaep_hash)}

    def import_material(self, key_id: str, version: int, private_ref: bytes,
                        wrapped: bytes) -> tuple[bytes, bytes]:
        private = self._vault.unseal(private_ref, self._vault.import_ad(key_id),
                                     f"the import wrapping key of key {key_id}")
        try:
            material = byok.unwrap_material(private, wrapped)
        finally:
            private.wipe()
        with material:
            return (self._vault.seal(material.view(), self._vault.material_ad(key_id, version)),
                    check_value(material))
