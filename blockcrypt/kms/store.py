"""The local key store: customer master keys (CMKs), envelope operations, audit trail.

Model (as in a cloud KMS): a CMK has one or more *versions*, each 32 random bytes
of AES-256-GCM material.  Material never leaves this module in plaintext: it is
stored sealed under the KEK (:mod:`.kdf`, Argon2id over the store passphrase) and
used only to wrap and unwrap data keys (:mod:`.envelope`).  Callers get data keys
(:class:`~blockcrypt.crypto.secret.Secret`) and wrapped blobs, never CMK material.

States::

    create ───────────────> Enabled <──enable── Disabled
    create --origin external > PendingImport ──import──> Enabled
    Enabled / Disabled / PendingImport ──schedule-deletion──> PendingDeletion
    PendingDeletion ──cancel-deletion──> Disabled (PendingImport if no material)
    PendingDeletion ──window passed (checked on every open)──> Destroyed (terminal,
                                                              material erased)

Only an Enabled key wraps or unwraps.  The service key (alias
``blockcrypt/default``) is created on first use and cannot be disabled, deleted
or imported into.  Disabling or deleting a key that disks or snapshots depend on
is refused unless forced.

Concurrency and crash safety: everything lives in the shared SQLite database
(WAL, synchronous=FULL); every change runs in one ``BEGIN IMMEDIATE`` transaction
together with its audit record, so a crash leaves the old or the new state and
concurrent CLI invocations serialise.  A refused operation is recorded in a
separate transaction after the operation's own was rolled back.  The Argon2id
derivation runs *before* the write lock is taken; a passphrase change made by
another process in between is detected (``kek_generation``) and refused.
"""
from __future__ import annotations

import hmac
import re
import sqlite3
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable

from cryptography.exceptions import InvalidTag

from .. import errors  # catalog: registers its tables (dependants)
from ..constants import utc_timestamp
from ..crypto.secret import Secret
from ..storage import catalog, db
from ..storage.db import register_schema, write_txn
from ..storage.home import Home
from ..testing.crashpoints import crashpoint
from . import audit, byok, envelope, kdf

ENABLED, DISABLED = "Enabled", "Disabled"
PENDING_DELETION, PENDING_IMPORT, DESTROYED = "PendingDeletion", "PendingImport", "Destroyed"
STATES = (ENABLED, DISABLED, PENDING_DELETION, PENDING_IMPORT, DESTROYED)
ORIGIN_BLOCKCRYPT, ORIGIN_EXTERNAL = "blockcrypt", "external"
ORIGINS = (ORIGIN_BLOCKCRYPT, ORIGIN_EXTERNAL)

SERVICE_ALIAS = "blockcrypt/default"
RESERVED_ALIAS_PREFIX = "blockcrypt/"
PENDING_DAYS_MIN, PENDING_DAYS_MAX, PENDING_DAYS_DEFAULT = 7, 30, 30
ROTATION_DAYS_MIN, ROTATION_DAYS_MAX = 90, 2560
MAX_DESCRIPTION_CHARS = 256
STORE_FORMAT_VERSION = 1

_VERIFIER = b"blockcrypt key store passphrase verifier v1"
_ALIAS_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9/_.-]{0,63}")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS kms_store (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    store_id        TEXT NOT NULL,
    format_version  INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    kdf             TEXT NOT NULL,      -- JSON: Argon2id parameters and salt of the KEK
    verifier        BLOB NOT NULL,      -- seal(KEK, constant): tells a wrong passphrase
    kek_generation  INTEGER NOT NULL    -- +1 on every passphrase change
);
CREATE TABLE IF NOT EXISTS kms_keys (
    id                   TEXT PRIMARY KEY,
    alias                TEXT UNIQUE,
    description          TEXT NOT NULL DEFAULT '',
    state                TEXT NOT NULL,
    origin               TEXT NOT NULL,
    service              INTEGER NOT NULL DEFAULT 0,
    created_at           TEXT NOT NULL,
    rotation_period_days INTEGER,
    last_rotated_at      TEXT,
    deletion_date        TEXT,
    destroyed_at         TEXT
);
CREATE TABLE IF NOT EXISTS kms_key_versions (
    key_id      TEXT NOT NULL REFERENCES kms_keys(id),
    version     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    material    BLOB,                   -- seal(KEK, 32 bytes), NULL once destroyed
    PRIMARY KEY (key_id, version)
);
CREATE TABLE IF NOT EXISTS kms_import (
    key_id          TEXT PRIMARY KEY REFERENCES kms_keys(id),
    token_sha256    TEXT NOT NULL,
    expires_at      TEXT NOT NULL,
    public_key_pem  TEXT NOT NULL,
    private_key     BLOB NOT NULL       -- seal(KEK, PKCS#8 DER of the RSA wrapping key)
)
"""
register_schema("kms", SCHEMA)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return utc_timestamp(t)


def _iso_us(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(s: str) -> datetime:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def validate_alias(alias: str) -> str:
    """Aliases: 1-64 of A-Z a-z 0-9 / _ - . (no leading . or /), unique, not id-shaped."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise errors.InvalidInput(
            detail=f"alias {alias!r} is not valid; use 1-64 characters of A-Z a-z 0-9 / _ - . "
                   "not starting with '.' or '/'")
    if alias.lower().startswith("alias/"):
        raise errors.InvalidInput(
            detail=f"alias {alias!r}: write it without the 'alias/' prefix")
    if alias.lower().startswith(RESERVED_ALIAS_PREFIX):
        raise errors.InvalidInput(
            detail=f"alias {alias!r}: names starting with {RESERVED_ALIAS_PREFIX!r} are "
                   "reserved for blockcrypt's own keys")
    if _UUID_RE.fullmatch(alias):
        raise errors.InvalidInput(
            detail=f"alias {alias!r} looks like a key id; choose a name")
    return alias


