"""The local provider's tables in the shared SQLite database (DDL only).

``kms_store`` (one row: the store id, the KEK's Argon2id parameters and the
passphrase verifier), ``kms_keys`` (one row per CMK: alias, state, origin,
rotation, deletion), ``kms_key_versions`` (the sealed material of each version)
and ``kms_import`` (a pending BYOK import).  The text is exactly what homes have
been created with: existing homes depend on it, so it is not to be reformatted.
Registration with :mod:`blockcrypt.storage.db` is done by :mod:`blockcrypt.kms.schema`.
"""
from __future__ import annotations

STORE_FORMAT_VERSION = 1

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

