"""The key catalog's provider and import tables (DDL only), added beside the ``kms_*`` tables.

``kms_providers`` holds each configured key provider other than the built-in
``local`` one: its name, type and configuration as JSON (for ``pkcs11``: module
path, token label and the *path* of the PIN file, never the PIN).
``kms_key_provider`` says which provider holds a key's material; a key without a
row there is a ``local`` key.  Homes made before providers existed therefore need
no data migration: :func:`blockcrypt.storage.db.connect` creates these two tables
(``CREATE TABLE IF NOT EXISTS``) the first time such a home is opened, and every
existing key stays ``local`` (and any imported material has no expiry).

``kms_imported`` keeps, for a key whose material was imported (BYOK), the
material's key check value (:func:`blockcrypt.kms.backend.check_value`: only the
same material can be imported again) and when the imported material expires
(``key import --expires-at``; NULL: never).

For a key of a ``pkcs11`` provider, ``kms_key_versions.material`` holds the
CKA_ID of the version's token object (16 random bytes, not secret) instead of
sealed material; NULL still means "destroyed".
"""
from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS kms_providers (
    name        TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    config      TEXT NOT NULL,      -- JSON: where the provider is, never a PIN or passphrase
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS kms_key_provider (
    key_id      TEXT PRIMARY KEY REFERENCES kms_keys(id),
    provider    TEXT NOT NULL       -- a kms_providers name (kept for Destroyed keys)
);
CREATE TABLE IF NOT EXISTS kms_imported (
    key_id              TEXT PRIMARY KEY REFERENCES kms_keys(id),
    check_value         BLOB NOT NULL,  -- GCM tag under the material over a fixed label
    material_expires_at TEXT            -- NULL: the imported material does not expire
)
"""
