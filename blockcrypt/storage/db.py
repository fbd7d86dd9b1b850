"""The SQLite database shared by the key store, the audit trail and the disk catalog.

Opened in WAL mode with synchronous=FULL (a committed transaction survives a
crash), and every write runs inside ``BEGIN IMMEDIATE`` (see :func:`write_txn`)
so concurrent CLI invocations serialise on the write lock instead of failing
half-way.  Each subsystem registers its own DDL with :func:`register_schema`;
:func:`connect` applies them all (``CREATE TABLE IF NOT EXISTS``).

This module owns the connection and the transaction discipline; the tables
belong to the modules that register them, and it must not query them.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sqlite3
from pathlib import Path

from .home import private_umask

_SCHEMAS: list[tuple[str, str]] = []
BUSY_TIMEOUT_S = 60.0
# Modules that call register_schema at import; imported by connect() so every
# connection sees every table, whatever the caller imported first.
SCHEMA_MODULES = ("blockcrypt.storage.catalog", "blockcrypt.storage.persistent",
                  "blockcrypt.kms.schema")


def register_schema(name: str, ddl: str) -> None:
    """Register DDL (idempotent statements) to apply on every connect."""
    if all(n != name for n, _ in _SCHEMAS):
        _SCHEMAS.append((name, ddl))


def connect(db_path: Path, create: bool = False) -> sqlite3.Connection:
    """Open the database; with create=False a missing file raises FileNotFoundError."""
    for mod in SCHEMA_MODULES:
        importlib.import_module(mod)
    if not create and not Path(db_path).exists():
        raise FileNotFoundError(str(db_path))
    with private_umask():
        conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S,
                               isolation_level=None)  # we manage transactions
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    with write_txn(conn):
        for _, ddl in _SCHEMAS:
            for stmt in _split(ddl):
                conn.execute(stmt)
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            os.chmod(p, 0o600)
    return conn


def _split(ddl: str) -> list[str]:
    return [s.strip() for s in ddl.split(";") if s.strip()]


@contextlib.contextmanager
def write_txn(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")
