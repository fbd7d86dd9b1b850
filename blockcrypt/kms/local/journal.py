"""How every local-store operation runs: one write transaction with its audit record.

Owns :meth:`Journal.run`, the one way an operation changes the store: the
operation's ``work`` runs inside ``BEGIN IMMEDIATE`` together with the audit
record of its success, so a crash leaves the old or the new state and concurrent
CLI invocations serialise; a refusal (any :class:`~blockcrypt.errors.BlockcryptError`)
rolls that back and is recorded in a transaction of its own.  Operations that need
key material first run ``work`` as a dry check (no writes), so a refusal comes
before the passphrase is asked for; the slow KEK derivation then happens outside
the write lock.  :class:`Operations` is the base of the operation classes: the
parts of an open store (connection, vault, journal, rows, clock) they share.

Must not: know what any operation does; the operation modules (:mod:`.lifecycle`,
:mod:`.imports`, :mod:`.datakeys`, :mod:`.passphrase`) pass their ``work`` in.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, TypeVar

from ... import errors
from ...storage.db import write_txn
from .. import audit
from .backends import Backends
from .rows import KeyRows
from .rules import iso_us
from .vault import Vault

T = TypeVar("T")


@dataclass
class Facts:
    """What an operation learnt, for its audit record (filled in as it goes)."""

    key_id: str | None = None
    key_version: int | None = None
    details: dict = field(default_factory=dict)
    audit: bool = True
    needs_kek: bool = True
    """Set False by a dry run whose key's provider needs no store passphrase (pkcs11)."""


Work = Callable[[Facts, bool], T]
"""``work(facts, dry)``: with ``dry`` True only check (no writes, no KEK), else do it."""


class Journal:
    """Runs operations of one open store; ``after_unlock`` runs once the KEK is derived
    and before the operation's transaction (the store's automatic rotations)."""

    def __init__(self, conn: sqlite3.Connection, vault: Vault, now: Callable[[], datetime],
                 after_unlock: Callable[[], None],
                 provider_of: Callable[[str], str] = lambda key_id: "local"):
        self.conn = conn
        self._vault = vault
        self._now = now
        self._after_unlock = after_unlock
        self._provider_of = provider_of

    def run(self, operation: str, work: Work[T], *, context: dict | None = None,
            needs_kek: bool = False) -> T:
        """Run work in one write transaction with its audit record; audit refusals too.

        With needs_kek, work first runs as a dry check (dry=True, no writes), so a
        refusal comes before the passphrase is asked for; then the KEK is derived
        outside the write lock, and work runs for real inside the transaction.
        The dry run may clear ``facts.needs_kek`` (a key whose provider needs no
        passphrase): the check runs all the same, the passphrase is not asked for.
        """
        facts = Facts()
        try:
            if needs_kek:
                work(facts, True)
                needs_kek = facts.needs_kek
            if needs_kek:
                self._vault.unlock()
                self._after_unlock()
            with write_txn(self.conn):
                if needs_kek:
                    self._vault.check_current()
                result = work(facts, False)
                if facts.audit:
                    self.append(operation, facts, context)
            return result
        except errors.BlockcryptError as e:
            # The operation's own transaction was rolled back; record the refusal apart.
            self.refused(operation, facts, context, e)
            raise

    def refused(self, operation: str, facts: Facts, context: dict | None,
                error: errors.BlockcryptError) -> None:
        """Record a refusal in a transaction of its own."""
        with write_txn(self.conn):
            self.append(operation, facts, context, error=error)

    def append(self, operation: str, f: Facts, context: dict | None,
               error: errors.BlockcryptError | None = None) -> None:
        """One audit record (inside the caller's write transaction); a record about a key
        names the key's provider."""
        details = f.details
        if f.key_id is not None and "provider" not in details:
            details = {**details, "provider": self._provider_of(f.key_id)}
        audit.append(self.conn, time=iso_us(self._now()), operation=operation,
                     key_id=f.key_id, key_version=f.key_version,
                     context=context if isinstance(context, dict) else None,
                     result="refused" if error else "success",
                     error=f"{type(error).__name__}: {error.message}" if error else None,
                     details=details)


class Operations:
    """Base of the operation classes (:mod:`.lifecycle`, :mod:`.maintenance`,
    :mod:`.imports`, :mod:`.datakeys`): the parts of one open store they work with."""

    def __init__(self, conn: sqlite3.Connection, vault: Vault, journal: Journal,
                 rows: KeyRows, now: Callable[[], datetime], backends: Backends):
        self.conn = conn
        self._vault = vault
        self._journal = journal
        self._rows = rows
        self._now = now
        self._backends = backends
