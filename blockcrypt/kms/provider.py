"""The key-provider seam: what the rest of blockcrypt may ask of a key manager.

In the spirit of sops's ``keys.MasterKey``: every provider implements this one
small class, and the services (:mod:`blockcrypt.services`) hold a
:class:`KeyProvider` without knowing which one.  Today there is one provider,
``local`` (:class:`blockcrypt.kms.local.KeyStore`, the SQLite key store of a
blockcrypt home); PKCS#11 and KMIP providers are to be added beside it.

The methods are exactly what the services call (wrap, unwrap and re-wrap data
keys; describe a key) plus the state changes the CLI makes.  Creating keys,
listing them, BYOK import, the passphrase and the audit queries are the local
store's own commands and are not part of the seam.

What every provider promises:

- **Errors.**  Only :class:`~blockcrypt.errors.BlockcryptError` subclasses leave
  a method: ``KeyNotFound`` (no such id or alias), ``KeyStateError`` (the key's
  state does not allow it; the message names the next step), ``KeyInUse`` and
  ``ServiceKeyProtected`` (refused state changes), ``InvalidInput`` (a bad
  context, period or argument), ``BlobFormatError`` / ``UnwrapError`` (a blob
  that is not one, or does not open under the given context), ``Passphrase*``
  and ``CryptoError`` (the provider cannot unlock or its stored material fails
  authentication).
- **Audit.**  Every call that uses or changes a key appends one record to the
  audit trail (:mod:`blockcrypt.kms.audit`): ``success``, or ``refused`` with the
  error.  Reads (``get_key``, an existing ``default_key``, a successful
  ``check_usable``) are not recorded.
- **Context.**  The encryption context (a dict of non-empty ``str`` to ``str``,
  at most 4 KiB as canonical JSON; for a disk, the container's identity from
  ``storage.container.key_context``) is bound to the wrapped blob as associated
  data: the blob unwraps only under exactly the same context.  It is recorded in
  the audit trail, never stored with the key.
- **Material.**  Key material never leaves the provider.  A data key leaves as a
  :class:`~blockcrypt.crypto.secret.Secret` that the caller owns and must wipe.
- **Descriptions.**  A key is described by a dict with at least ``id``,
  ``alias``, ``state`` (one of :data:`STATES`), ``current_version`` and
  ``dependants`` (``"disk NAME"`` / ``"snapshot NAME"`` strings).

This module imports nothing from blockcrypt but the types it names.
"""
from __future__ import annotations

import abc
from typing import ClassVar

from ..crypto.secret import Secret

ENABLED, DISABLED = "Enabled", "Disabled"
PENDING_DELETION, PENDING_IMPORT, DESTROYED = "PendingDeletion", "PendingImport", "Destroyed"
STATES = (ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT, DESTROYED)
"""Key states, as a cloud KMS names them; only an Enabled key wraps or unwraps."""

PENDING_DAYS_DEFAULT = 30
"""The waiting period of a scheduled deletion when none is given, in days."""


class KeyProvider(abc.ABC):
    """A key manager that wraps data keys under its master keys (see the module doc)."""

    name: ClassVar[str]
    """Short provider name, e.g. ``local``."""

    # -- data keys (what the services use) ---------------------------------
    @abc.abstractmethod
    def generate_data_key(self, key_ref: str, context: dict[str, str]) -> tuple[Secret, bytes]:
        """A fresh 64-byte data key and its blob, wrapped by the newest version of
        ``key_ref`` (id or alias) and bound to ``context``.  The key must be Enabled."""

    @abc.abstractmethod
    def decrypt_data_key(self, wrapped: bytes, context: dict[str, str]) -> Secret:
        """Unwrap a blob (under whichever key version wrapped it) if ``context`` is the
        one it was wrapped with; UnwrapError otherwise.  The key must be Enabled."""

    @abc.abstractmethod
    def reencrypt_data_key(self, wrapped: bytes, old_context: dict[str, str],
                           new_context: dict[str, str]) -> bytes:
        """The same data key re-wrapped under the newest version of its key and bound to
        ``new_context``; the plaintext data key never leaves the provider."""

    @abc.abstractmethod
    def key_version_of(self, wrapped: bytes) -> int:
        """The version of its key that wrapped a blob this provider made (recorded in
        the disk's header); BlobFormatError if ``wrapped`` is not such a blob.  Reads
        the blob only: no key is used and nothing is audited."""

    # -- describing keys -----------------------------------------------------
    @abc.abstractmethod
    def get_key(self, ref: str) -> dict:
        """The description of a key by id or alias (KeyNotFound otherwise)."""

    @abc.abstractmethod
    def default_key(self) -> dict:
        """The service key that wraps disks created without ``--key``; made on first use."""

    @abc.abstractmethod
    def check_usable(self, ref: str) -> dict:
        """The key if it may wrap and unwrap now; KeyStateError (audited as refused),
        naming the next step, otherwise.  The pre-check before attaching a disk."""

    # -- changing state (the `blockcrypt key` commands) -----------------------
    @abc.abstractmethod
    def enable(self, ref: str) -> dict:
        """Disabled -> Enabled (unchanged if Enabled already)."""

    @abc.abstractmethod
    def disable(self, ref: str, force: bool = False) -> dict:
        """Enabled -> Disabled; refused for the service key and, unless ``force``, while
        disks or snapshots depend on the key (KeyInUse listing them)."""

    @abc.abstractmethod
    def schedule_deletion(self, ref: str, pending_days: int = PENDING_DAYS_DEFAULT,
                          force: bool = False) -> dict:
        """-> PendingDeletion; the material is destroyed once ``pending_days`` have
        passed.  Refused like :meth:`disable`."""

    @abc.abstractmethod
    def cancel_deletion(self, ref: str) -> dict:
        """PendingDeletion -> Disabled (or PendingImport if it never had material)."""

    @abc.abstractmethod
    def rotate(self, ref: str) -> dict:
        """Add a key version: new wraps use it, older versions still unwrap."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the provider (connections, sessions) and wipe what it unlocked."""

    def forget_secrets(self) -> None:
        """Wipe what the provider unlocked (a key-encryption key, a login) but stay
        open: the next operation that needs key material unlocks again.  Called as
        soon as a data key is unwrapped by commands that then run on (serve,
        attach).  The default has nothing cached."""

    def __enter__(self) -> KeyProvider:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
