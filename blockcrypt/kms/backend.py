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
  column; ``pkcs11``: the token objects are destroyed first).

States are checked by the catalog *before* a backend is called: a Disabled key
never reaches the token.

:class:`LocalBackend` is the built-in ``local`` provider: material sealed under
the store's KEK (:mod:`blockcrypt.kms.local.vault`), GCM in software.
"""
from __future__ import annotations

import abc
from typing import ClassVar

from ..crypto.secret import Secret
from . import envelope

LOCAL = "local"
"""The name and type of the built-in provider."""


class KeyBackend(abc.ABC):
    """Key material operations of one provider (see the module doc)."""

    type: ClassVar[str]
    algorithm: ClassVar[int]
    """The envelope algorithm id of the blobs it makes."""
    needs_kek: ClassVar[bool]
    """True if using its material needs the store passphrase."""

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
