"""The SQLite database shared by the key store, the audit trail and the disk catalog.

Opened in WAL mode with synchronous=FULL (a committed transaction survives a
crash), and every write runs inside ``BEGIN IMMEDIATE`` (see :func:`write_txn`)
so concurrent CLI invocations serialise on the write lock instead of failing
half-way.  Each subsystem registers its own DDL with :func:`register_schema`;
:func:`connect` applies them all (``CREATE TABLE IF NOT EXISTS``).

A damaged, full or unreadable database is an error of the tree naming the
database file and the next step, never a traceback: :func:`db_error` is the one
mapping from ``sqlite3.Error``, applied by :func:`connect`, :func:`write_txn`
and :func:`guarded` (the CLI's catch-all, which uses the path of the database
this process opened last, :func:`last_opened`).

This module owns the connection and the transaction discipline; the tables
belong to the modules that register them, and it must not query them.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sqlite3
from pathlib import Path

from .. import errors
from .home import private_umask

_SCHEMAS: list[tuple[str, str]] = []
BUSY_TIMEOUT_S = 60.0
# Modules that call register_schema at import; imported by connect() so every
# connection sees every table, whatever the caller imported first.
SCHEMA_MODULES = ("blockcrypt.storage.catalog", "blockcrypt.storage.persistent",
                  "blockcrypt.storage.stores",
                  "blockcrypt.kms.schema")

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xff).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR = 5, 6, 8, 10
SQLITE_CORRUPT, SQLITE_FULL, SQLITE_CANTOPEN, SQLITE_NOTADB = 11, 13, 14, 26

_NEXT_STEP = {
    SQLITE_BUSY: "another blockcrypt command held it too long; retry",
    SQLITE_LOCKED: "another blockcrypt command held it too long; retry",
    SQLITE_READONLY: "make the file, its -wal and -shm files and the home writable for "
                     "this user (or run as the home's owner), then retry",
    SQLITE_IOERR: "check the file system under the home (`dmesg`), then retry",
    SQLITE_CANTOPEN: "check that the home directory exists and this user may write it",
}
# Below this much free space a SQLite I/O error is taken for a full home: the WAL
# index (-shm) grows by 32 KiB, so less than twice that cannot be a coincidence.
FULL_BELOW_BYTES = 64 * 1024
_last_path: Path | None = None


class Database(sqlite3.Connection):
    """A connection that knows which file it opened (for error messages)."""

    path: Path


def register_schema(name: str, ddl: str) -> None:
    """Register DDL (idempotent statements) to apply on every connect."""
    if all(n != name for n, _ in _SCHEMAS):
        _SCHEMAS.append((name, ddl))


def db_error(path: os.PathLike | str | None, exc: sqlite3.Error) -> errors.BlockcryptError:
    """The user-facing error for a sqlite3 error on the database at path."""
    p = Path(path) if path is not None else Path("blockcrypt.db")
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    reason = str(exc) or type(exc).__name__
    if code == SQLITE_FULL or (code == SQLITE_IOERR and home_is_full(p.parent)):
        return errors.HomeFull(home=str(p.parent), what=str(p))
    if code in (SQLITE_CORRUPT, SQLITE_NOTADB) or (
            type(exc) is sqlite3.DatabaseError and not code):
        return errors.DatabaseDamaged(path=str(p), reason=reason)
    return errors.DatabaseUnusable(
        path=str(p), reason=reason,
        next_step=_NEXT_STEP.get(code, "retry; if it keeps failing, restore the database "
                                       "from a backup"))


def home_is_full(home: Path) -> bool:
    """Whether the file system of ``home`` has (almost) no space left for this user
    (SQLite reports a full disk while growing its -shm index as an I/O error)."""
    try:
        st = os.statvfs(home)
    except OSError:
        return False
    free_blocks = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    return free_blocks * st.f_frsize < FULL_BELOW_BYTES


@contextlib.contextmanager
def guarded(path: os.PathLike | str | None = None):
    """Turn any sqlite3.Error inside into :func:`db_error` (default path: :func:`last_opened`)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise db_error(path if path is not None else _last_path, exc) from None


def last_opened() -> Path | None:
    """The database this process opened last (for the CLI's catch-all)."""
    return _last_path


def connect(db_path: Path, create: bool = False) -> Database:
    """Open the database; with create=False a missing file raises FileNotFoundError.

    On a full home SQLite cannot create or grow the WAL index (``-shm``) that
    shared access needs, so the database is opened again in exclusive locking
    mode, which keeps that index in this process's memory: reads work (so
    `disk detach` can find what to stop), writes fail with HomeFull, and other
    blockcrypt processes wait for this one (busy timeout) meanwhile.
    """
    global _last_path
    for mod in SCHEMA_MODULES:
        importlib.import_module(mod)
    if not create and not Path(db_path).exists():
        raise FileNotFoundError(str(db_path))
    _last_path = Path(db_path)
    try:
        conn = _open(Path(db_path), exclusive=False)
    except errors.HomeFull:
        conn = _open(Path(db_path), exclusive=True)
    for suffix in ("", "-wal", "-shm"):
        p = Path(str(db_path) + suffix)
        if p.exists():
            os.chmod(p, 0o600)
    return conn


def _open(db_path: Path, *, exclusive: bool) -> Database:
    conn = None
    with guarded(db_path):
        try:
            with private_umask():
                conn = sqlite3.connect(str(db_path), timeout=BUSY_TIMEOUT_S,
                                       isolation_level=None,  # we manage transactions
                                       factory=Database)
            conn.path = db_path
            conn.row_factory = sqlite3.Row
            if exclusive:
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            with write_txn(conn):
                for _, ddl in _SCHEMAS:
                    for stmt in _split(ddl):
                        conn.execute(stmt)
        except BaseException:
            if conn is not None:
                conn.close()
            raise
    return conn


def _split(ddl: str) -> list[str]:
    return [s.strip() for s in ddl.split(";") if s.strip()]


@contextlib.contextmanager
def write_txn(conn: sqlite3.Connection):
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception; a sqlite3 error
    (a full disk at COMMIT, a damaged page) becomes :func:`db_error`."""
    with guarded(getattr(conn, "path", None)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(sqlite3.Error):   # e.g. SQLITE_FULL already rolled back
                conn.execute("ROLLBACK")
            raise
        else:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
