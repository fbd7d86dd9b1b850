"""Envelope operations: generate, decrypt and re-encrypt data keys under a CMK.

The blob format and the AES-256-GCM wrap are :mod:`blockcrypt.kms.envelope`; this
module decides which key version wraps (the newest with material), checks that
the key is Enabled and that a blob names a version that exists, and audits each
use with its encryption context.  CMK material is unsealed only for the one wrap
or unwrap and wiped at once; the data key goes to the caller, who wipes it.

Must not: change a key's state, or return CMK material.
"""
from __future__ import annotations

from ... import errors
from ...crypto.secret import Secret
from .. import envelope
from .journal import Facts, Operations
from .rows import state_error
from .rules import ENABLED


class DataKeys(Operations):
    """Wraps, unwraps and re-wraps data keys (see the module doc)."""

    def generate(self, key_ref: str, context: dict[str, str]) -> tuple[Secret, bytes]:
        """A fresh 64-byte DK and its blob wrapped by the key's newest version.

        The caller owns the returned Secret and must wipe it.
        """
        def work(f: Facts, dry: bool):
            envelope.canonical_context(context)
            row = self._rows.row(key_ref)
            f.key_id = row["id"]
            if row["state"] != ENABLED:
                raise state_error(row, "wrap a new data key")
            backend = self._backends.for_key(row["id"])
            f.needs_kek = backend.needs_kek
            f.key_version = self._vault.current_version(row["id"])
            if dry:
                return None
            ref = self._backends.ref(row["id"], f.key_version)
            dk = envelope.new_data_key()
            try:
                return dk, backend.wrap(row["id"], f.key_version, ref, dk, context)
            except BaseException:
                dk.wipe()
                raise

        return self._journal.run("generate", work, context=context, needs_kek=True)

    def decrypt(self, wrapped: bytes, context: dict[str, str]) -> Secret:
        """Unwrap a blob (any version of its key) if the context matches exactly."""
        def work(f: Facts, dry: bool):
            parsed = self._usable_blob(f, wrapped, context, "unwrap a data key")
            if dry:
                return None
            return self._backends.for_key(parsed.key_id).unwrap(
                parsed, self._backends.ref(parsed.key_id, parsed.key_version), context)

        return self._journal.run("decrypt", work, context=context, needs_kek=True)

    def reencrypt(self, wrapped: bytes, old_context: dict[str, str],
                  new_context: dict[str, str]) -> bytes:
        """Re-wrap a blob's DK under the key's newest version, bound to new_context."""
        def work(f: Facts, dry: bool):
            parsed = self._usable_blob(f, wrapped, old_context, "re-wrap a data key")
            envelope.canonical_context(new_context)
            f.details = {"from_version": parsed.key_version, "old_context": old_context}
            new_version = self._vault.current_version(parsed.key_id)
            if dry:
                return None
            backend, ids = self._backends.for_key(parsed.key_id), self._backends
            dk = backend.unwrap(parsed, ids.ref(parsed.key_id, parsed.key_version), old_context)
            with dk:
                blob = backend.wrap(parsed.key_id, new_version,
                                    ids.ref(parsed.key_id, new_version), dk, new_context)
            f.key_version = new_version
            return blob

        return self._journal.run("reencrypt", work, context=new_context, needs_kek=True)

    def _usable_blob(self, f: Facts, wrapped, context, action: str) -> envelope.WrappedKey:
        parsed = envelope.parse_wrapped(wrapped)
        f.key_id, f.key_version = parsed.key_id, parsed.key_version
        envelope.canonical_context(context)
        row = self._rows.by_id(parsed.key_id)
        if row is None:
            raise errors.KeyNotFound(name=parsed.key_id)
        if row["state"] != ENABLED:
            raise state_error(row, action)
        f.needs_kek = self._backends.for_key(parsed.key_id).needs_kek
        exists = self.conn.execute("SELECT 1 FROM kms_key_versions WHERE key_id = ? AND "
                                   "version = ? AND material IS NOT NULL",
                                   (parsed.key_id, parsed.key_version)).fetchone()
        if exists is None:
            raise errors.UnwrapError(
                what=f"a blob wrapped by key {parsed.key_id} version {parsed.key_version}",
                reason="that key has no such version (the blob was altered)")
        return parsed
