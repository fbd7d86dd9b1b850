"""The ``local`` key provider: :class:`KeyStore`, the key store of one blockcrypt home.

Model (as in a cloud KMS): a CMK has one or more *versions*, each 32 random bytes
of AES-256-GCM material.  Material never leaves the store in plaintext: it is
stored sealed under the KEK (:mod:`blockcrypt.kms.kdf`, Argon2id over the store
passphrase) and used only to wrap and unwrap data keys
(:mod:`blockcrypt.kms.envelope`).  Callers get data keys
(:class:`~blockcrypt.crypto.secret.Secret`) and wrapped blobs, never CMK material.

Concurrency and crash safety: everything lives in the shared SQLite database
(WAL, synchronous=FULL); every change runs in one ``BEGIN IMMEDIATE`` transaction
together with its audit record (:mod:`.journal`), so a crash leaves the old or the
new state and concurrent CLI invocations serialise.  The Argon2id derivation runs
*before* the write lock is taken; a passphrase change made by another process in
between is detected (``kek_generation``) and refused.

This module opens and closes the store and wires its parts together; each public
method hands over to the module that owns the job:

- :mod:`.lifecycle`: creating keys and the state machine; :mod:`.maintenance`:
  due deletions and rotations;
- :mod:`.datakeys`: generate / decrypt / re-encrypt data keys;
- :mod:`.imports`: bring your own key; :mod:`.passphrase`: init and passphrase change;
- :mod:`.vault`: the KEK and sealed material; :mod:`.rows`: lookups and descriptions;
- :mod:`.rules`: states, limits, validation; :mod:`.schema`: the tables.

Which disks and snapshots use a key is not the store's knowledge: it is given a
``dependants`` callable (see :mod:`.rows`); blockcrypt's CLI wires the disk catalog.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime
from typing import Callable

from ... import errors
from ...crypto.secret import Secret
from ...storage import db
from ...storage.home import Home
from .. import audit, envelope
from ..backend import LOCAL
from ..provider import KeyProvider
from . import passphrase as passphrase_ops
from .adopt import Adoption
from .backends import Backends
from .datakeys import DataKeys
from .imports import Imports
from .journal import Facts, Journal
from .lifecycle import Lifecycle
from .maintenance import Maintenance
from .providers import Providers
from .rows import Dependants, KeyRows, no_dependants, state_error
from .rules import ENABLED, ORIGIN_BLOCKCRYPT, PENDING_DAYS_DEFAULT, iso_us, utc_now
from .schema import STORE_FORMAT_VERSION
from .shred import Inventory
from .shred import reports as shred_reports
from .vault import Vault


class KeyStore(KeyProvider):
    """The key store of one blockcrypt home.  Open with :meth:`open`, create with :meth:`init`.

    ``passphrase_source`` is called (at most once per instance) only when CMK
    material is needed; the Secret it returns is wiped after the KEK is derived.
    ``now`` is the clock (UTC, timezone-aware), injectable for tests.
    ``dependants`` tells which disks and snapshots use a key (default: none known).
    """

    name = "local"

    def __init__(self, home: Home, conn: sqlite3.Connection,
                 passphrase_source: Callable[[], Secret] | None,
                 now: Callable[[], datetime] | None = None,
                 dependants: Dependants = no_dependants, inventory: Inventory | None = None):
        self.home = home
        self.conn = conn
        self._now = now or utc_now
        row = conn.execute("SELECT store_id FROM kms_store WHERE id = 1").fetchone()
        self.store_id: str = row["store_id"]
        self._vault = Vault(home, conn, self.store_id, passphrase_source)
        self._rows = KeyRows(conn, dependants, inventory)
        self._backends = Backends(conn, self._vault)
        self._journal = Journal(conn, self._vault, self._now,
                                after_unlock=lambda: self._maintenance.rotate_due(),
                                provider_of=self._backends.provider_of)
        parts = (conn, self._vault, self._journal, self._rows, self._now, self._backends)
        self._maintenance = Maintenance(*parts)
        self._lifecycle = Lifecycle(*parts)
        self._imports = Imports(*parts)
        self._data_keys = DataKeys(*parts)
        self._providers = Providers(*parts)
        self._adoption = Adoption(*parts)

    # -- opening and closing ---------------------------------------------------------
    @staticmethod
    def exists(home: Home) -> bool:
        if not home.db_path.exists():
            return False
        conn = db.connect(home.db_path)
        try:
            return conn.execute("SELECT 1 FROM kms_store WHERE id = 1").fetchone() is not None
        finally:
            conn.close()

    @classmethod
    def init(cls, home: Home, passphrase: Secret, *,
             now: Callable[[], datetime] | None = None) -> bool:
        """Create the store; False (and nothing changed) if it already exists."""
        return passphrase_ops.init_store(home, passphrase, now or utc_now)

    @classmethod
    def open(cls, home: Home, passphrase_source: Callable[[], Secret] | None = None, *,
             now: Callable[[], datetime] | None = None,
             dependants: Dependants = no_dependants,
             inventory: Inventory | None = None) -> KeyStore:
        """Open an existing store (StoreNotFound otherwise) and run maintenance.

        Maintenance: keys whose deletion window has passed are destroyed now;
        automatic rotations that are due happen as soon as the KEK is unlocked
        (creating material needs it), before any data key is wrapped.
        """
        try:
            conn = db.connect(home.db_path)
        except FileNotFoundError:
            raise errors.StoreNotFound(home=str(home.path)) from None
        try:
            meta = conn.execute("SELECT format_version FROM kms_store WHERE id = 1").fetchone()
            if meta is None:
                raise errors.StoreNotFound(home=str(home.path))
            if meta["format_version"] != STORE_FORMAT_VERSION:
                raise errors.StateError(
                    detail=f"the key store at {home.path} has format version "
                           f"{meta['format_version']}, which this blockcrypt does not "
                           "support; upgrade blockcrypt")
            # Erased material is overwritten in the file, not just unlinked from the b-tree.
            conn.execute("PRAGMA secure_delete=ON")
            store = cls(home, conn, passphrase_source, now, dependants, inventory)
        except BaseException:
            conn.close()
            raise
        try:
            store._maintenance.destroy_expired()
            store._maintenance.expire_imported()
            store._maintenance.rotate_due(unlocked=False)   # keys that need no passphrase
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        self._backends.close()
        self._vault.wipe()
        self.conn.close()

    def forget_secrets(self) -> None:
        """Wipe the KEK (the passphrase was wiped when it was derived)."""
        self._vault.wipe()

    def unlock(self) -> None:
        """Ask for the passphrase now and check it (a wrong one is audited as refused)."""
        try:
            self._vault.unlock()
        except errors.BlockcryptError as e:
            self._journal.refused("unlock", Facts(), None, e)
            raise

    # -- reading -----------------------------------------------------------
    def get_key(self, ref: str) -> dict:
        """A key by id or alias (KeyNotFound otherwise)."""
        return self._rows.describe(self._rows.row(ref))

    def list_keys(self) -> list[dict]:
        return [self._rows.describe(r) for r in self._rows.all()]

    def check_usable(self, ref: str) -> dict:
        """The key if it is Enabled; KeyStateError naming the next step otherwise.

        The pre-check before using a key (e.g. attach): a refusal is audited as a
        refused 'check-usable' (a success is a read, like get_key, and is not).
        """
        facts = Facts()
        try:
            row = self._rows.row(ref)
            facts.key_id = row["id"]
            if row["state"] != ENABLED:
                raise state_error(row, "wrap or unwrap data keys")
        except errors.BlockcryptError as e:
            self._journal.refused("check-usable", facts, None, e)
            raise
        return self._rows.describe(row)

    def audit_records(self, key: str | None = None, since: datetime | None = None) -> list[dict]:
        key_id = self._rows.row(key)["id"] if key is not None else None
        return audit.query(self.conn, key_id=key_id,
                           since=iso_us(since) if since is not None else None)

    def shred_reports(self, ref: str) -> list[dict]:
        """The crypto-shred records of a destroyed key (by id or former alias; .shred)."""
        return shred_reports(self.conn, ref)

    def verify_audit(self, anchors: list[tuple[int, str]] = ()) -> dict:
        return audit.verify(self.conn, anchors=anchors, expect_records=True)

    # -- key lifecycle (.lifecycle) ------------------------------------------------
    def create_key(self, alias: str | None = None, description: str | None = None,
                   origin: str = ORIGIN_BLOCKCRYPT,
                   rotation_period_days: int | None = None, provider: str = LOCAL) -> dict:
        """A new CMK: Enabled with version 1, or PendingImport for origin 'external'.
        Its material is made and kept by ``provider`` (default: ``local``)."""
        return self._lifecycle.create_key(alias, description, origin, rotation_period_days,
                                          provider)

    # -- key providers (.providers) ----------------------------------------------------
    def add_provider(self, name: str, type_: str, **options) -> dict:
        """Register a provider after checking that it works (e.g. the token logs in)."""
        return self._providers.add(name, type_, options)

    def list_providers(self) -> list[dict]:
        return self._providers.list()

    def get_provider(self, name: str) -> dict:
        return self._providers.get(name)

    def adopt_key(self, wrapped: bytes, provider: str | None = None,
                  what: str = "a wrapped data key") -> dict:
        """Make the key that wrapped ``wrapped`` known here (a kmip key from another host's
        disk, origin 'shared'); KeyProviderUnknown for local and pkcs11 keys (.adopt)."""
        return self._adoption.adopt(wrapped, provider, what)

    def key_health(self, ref: str) -> dict:
        """The key's state here and, for a kmip key, each live version's state on the key
        manager (``server_states``: version -> ACTIVE, DEACTIVATED, ..., UNREACHABLE)."""
        row = self._rows.row(ref)
        out = {"key_id": row["id"], "state": row["state"],
               "provider": self._backends.provider_of(row["id"]), "server_states": None}
        refs = [(r["version"], bytes(r["material"])) for r in self.conn.execute(
            "SELECT version, material FROM kms_key_versions WHERE key_id = ? AND material IS "
            "NOT NULL ORDER BY version", (row["id"],))]
        backend = self._backends.for_key(row["id"])
        states = getattr(backend, "version_states", None)
        if states is not None and refs:
            out["server_states"] = states(refs)
        return out

    def provider_status(self, name: str) -> dict | None:
        """What the provider's backend reports about its server (a kmip provider: reachable
        or not, the server's identity and protocol versions), None if it has no such report."""
        self._providers.get(name)                       # ProviderNotFound first
        backend = self._backends.for_provider(name)
        describe = getattr(backend, "describe", None)
        return describe() if describe is not None else None

    def remove_provider(self, name: str) -> dict:
        """Forget a provider; refused while keys that are not Destroyed use it."""
        return self._providers.remove(name)

    def default_key(self) -> dict:
        """The service key (alias blockcrypt/default), created on first use."""
        return self._lifecycle.default_key()

    def enable(self, ref: str) -> dict:
        return self._lifecycle.enable(ref)

    def disable(self, ref: str, force: bool = False) -> dict:
        """Enabled -> Disabled; refused for the service key and, unless forced, keys in use."""
        return self._lifecycle.disable(ref, force)

    def schedule_deletion(self, ref: str, pending_days: int = PENDING_DAYS_DEFAULT,
                          force: bool = False) -> dict:
        """Any live key -> PendingDeletion; material is destroyed once the window passes."""
        return self._lifecycle.schedule_deletion(ref, pending_days, force)

    def cancel_deletion(self, ref: str) -> dict:
        """PendingDeletion -> Disabled (or PendingImport if it never had material)."""
        return self._lifecycle.cancel_deletion(ref)

    def rotate(self, ref: str) -> dict:
        """Add a key version; new wraps use it, older versions still unwrap."""
        return self._lifecycle.rotate(ref)

    # -- BYOK (.imports) ---------------------------------------------------------------
    def get_import_params(self, ref: str, oaep_hash: str = "sha256") -> dict:
        """A fresh RSA wrapping key (in the key's provider) and a 24-hour import token
        (replacing older ones); ``oaep_hash`` is the OAEP hash the import will use."""
        return self._imports.get_import_params(ref, oaep_hash)

    def import_material(self, ref: str, wrapped_material: bytes, import_token: str,
                        material_expires_at: datetime | None = None) -> dict:
        """Unwrap RSA-OAEP-wrapped 32-byte material and enable the key; the material goes
        again at ``material_expires_at`` (the key then waits in PendingImport)."""
        return self._imports.import_material(ref, wrapped_material, import_token,
                                             material_expires_at)

    def delete_imported_material(self, ref: str) -> dict:
        """Delete an imported key's material now: it becomes PendingImport; importing the
        same material again brings it back."""
        return self._imports.delete_material(ref)

    # -- envelope operations (.datakeys) ---------------------------------------------
    def generate_data_key(self, key_ref: str, context: dict[str, str]) -> tuple[Secret, bytes]:
        """A fresh 64-byte DK and its blob wrapped by the key's newest version.

        The caller owns the returned Secret and must wipe it.
        """
        return self._data_keys.generate(key_ref, context)

    def decrypt_data_key(self, wrapped: bytes, context: dict[str, str]) -> Secret:
        """Unwrap a blob (any version of its key) if the context matches exactly."""
        return self._data_keys.decrypt(wrapped, context)

    def reencrypt_data_key(self, wrapped: bytes, old_context: dict[str, str],
                           new_context: dict[str, str]) -> bytes:
        """Re-wrap a blob's DK under the key's newest version, bound to new_context."""
        return self._data_keys.reencrypt(wrapped, old_context, new_context)

    def key_version_of(self, wrapped: bytes) -> int:
        """The key version named in a local blob's header (FORMAT: kms/envelope.py)."""
        return envelope.parse_wrapped(wrapped).key_version

    # -- passphrase (.passphrase) ------------------------------------------------------
    def change_passphrase(self, new: Secret) -> None:
        """Re-seal all CMK material (and import keys) under a KEK from the new passphrase.

        One transaction: a crash at any point leaves either the old passphrase or
        the new one working, never a mix.  The caller still owns ``new``.
        """
        passphrase_ops.change_passphrase(self._vault, self._journal, new)

    def _material(self, key_id: str, version: int) -> Secret:
        """A CMK version's plaintext material (the caller wipes it).  Not for blockcrypt's
        own use: only the secrets-in-memory test reads it, to know what to scan for."""
        return self._vault.material(key_id, version)