def _validate_description(description: str | None) -> str:
    if description is None:
        return ""
    if (not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in description)):
        raise errors.InvalidInput(
            detail=f"the description must be at most {MAX_DESCRIPTION_CHARS} characters "
                   "without control characters (no newlines)")
    return description


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class _Facts:
    """What an operation learnt, for its audit record (filled in as it goes)."""

    key_id: str | None = None
    key_version: int | None = None
    details: dict = field(default_factory=dict)
    audit: bool = True


class KeyStore:
    """The key store of one blockcrypt home.  Open with :meth:`open`, create with :meth:`init`.

    ``passphrase_source`` is called (at most once per instance) only when CMK
    material is needed; the Secret it returns is wiped after the KEK is derived.
    ``now`` is the clock (UTC, timezone-aware), injectable for tests.
    """

    def __init__(self, home: Home, conn: sqlite3.Connection,
                 passphrase_source: Callable[[], Secret] | None,
                 now: Callable[[], datetime] | None = None):
        self.home = home
        self.conn = conn
        self._passphrase_source = passphrase_source
        self._now = now or _utc_now
        self._kek: Secret | None = None
        self._kek_generation: int | None = None
        row = conn.execute("SELECT store_id FROM kms_store WHERE id = 1").fetchone()
        self.store_id: str = row["store_id"]

    # -- lifecycle ---------------------------------------------------------
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
        now = now or _utc_now
        home.create_dirs()
        conn = db.connect(home.db_path, create=True)
        try:
            if conn.execute("SELECT 1 FROM kms_store WHERE id = 1").fetchone():
                return False
            params = kdf.new_params()
            store_id = str(uuid.uuid4())
            with kdf.derive_kek(passphrase, params) as kek:
                verifier = kdf.seal(kek, _VERIFIER, _verifier_ad(store_id))
            with write_txn(conn):
                if conn.execute("SELECT 1 FROM kms_store WHERE id = 1").fetchone():
                    return False  # another process won the race
                t = now()
                conn.execute("INSERT INTO kms_store (id, store_id, format_version, created_at,"
                             " kdf, verifier, kek_generation) VALUES (1, ?, ?, ?, ?, ?, 1)",
                             (store_id, STORE_FORMAT_VERSION, _iso(t), params.to_json(),
                              verifier))
                audit.append(conn, time=_iso_us(t), operation="init", key_id=None,
                             key_version=None, context=None, result="success",
                             details={"store_id": store_id, "kdf": params.public()})
            return True
        finally:
            conn.close()

    @classmethod
    def open(cls, home: Home, passphrase_source: Callable[[], Secret] | None = None, *,
             now: Callable[[], datetime] | None = None) -> "KeyStore":
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
            store = cls(home, conn, passphrase_source, now)
        except BaseException:
            conn.close()
            raise
        try:
            store._destroy_expired()
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        if self._kek is not None:
            self._kek.wipe()
            self._kek = None
        self.conn.close()

    def __enter__(self) -> "KeyStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def unlock(self) -> None:
        """Ask for the passphrase now and check it (a wrong one is audited as refused)."""
        try:
            self._unlock()
        except errors.BlockcryptError as e:
            with write_txn(self.conn):
                self._append("unlock", _Facts(), None, error=e)
            raise

    # -- reading -----------------------------------------------------------
    def get_key(self, ref: str) -> dict:
        """A key by id or alias (KeyNotFound otherwise)."""
        return self._key_dict(self._row(ref))

    def list_keys(self) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM kms_keys ORDER BY created_at, rowid").fetchall()
        return [self._key_dict(r) for r in rows]

    def check_usable(self, ref: str) -> dict:
        """The key if it is Enabled; KeyStateError naming the next step otherwise.

        The pre-check before using a key (e.g. attach): a refusal is audited as a
        refused 'check-usable' (a success is a read, like get_key, and is not).
        """
        facts = _Facts()
        try:
            row = self._row(ref)
            facts.key_id = row["id"]
            if row["state"] != ENABLED:
                raise self._state_error(row, "wrap or unwrap data keys")
        except errors.BlockcryptError as e:
            with write_txn(self.conn):
                self._append("check-usable", facts, None, error=e)
            raise
        return self._key_dict(row)

    def audit_records(self, key: str | None = None, since: datetime | None = None) -> list[dict]:
        key_id = self._row(key)["id"] if key is not None else None
        return audit.query(self.conn, key_id=key_id,
                           since=_iso_us(since) if since is not None else None)

    def verify_audit(self, anchors: list[tuple[int, str]] = ()) -> dict:
        return audit.verify(self.conn, anchors=anchors, expect_records=True)

    # -- key lifecycle -------------------------------------------------------
    def create_key(self, alias: str | None = None, description: str | None = None,
                   origin: str = ORIGIN_BLOCKCRYPT,
                   rotation_period_days: int | None = None) -> dict:
        """A new CMK: Enabled with version 1, or PendingImport for origin 'external'."""
        def work(f: _Facts, dry: bool):
            if alias is not None:
                validate_alias(alias)
            desc = _validate_description(description)
            if origin not in ORIGINS:
                raise errors.InvalidInput(
                    detail=f"origin {origin!r} is not one of {', '.join(ORIGINS)}")
            if rotation_period_days is not None:
                if origin == ORIGIN_EXTERNAL:
                    raise errors.InvalidInput(
                        detail="imported keys cannot be rotated, so a rotation period "
                               "cannot be set with origin 'external'")
                if (not _is_int(rotation_period_days)
                        or not ROTATION_DAYS_MIN <= rotation_period_days <= ROTATION_DAYS_MAX):
                    raise errors.InvalidInput(
                        detail=f"the rotation period must be {ROTATION_DAYS_MIN}.."
                               f"{ROTATION_DAYS_MAX} days, got {rotation_period_days!r}")
            if alias is not None and self._find_alias(alias) is not None:
                raise errors.AlreadyExists(what="key alias", name=alias)
            f.details = {"alias": alias, "origin": origin,
                         "rotation_period_days": rotation_period_days}
            if dry:
                return None
            return self._insert_key(f, alias=alias, description=desc, origin=origin,
                                    rotation_period_days=rotation_period_days)

        key_id = self._run("create", work, needs_kek=(origin == ORIGIN_BLOCKCRYPT))
        return self.get_key(key_id)

    def default_key(self) -> dict:
        """The service key (alias blockcrypt/default), created on first use."""
        row = self._find_alias(SERVICE_ALIAS)
        if row is not None:
            return self._key_dict(row)

        def work(f: _Facts, dry: bool):
            existing = self._find_alias(SERVICE_ALIAS)
            if existing is not None:  # created meanwhile by another process
                f.key_id, f.audit = existing["id"], False
                return existing["id"]
            f.details = {"alias": SERVICE_ALIAS, "origin": ORIGIN_BLOCKCRYPT, "service": True}
            if dry:
                return None
            return self._insert_key(
                f, alias=SERVICE_ALIAS, origin=ORIGIN_BLOCKCRYPT, rotation_period_days=None,
                description="blockcrypt service key: wraps disks created without --key",
                service=True)

        return self.get_key(self._run("create", work, needs_kek=True))

    def enable(self, ref: str) -> dict:
        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            if row["state"] == ENABLED:
                f.details["unchanged"] = True
                return
            if row["state"] != DISABLED:
                raise self._state_error(row, "be enabled")
            self.conn.execute("UPDATE kms_keys SET state = ? WHERE id = ?", (ENABLED, row["id"]))

        self._run("enable", work)
        return self.get_key(ref)

    def disable(self, ref: str, force: bool = False) -> dict:
        """Enabled -> Disabled; refused for the service key and, unless forced, keys in use."""
        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            if row["service"]:
                raise errors.ServiceKeyProtected(key_id=f"key {row['id']}", action="disabled")
            if row["state"] == DISABLED:
                f.details["unchanged"] = True
                return
            if row["state"] == PENDING_DELETION:
                raise self._state_error(
                    row, "be disabled",
                    f"it is already unusable and will be destroyed on {row['deletion_date']}; "
                    f"run `blockcrypt key cancel-deletion {self._ref(row)}` to keep it "
                    "(it then stays Disabled)")
            if row["state"] != ENABLED:
                raise self._state_error(row, "be disabled")
            self._check_dependants(f, row, force, "they cannot be attached while it is "
                                   "disabled; pass --force to disable it anyway")
            self.conn.execute("UPDATE kms_keys SET state = ? WHERE id = ?",
                              (DISABLED, row["id"]))

        self._run("disable", work)
        return self.get_key(ref)

    def schedule_deletion(self, ref: str, pending_days: int = PENDING_DAYS_DEFAULT,
                          force: bool = False) -> dict:
        """Any live key -> PendingDeletion; material is destroyed once the window passes."""
        def work(f: _Facts, dry: bool):
            if (not _is_int(pending_days)
                    or not PENDING_DAYS_MIN <= pending_days <= PENDING_DAYS_MAX):
                raise errors.InvalidInput(
                    detail=f"the pending window must be {PENDING_DAYS_MIN}..{PENDING_DAYS_MAX} "
                           f"days, got {pending_days!r}")
            row = self._row(ref)
            f.key_id = row["id"]
            if row["service"]:
                raise errors.ServiceKeyProtected(key_id=f"key {row['id']}",
                                                 action="scheduled for deletion")
            if row["state"] == PENDING_DELETION:
                raise self._state_error(
                    row, "be scheduled for deletion again",
                    f"it is already scheduled for deletion on {row['deletion_date']}; run "
                    f"`blockcrypt key cancel-deletion {self._ref(row)}` to keep it")
            if row["state"] == DESTROYED:
                raise self._state_error(row, "be scheduled for deletion")
            self._check_dependants(
                f, row, force, "their data becomes unreadable once the key is destroyed; move "
                "it to disks under another key with `blockcrypt disk copy SRC DST` first, or "
                "pass --force to schedule the deletion anyway")
            deletion_date = _iso(self._now() + timedelta(days=pending_days))
            f.details.update(pending_days=pending_days, deletion_date=deletion_date,
                             previous_state=row["state"])
            self.conn.execute("UPDATE kms_keys SET state = ?, deletion_date = ? WHERE id = ?",
                              (PENDING_DELETION, deletion_date, row["id"]))

        self._run("schedule-deletion", work)
        return self.get_key(ref)

    def cancel_deletion(self, ref: str) -> dict:
        """PendingDeletion -> Disabled (or PendingImport if it never had material)."""
        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            if row["state"] != PENDING_DELETION:
                raise self._state_error(
                    row, "have its deletion cancelled",
                    None if row["state"] == DESTROYED else "it is not scheduled for deletion")
            new_state = DISABLED if self._current_version(row["id"]) else PENDING_IMPORT
            f.details["new_state"] = new_state
            self.conn.execute("UPDATE kms_keys SET state = ?, deletion_date = NULL WHERE id = ?",
                              (new_state, row["id"]))

        self._run("cancel-deletion", work)
        return self.get_key(ref)

    def rotate(self, ref: str) -> dict:
        """Add a key version; new wraps use it, older versions still unwrap."""
        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            self._check_rotatable(row)
            if dry:
                return
            f.key_version = self._add_version(row["id"])
            f.details["new_version"] = f.key_version
            crashpoint("rotate:before-commit")

        self._run("rotate", work, needs_kek=True)
        return self.get_key(ref)

    # -- BYOK ------------------------------------------------------------------
    def get_import_params(self, ref: str) -> dict:
        """A fresh RSA-4096 wrapping key and a 24-hour import token (replacing older ones)."""
        made: dict = {}

        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            self._check_importable(row)
            if dry:
                if "private" not in made:
                    made["private"], made["pem"] = byok.new_wrapping_key()
                return None
            token = byok.new_token()
            expires_at = _iso(self._now() + byok.TOKEN_VALIDITY)
            sealed = kdf.seal(self._kek, made["private"].view(), self._import_ad(row["id"]))
            self.conn.execute(
                "INSERT INTO kms_import (key_id, token_sha256, expires_at, public_key_pem,"
                " private_key) VALUES (?, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET"
                " token_sha256 = excluded.token_sha256, expires_at = excluded.expires_at,"
                " public_key_pem = excluded.public_key_pem, private_key = excluded.private_key",
                (row["id"], byok.token_digest(token), expires_at, made["pem"], sealed))
            f.details.update(expires_at=expires_at,
                             wrapping_algorithm=byok.WRAPPING_ALGORITHM,
                             wrapping_key_spec=byok.WRAPPING_KEY_SPEC)
            return {"key_id": row["id"], "public_key_pem": made["pem"], "import_token": token,
                    "expires_at": expires_at, "wrapping_algorithm": byok.WRAPPING_ALGORITHM,
                    "wrapping_key_spec": byok.WRAPPING_KEY_SPEC}

        try:
            return self._run("get-import-params", work, needs_kek=True)
        finally:
            if "private" in made:
                made["private"].wipe()

    def import_material(self, ref: str, wrapped_material: bytes, import_token: str) -> dict:
        """Unwrap RSAES-OAEP-SHA-256-wrapped 32-byte material and enable the key."""
        def work(f: _Facts, dry: bool):
            row = self._row(ref)
            f.key_id = row["id"]
            self._check_importable(row)
            imp = self.conn.execute("SELECT * FROM kms_import WHERE key_id = ?",
                                    (row["id"],)).fetchone()
            r = self._ref(row)
            if imp is None:
                raise errors.ImportTokenError(
                    key_id=self._label(row),
                    detail=f"it has no import parameters; run `blockcrypt key get-import-params "
                           f"{r} --out-dir DIR` first")
            if (not isinstance(import_token, str) or not hmac.compare_digest(
                    byok.token_digest(import_token), imp["token_sha256"])):
                raise errors.ImportTokenError(
                    key_id=self._label(row),
                    detail="the import token does not match this key's latest import "
                           f"parameters; use the token from the latest `blockcrypt key "
                           f"get-import-params {r}`")
            if self._now() >= _parse_iso(imp["expires_at"]):
                raise errors.ImportTokenError(
                    key_id=self._label(row),
                    detail=f"the import token expired at {imp['expires_at']}; run `blockcrypt "
                           f"key get-import-params {r} --out-dir DIR` again and wrap the "
                           "material under the new public key")
            if dry:
                return
            private = self._unseal(imp["private_key"], self._import_ad(row["id"]),
                                   f"the import wrapping key of key {row['id']}")
            try:
                material = byok.unwrap_material(private, wrapped_material)
            finally:
                private.wipe()
            with material:
                sealed = kdf.seal(self._kek, material.view(), self._material_ad(row["id"], 1))
            t = _iso(self._now())
            self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, "
                              "material) VALUES (?, 1, ?, ?)", (row["id"], t, sealed))
            self.conn.execute("UPDATE kms_keys SET state = ?, last_rotated_at = ? WHERE id = ?",
                              (ENABLED, t, row["id"]))
            self.conn.execute("DELETE FROM kms_import WHERE key_id = ?", (row["id"],))
            f.key_version = 1

        self._run("import", work, needs_kek=True)
        return self.get_key(ref)

    # -- envelope operations -----------------------------------------------------
    def generate_data_key(self, key_ref: str, context: dict[str, str]) -> tuple[Secret, bytes]:
        """A fresh 64-byte DK and its blob wrapped by the key's newest version.

        The caller owns the returned Secret and must wipe it.
        """
        def work(f: _Facts, dry: bool):
            envelope.canonical_context(context)
            row = self._row(key_ref)
            f.key_id = row["id"]
            if row["state"] != ENABLED:
                raise self._state_error(row, "wrap a new data key")
            f.key_version = self._current_version(row["id"])
            if dry:
                return None
            with self._material(row["id"], f.key_version) as cmk:
                dk = envelope.new_data_key()
                try:
                    return dk, envelope.wrap(cmk, row["id"], f.key_version, dk, context)
                except BaseException:
                    dk.wipe()
                    raise

        return self._run("generate", work, context=context, needs_kek=True)

    def decrypt_data_key(self, wrapped: bytes, context: dict[str, str]) -> Secret:
        """Unwrap a blob (any version of its key) if the context matches exactly."""
        def work(f: _Facts, dry: bool):
            parsed = self._usable_blob(f, wrapped, context, "unwrap a data key")
            if dry:
                return None
            with self._material(parsed.key_id, parsed.key_version) as cmk:
                return envelope.unwrap(cmk, parsed, context)

        return self._run("decrypt", work, context=context, needs_kek=True)

    def reencrypt_data_key(self, wrapped: bytes, old_context: dict[str, str],
                           new_context: dict[str, str]) -> bytes:
        """Re-wrap a blob's DK under the key's newest version, bound to new_context."""
        def work(f: _Facts, dry: bool):
            parsed = self._usable_blob(f, wrapped, old_context, "re-wrap a data key")
            envelope.canonical_context(new_context)
            f.details = {"from_version": parsed.key_version, "old_context": old_context}
            new_version = self._current_version(parsed.key_id)
            if dry:
                return None
            with self._material(parsed.key_id, parsed.key_version) as cmk:
                dk = envelope.unwrap(cmk, parsed, old_context)
            with dk, self._material(parsed.key_id, new_version) as cmk:
                blob = envelope.wrap(cmk, parsed.key_id, new_version, dk, new_context)
            f.key_version = new_version
            return blob

        return self._run("reencrypt", work, context=new_context, needs_kek=True)

    # -- passphrase ----------------------------------------------------------------
    def change_passphrase(self, new: Secret) -> None:
        """Re-seal all CMK material (and import keys) under a KEK from the new passphrase.

        One transaction: a crash at any point leaves either the old passphrase or
        the new one working, never a mix.  The caller still owns ``new``.
        """
        made: dict = {}

        def work(f: _Facts, dry: bool):
            if dry:
                self._unlock()  # a wrong current passphrase fails before the slow new KDF
                if "kek" not in made:
                    made["params"] = kdf.new_params()
                    made["kek"] = kdf.derive_kek(new, made["params"])
                return
            new_kek, count = made["kek"], 0
            rows = self.conn.execute("SELECT key_id, version, material FROM kms_key_versions "
                                     "WHERE material IS NOT NULL").fetchall()
            for r in rows:
                ad = self._material_ad(r["key_id"], r["version"])
                with self._unseal(r["material"], ad,
                                  f"the material of key {r['key_id']} version {r['version']}") as m:
                    sealed = kdf.seal(new_kek, m.view(), ad)
                self.conn.execute("UPDATE kms_key_versions SET material = ? "
                                  "WHERE key_id = ? AND version = ?",
                                  (sealed, r["key_id"], r["version"]))
                count += 1
                crashpoint("passphrase-change:after-first-key")
            for r in self.conn.execute("SELECT key_id, private_key FROM kms_import").fetchall():
                ad = self._import_ad(r["key_id"])
                with self._unseal(r["private_key"], ad,
                                  f"the import wrapping key of key {r['key_id']}") as m:
                    sealed = kdf.seal(new_kek, m.view(), ad)
                self.conn.execute("UPDATE kms_import SET private_key = ? WHERE key_id = ?",
                                  (sealed, r["key_id"]))
            self.conn.execute(
                "UPDATE kms_store SET kdf = ?, verifier = ?, kek_generation = kek_generation + 1"
                " WHERE id = 1",
                (made["params"].to_json(),
                 kdf.seal(new_kek, _VERIFIER, _verifier_ad(self.store_id))))
            f.details = {"reencrypted_versions": count, "kdf": made["params"].public()}
            crashpoint("passphrase-change:before-commit")

        try:
            self._run("change-passphrase", work, needs_kek=True)
        except BaseException:
            if "kek" in made:
                made["kek"].wipe()
            raise
        old, self._kek = self._kek, made["kek"]
        old.wipe()
        self._kek_generation = self.conn.execute(
            "SELECT kek_generation FROM kms_store WHERE id = 1").fetchone()[0]
        self._checkpoint()

    # -- internals: running and auditing ------------------------------------------
    def _run(self, operation: str, work: Callable[[_Facts, bool], object], *,
             context: dict | None = None, needs_kek: bool = False):
        """Run work in one write transaction with its audit record; audit refusals too.

        With needs_kek, work first runs as a dry check (dry=True, no writes), so a
        refusal comes before the passphrase is asked for; then the KEK is derived
        outside the write lock, and work runs for real inside the transaction.
        """
        facts = _Facts()
        try:
            if needs_kek:
                work(facts, True)
                self._unlock()
                self._rotate_due()
            with write_txn(self.conn):
                if needs_kek:
                    self._check_kek_current()
                result = work(facts, False)
                if facts.audit:
                    self._append(operation, facts, context)
            return result
        except errors.BlockcryptError as e:
            # The operation's own transaction was rolled back; record the refusal apart.
            with write_txn(self.conn):
                self._append(operation, facts, context, error=e)
            raise

    def _append(self, operation: str, f: _Facts, context: dict | None,
                error: errors.BlockcryptError | None = None) -> None:
        audit.append(self.conn, time=_iso_us(self._now()), operation=operation,
                     key_id=f.key_id, key_version=f.key_version,
                     context=context if isinstance(context, dict) else None,
                     result="refused" if error else "success",
                     error=f"{type(error).__name__}: {error.message}" if error else None,
                     details=f.details)

    # -- internals: KEK and material ---------------------------------------------
    def _unlock(self) -> None:
        """Derive the KEK from the passphrase (once) and check it against the verifier."""
        if self._kek is not None:
            return
        row = self.conn.execute("SELECT kdf, verifier, kek_generation FROM kms_store "
                                "WHERE id = 1").fetchone()
        params = kdf.KdfParams.from_json(row["kdf"])
        if self._passphrase_source is None:
            raise errors.PassphraseRequired()
        passphrase = self._passphrase_source()
        try:
            kek = kdf.derive_kek(passphrase, params)
        finally:
            passphrase.wipe()
        try:
            kdf.unseal(kek, row["verifier"], _verifier_ad(self.store_id)).wipe()
        except InvalidTag:
            kek.wipe()
            raise errors.WrongPassphrase(home=str(self.home.path)) from None
        self._kek, self._kek_generation = kek, row["kek_generation"]

    def _check_kek_current(self) -> None:
        gen = self.conn.execute("SELECT kek_generation FROM kms_store WHERE id = 1").fetchone()[0]
        if gen != self._kek_generation:
            self._kek.wipe()
            self._kek = None
            raise errors.PassphraseError(
                detail="the store passphrase was changed by another command while this one "
                       "ran; nothing was changed; run it again with the new passphrase")

    def _unseal(self, sealed: bytes, ad: bytes, what: str) -> Secret:
        try:
            return kdf.unseal(self._kek, sealed, ad)
        except InvalidTag:
            raise errors.CryptoError(
                detail=f"{what} failed authentication under the store passphrase; the key "
                       f"store database {self.home.db_path} was altered or damaged") from None

    def _material(self, key_id: str, version: int) -> Secret:
        row = self.conn.execute("SELECT material FROM kms_key_versions WHERE key_id = ? AND "
                                "version = ?", (key_id, version)).fetchone()
        if row is None or row["material"] is None:
            raise errors.CryptoError(detail=f"key {key_id} version {version} has no material")
        return self._unseal(row["material"], self._material_ad(key_id, version),
                            f"the material of key {key_id} version {version}")

    def _material_ad(self, key_id: str, version: int) -> bytes:
        return f"blockcrypt-kms/cmk-material/v1\0{self.store_id}\0{key_id}\0{version}".encode()

    def _import_ad(self, key_id: str) -> bytes:
        return f"blockcrypt-kms/import-wrapping-key/v1\0{self.store_id}\0{key_id}".encode()

    def _insert_key(self, f: _Facts, *, alias, description, origin, rotation_period_days,
                    service: bool = False) -> str:
        key_id = str(uuid.uuid4())
        t = _iso(self._now())
        state = ENABLED if origin == ORIGIN_BLOCKCRYPT else PENDING_IMPORT
        self.conn.execute(
            "INSERT INTO kms_keys (id, alias, description, state, origin, service, created_at,"
            " rotation_period_days, last_rotated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, alias, description, state, origin, int(service), t,
             rotation_period_days, t if origin == ORIGIN_BLOCKCRYPT else None))
        f.key_id = key_id
        if origin == ORIGIN_BLOCKCRYPT:
            f.key_version = self._add_version(key_id)
        return key_id

    def _add_version(self, key_id: str) -> int:
        """New random material as the key's newest version (inside a write transaction)."""
        version = self.conn.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM "
                                    "kms_key_versions WHERE key_id = ?", (key_id,)).fetchone()[0]
        t = _iso(self._now())
        with Secret.random(envelope.CMK_BYTES) as material:
            sealed = kdf.seal(self._kek, material.view(), self._material_ad(key_id, version))
        self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, material)"
                          " VALUES (?, ?, ?, ?)", (key_id, version, t, sealed))
        self.conn.execute("UPDATE kms_keys SET last_rotated_at = ? WHERE id = ?", (t, key_id))
        return version

    def _current_version(self, key_id: str) -> int | None:
        return self.conn.execute("SELECT MAX(version) FROM kms_key_versions WHERE key_id = ? "
                                 "AND material IS NOT NULL", (key_id,)).fetchone()[0]

    # -- internals: maintenance ------------------------------------------------------
    def _rotation_due(self, row) -> bool:
        return (row["state"] == ENABLED and row["origin"] == ORIGIN_BLOCKCRYPT
                and row["rotation_period_days"] is not None and row["last_rotated_at"] is not None
                and self._now() >= _parse_iso(row["last_rotated_at"])
                + timedelta(days=row["rotation_period_days"]))

    def _rotate_due(self) -> None:
        """Automatic rotation of keys whose period has passed (needs the KEK)."""
        rows = self.conn.execute("SELECT * FROM kms_keys WHERE rotation_period_days IS NOT NULL"
                                 " AND state = ?", (ENABLED,)).fetchall()
        for row in rows:
            if not self._rotation_due(row):
                continue
            with write_txn(self.conn):
                self._check_kek_current()
                row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?",
                                        (row["id"],)).fetchone()
                if not self._rotation_due(row):
                    continue  # another process rotated it meanwhile
                version = self._add_version(row["id"])
                self._append("rotate", _Facts(row["id"], version, {
                    "automatic": True, "new_version": version,
                    "rotation_period_days": row["rotation_period_days"]}), None)

    def _destroy_expired(self) -> None:
        """Erase the material of keys whose deletion window has passed (no KEK needed)."""
        rows = self.conn.execute("SELECT id, deletion_date FROM kms_keys WHERE state = ?",
                                 (PENDING_DELETION,)).fetchall()
        due = [r["id"] for r in rows if self._now() >= _parse_iso(r["deletion_date"])]
        for key_id in due:
            with write_txn(self.conn):
                row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?",
                                        (key_id,)).fetchone()
                if row["state"] != PENDING_DELETION or self._now() < _parse_iso(
                        row["deletion_date"]):
                    continue
                self.conn.execute("UPDATE kms_key_versions SET material = NULL WHERE key_id = ?",
                                  (key_id,))
                self.conn.execute("DELETE FROM kms_import WHERE key_id = ?", (key_id,))
                # The alias is freed with the key (as in KMS); the audit record keeps it.
                self.conn.execute("UPDATE kms_keys SET state = ?, destroyed_at = ?, alias = NULL"
                                  " WHERE id = ?", (DESTROYED, _iso(self._now()), key_id))
                self._append("destroy", _Facts(key_id, None, {
                    "automatic": True, "deletion_date": row["deletion_date"],
                    "alias": row["alias"]}), None)
        if due:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it, so replaced sealed material
        does not linger in the -wal file (best effort: readers may hold it)."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass

    # -- internals: lookups and checks -------------------------------------------------
    def _row(self, ref) -> sqlite3.Row:
        if not isinstance(ref, str) or not ref:
            raise errors.KeyNotFound(name=ref)
        row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?", (ref,)).fetchone()
        if row is None:
            row = self._find_alias(ref)
        if row is None:
            raise errors.KeyNotFound(name=ref)
        return row

    def _find_alias(self, alias: str) -> sqlite3.Row | None:
        return self.conn.execute("SELECT * FROM kms_keys WHERE alias = ?", (alias,)).fetchone()

    @staticmethod
    def _ref(row) -> str:
        return row["alias"] or row["id"]

    @staticmethod
    def _label(row) -> str:
        return f"{row['id']} (alias {row['alias']})" if row["alias"] else row["id"]

    def _state_error(self, row, action: str, next_step: str | None = None) -> errors.KeyStateError:
        r = self._ref(row)
        if next_step is None:
            next_step = {
                ENABLED: "it is Enabled already",
                DISABLED: f"run `blockcrypt key enable {r}` first",
                PENDING_DELETION:
                    f"it will be destroyed on {row['deletion_date']}; run `blockcrypt key "
                    f"cancel-deletion {r}` and `blockcrypt key enable {r}` to use it again",
                PENDING_IMPORT:
                    f"it has no key material yet; run `blockcrypt key get-import-params {r} "
                    f"--out-dir DIR`, then `blockcrypt key import {r} --material FILE "
                    "--token FILE`",
                DESTROYED:
                    f"its material was destroyed on {row['destroyed_at']}; data wrapped by it "
                    "cannot be recovered",
            }[row["state"]]
        return errors.KeyStateError(key_id=self._label(row), state=row["state"],
                                    detail=f"it cannot {action}; {next_step}")

    def _check_dependants(self, f: _Facts, row, force: bool, next_step: str) -> None:
        deps = catalog.key_dependants(self.conn, row["id"])
        if deps and not force:
            raise errors.KeyInUse(key_id=self._label(row), dependants=", ".join(deps),
                                  next_step=next_step)
        if deps:
            f.details.update(forced=True, dependants=deps)

    def _check_rotatable(self, row) -> None:
        if row["origin"] == ORIGIN_EXTERNAL:
            raise errors.KeyStateError(
                key_id=self._label(row), state="an imported key (origin external)",
                detail="imported keys cannot be rotated; to change material, create a new key "
                       "and move the data with `blockcrypt disk copy SRC DST`")
        if row["state"] != ENABLED:
            raise self._state_error(row, "be rotated")

    def _check_importable(self, row) -> None:
        if row["service"]:
            raise errors.ServiceKeyProtected(key_id=f"key {row['id']}", action="imported into")
        if row["origin"] != ORIGIN_EXTERNAL:
            raise errors.KeyStateError(
                key_id=self._label(row), state="a blockcrypt-generated key (origin blockcrypt)",
                detail="only keys made with `blockcrypt key create --origin external` take "
                       "imported material")
        if row["state"] == ENABLED or row["state"] == DISABLED:
            raise self._state_error(row, "take imported material",
                                    "its material was imported already and cannot be replaced")
        if row["state"] != PENDING_IMPORT:
            raise self._state_error(row, "take imported material")

    def _usable_blob(self, f: _Facts, wrapped, context, action: str) -> envelope.WrappedKey:
        parsed = envelope.parse_wrapped(wrapped)
        f.key_id, f.key_version = parsed.key_id, parsed.key_version
        envelope.canonical_context(context)
        row = self.conn.execute("SELECT * FROM kms_keys WHERE id = ?",
                                (parsed.key_id,)).fetchone()
        if row is None:
            raise errors.KeyNotFound(name=parsed.key_id)
        if row["state"] != ENABLED:
            raise self._state_error(row, action)
        exists = self.conn.execute("SELECT 1 FROM kms_key_versions WHERE key_id = ? AND "
                                   "version = ? AND material IS NOT NULL",
                                   (parsed.key_id, parsed.key_version)).fetchone()
        if exists is None:
            raise errors.UnwrapError(
                what=f"a blob wrapped by key {parsed.key_id} version {parsed.key_version}",
                reason="that key has no such version (the blob was altered)")
        return parsed

    # -- internals: presentation ---------------------------------------------------
    def _key_dict(self, row) -> dict:
        versions = [{"version": v["version"], "created_at": v["created_at"],
                     "destroyed": v["material"] is None}
                    for v in self.conn.execute(
                        "SELECT version, created_at, material FROM kms_key_versions "
                        "WHERE key_id = ? ORDER BY version", (row["id"],))]
        live = [v["version"] for v in versions if not v["destroyed"]]
        next_rotation = None
        if row["rotation_period_days"] and row["last_rotated_at"]:
            next_rotation = _iso(_parse_iso(row["last_rotated_at"])
                                 + timedelta(days=row["rotation_period_days"]))
        imp = self.conn.execute("SELECT expires_at FROM kms_import WHERE key_id = ?",
                                (row["id"],)).fetchone()
        return {
            "id": row["id"], "alias": row["alias"], "description": row["description"],
            "state": row["state"], "origin": row["origin"], "service": bool(row["service"]),
            "created_at": row["created_at"],
            "rotation_period_days": row["rotation_period_days"],
            "last_rotated_at": row["last_rotated_at"], "next_rotation_at": next_rotation,
            "deletion_date": row["deletion_date"], "destroyed_at": row["destroyed_at"],
            "current_version": max(live) if live else None,
            "versions": versions,
            "dependants": catalog.key_dependants(self.conn, row["id"]),
            "import_expires_at": imp["expires_at"] if imp else None,
        }


def _verifier_ad(store_id: str) -> bytes:
    return f"blockcrypt-kms/passphrase-verifier/v1\0{store_id}".encode()
