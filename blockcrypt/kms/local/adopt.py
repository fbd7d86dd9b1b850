"""Adopting a key this host did not create: the key of a disk brought from another host.

A ``kmip`` blob names everything needed to unwrap it on any host the key manager
authorises: the blockcrypt key id, the version and the server's uid of that
version (:mod:`blockcrypt.kms.envelope`, algorithm 3).  When ``disk import`` brings
a container whose key this catalog does not know, the key is added here with
origin ``shared``, state Enabled, in this host's kmip provider, with the version
the blob names; a later import under a newer version adds that version.  Whether
this host may *use* the key is the key manager's decision, made at unwrap time.

A shared key belongs to the host that created it: it cannot be rotated here, and
destroying it here only makes this catalog forget it (the server's objects stay;
see :mod:`.backends`).  Blobs of ``local`` or ``pkcs11`` keys cannot be adopted:
their material is in another host's store or token
(:class:`~blockcrypt.errors.KeyProviderUnknown`).

Must not: call the key manager (adoption is bookkeeping; unwrap asks it).
"""
from __future__ import annotations

from ... import errors
from .. import envelope
from ..kmip.config import KMIP
from .journal import Facts, Operations
from .rules import ENABLED, iso

ORIGIN_SHARED = "shared"
KINDS = {envelope.ALG_AES256GCM_DK64: "local", envelope.ALG_PKCS11_AES256GCM_DK64: "pkcs11",
         envelope.ALG_KMIP_AES256GCM_DK64: "kmip"}


class Adoption(Operations):
    """Makes the key of a blob known to this catalog (see the module doc)."""

    def adopt(self, wrapped: bytes, provider: str | None, what: str) -> dict:
        """The key that wrapped ``wrapped``, added to this catalog if it was not there."""
        def work(f: Facts, dry: bool):
            parsed = envelope.parse_wrapped(wrapped)
            f.key_id, f.key_version = parsed.key_id, parsed.key_version
            f.needs_kek = False
            row = self._rows.by_id(parsed.key_id)
            if row is not None and self._has_version(parsed):
                f.audit = False               # known already: nothing to record
                return parsed.key_id
            if parsed.algorithm != envelope.ALG_KMIP_AES256GCM_DK64:
                raise errors.KeyProviderUnknown(
                    what=what, key_id=parsed.key_id, kind=KINDS[parsed.algorithm],
                    next_step="its material is in the store or token of the host that made "
                              "it; copy the data on that host to a disk under a kmip key "
                              "(`blockcrypt disk copy SRC DST`) and import that disk")
            if row is not None:
                name = self._backends.provider_of(parsed.key_id)
            else:
                name = self._kmip_provider(parsed, provider, what)
            f.details = {"adopted": row is None, "provider": name, "what": what,
                         "server_uid": parsed.server_ref}
            if dry:
                return None
            now = iso(self._now())
            if row is None:
                self.conn.execute(
                    "INSERT INTO kms_keys (id, alias, description, state, origin, service, "
                    "created_at, rotation_period_days, last_rotated_at) VALUES "
                    "(?, NULL, ?, ?, ?, 0, ?, NULL, NULL)",
                    (parsed.key_id, f"adopted by `disk import` from {what}"[:256], ENABLED,
                     ORIGIN_SHARED, now))
                self.conn.execute("INSERT INTO kms_key_provider (key_id, provider) VALUES "
                                  "(?, ?)", (parsed.key_id, name))
            self.conn.execute("INSERT INTO kms_key_versions (key_id, version, created_at, "
                              "material) VALUES (?, ?, ?, ?)",
                              (parsed.key_id, parsed.key_version, now,
                               parsed.server_ref.encode("ascii")))
            return parsed.key_id

        key_id = self._journal.run("adopt", work, needs_kek=True)
        return self._rows.describe(self._rows.row(key_id))

    def _has_version(self, parsed: envelope.WrappedKey) -> bool:
        return self.conn.execute("SELECT 1 FROM kms_key_versions WHERE key_id = ? AND "
                                 "version = ?", (parsed.key_id, parsed.key_version)
                                 ).fetchone() is not None

    def _kmip_provider(self, parsed: envelope.WrappedKey, provider: str | None,
                       what: str) -> str:
        kmip = [r["name"] for r in self.conn.execute(
            "SELECT name FROM kms_providers WHERE type = ? ORDER BY name", (KMIP,))]
        if provider is not None:
            if provider not in kmip:
                raise errors.KeyProviderUnknown(
                    what=what, key_id=parsed.key_id, kind="kmip",
                    next_step=f"{provider!r} is not a kmip provider of this host (`blockcrypt "
                              "provider list`)")
            return provider
        if not kmip:
            raise errors.KeyProviderUnknown(
                what=what, key_id=parsed.key_id, kind="kmip",
                next_step="add this host's provider for the key manager that holds it "
                          "(`blockcrypt provider add NAME --type kmip --host H --port P --ca "
                          "FILE --cert FILE --key FILE`), then import again")
        if len(kmip) > 1:
            raise errors.InvalidInput(
                detail=f"{what}: this host has several kmip providers ({', '.join(kmip)}); "
                       "say which one holds its key with --provider NAME")
        return kmip[0]
