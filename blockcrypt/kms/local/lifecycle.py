"""The key state machine: creating keys and the state changes a user asks for.

States (names from :mod:`blockcrypt.kms.provider`)::

    create ───────────────> Enabled <──enable── Disabled
    create --origin external > PendingImport ──import──> Enabled   (see .imports)
    Enabled / Disabled / PendingImport ──schedule-deletion──> PendingDeletion
    PendingDeletion ──cancel-deletion──> Disabled (PendingImport if no material)
    PendingDeletion ──window passed──> Destroyed                    (see .maintenance)

The service key (alias ``blockcrypt/default``) is created on first use and cannot
be disabled, deleted or imported into.  Disabling or deleting a key that disks or
snapshots depend on is refused unless forced (the dependants come from the
injected callable, see :mod:`.rows`).

Must not: unwrap or wrap data keys, or open transactions other than through
:meth:`.journal.Journal.run` (each change is one transaction with its audit record).
"""
from __future__ import annotations

import uuid
from datetime import timedelta

from ... import errors
from ...testing.crashpoints import crashpoint
from ..backend import LOCAL
from .journal import Facts, Operations
from .rows import label, ref, state_error
from .rules import (
    DESTROYED,
    DISABLED,
    ENABLED,
    ORIGIN_BLOCKCRYPT,
    ORIGIN_EXTERNAL,
    ORIGINS,
    PENDING_DAYS_DEFAULT,
    PENDING_DAYS_MAX,
    PENDING_DAYS_MIN,
    PENDING_DELETION,
    PENDING_IMPORT,
    ROTATION_DAYS_MAX,
    ROTATION_DAYS_MIN,
    SERVICE_ALIAS,
    is_int,
    iso,
    validate_alias,
    validate_description,
)


class Lifecycle(Operations):
    """Creates keys and changes their state; every method returns the key's description."""

    def _get(self, ref_: str) -> dict:
        return self._rows.describe(self._rows.row(ref_))

    def create_key(self, alias: str | None = None, description: str | None = None,
                   origin: str = ORIGIN_BLOCKCRYPT,
                   rotation_period_days: int | None = None, provider: str = LOCAL) -> dict:
        """A new CMK: Enabled with version 1, or PendingImport for origin 'external'.
        Its material lives in ``provider`` (default: the built-in local store)."""
        def work(f: Facts, dry: bool):
            backend = self._backends.for_provider(provider)
            f.needs_kek = backend.needs_kek
            if alias is not None:
                validate_alias(alias)
            desc = validate_description(description)
            if origin not in ORIGINS:
                raise errors.InvalidInput(
                    detail=f"origin {origin!r} is not one of {', '.join(ORIGINS)}")
            if origin == ORIGIN_EXTERNAL and not backend.imports_material:
                raise errors.InvalidInput(
                    detail=f"key provider {provider!r} ({backend.type}) does not take imported "
                           "material; create the key without --origin external, or in a "
                           "provider that does (`blockcrypt provider list`)")
            if rotation_period_days is not None:
                if origin == ORIGIN_EXTERNAL:
                    raise errors.InvalidInput(
                        detail="imported keys cannot be rotated, so a rotation period "
                               "cannot be set with origin 'external'")
                if (not is_int(rotation_period_days)
                        or not ROTATION_DAYS_MIN <= rotation_period_days <= ROTATION_DAYS_MAX):
                    raise errors.InvalidInput(
                        detail=f"the rotation period must be {ROTATION_DAYS_MIN}.."
                               f"{ROTATION_DAYS_MAX} days, got {rotation_period_days!r}")
            if alias is not None and self._rows.find_alias(alias) is not None:
                raise errors.AlreadyExists(what="key alias", name=alias)
            f.details = {"alias": alias, "origin": origin,
                         "rotation_period_days": rotation_period_days, "provider": provider}
            if dry:
                return None
            return self._insert_key(f, alias=alias, description=desc, origin=origin,
                                    rotation_period_days=rotation_period_days,
                                    provider=provider)

        key_id = self._journal.run("create", work, needs_kek=(origin == ORIGIN_BLOCKCRYPT))
        return self._get(key_id)

    def default_key(self) -> dict:
        """The service key (alias blockcrypt/default), created on first use."""
        row = self._rows.find_alias(SERVICE_ALIAS)
        if row is not None:
            return self._rows.describe(row)

        def work(f: Facts, dry: bool):
            existing = self._rows.find_alias(SERVICE_ALIAS)
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

        return self._get(self._journal.run("create", work, needs_kek=True))

    def enable(self, ref_: str) -> dict:
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            if row["state"] == ENABLED:
                f.details["unchanged"] = True
                return
            if row["state"] != DISABLED:
                raise state_error(row, "be enabled")
            self.conn.execute("UPDATE kms_keys SET state = ? WHERE id = ?", (ENABLED, row["id"]))

        self._journal.run("enable", work)
        return self._get(ref_)

    def disable(self, ref_: str, force: bool = False) -> dict:
        """Enabled -> Disabled; refused for the service key and, unless forced, keys in use."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            if row["service"]:
                raise errors.ServiceKeyProtected(key_id=f"key {row['id']}", action="disabled")
            if row["state"] == DISABLED:
                f.details["unchanged"] = True
                return
            if row["state"] == PENDING_DELETION:
                raise state_error(
                    row, "be disabled",
                    f"it is already unusable and will be destroyed on {row['deletion_date']}; "
                    f"run `blockcrypt key cancel-deletion {ref(row)}` to keep it "
                    "(it then stays Disabled)")
            if row["state"] != ENABLED:
                raise state_error(row, "be disabled")
            self._check_dependants(f, row, force, "they cannot be attached while it is "
                                   "disabled; pass --force to disable it anyway")
            self.conn.execute("UPDATE kms_keys SET state = ? WHERE id = ?",
                              (DISABLED, row["id"]))

        self._journal.run("disable", work)
        return self._get(ref_)

    def schedule_deletion(self, ref_: str, pending_days: int = PENDING_DAYS_DEFAULT,
                          force: bool = False) -> dict:
        """Any live key -> PendingDeletion; material is destroyed once the window passes."""
        def work(f: Facts, dry: bool):
            if (not is_int(pending_days)
                    or not PENDING_DAYS_MIN <= pending_days <= PENDING_DAYS_MAX):
                raise errors.InvalidInput(
                    detail=f"the pending window must be {PENDING_DAYS_MIN}..{PENDING_DAYS_MAX} "
                           f"days, got {pending_days!r}")
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            if row["service"]:
                raise errors.ServiceKeyProtected(key_id=f"key {row['id']}",
                                                 action="scheduled for deletion")
            if row["state"] == PENDING_DELETION:
                raise state_error(
                    row, "be scheduled for deletion again",
                    f"it is already scheduled for deletion on {row['deletion_date']}; run "
                    f"`blockcrypt key cancel-deletion {ref(row)}` to keep it")
            if row["state"] == DESTROYED:
                raise state_error(row, "be scheduled for deletion")
            self._check_dependants(
                f, row, force, "their data becomes unreadable once the key is destroyed; move "
                "it to disks under another key with `blockcrypt disk copy SRC DST` first, or "
                "pass --force to schedule the deletion anyway")
            deletion_date = iso(self._now() + timedelta(days=pending_days))
            f.details.update(pending_days=pending_days, deletion_date=deletion_date,
                             previous_state=row["state"])
            self.conn.execute("UPDATE kms_keys SET state = ?, deletion_date = ? WHERE id = ?",
                              (PENDING_DELETION, deletion_date, row["id"]))

        self._journal.run("schedule-deletion", work)
        return self._get(ref_)

    def cancel_deletion(self, ref_: str) -> dict:
        """PendingDeletion -> Disabled (or PendingImport if it never had material)."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            if row["state"] != PENDING_DELETION:
                raise state_error(
                    row, "have its deletion cancelled",
                    None if row["state"] == DESTROYED else "it is not scheduled for deletion")
            new_state = DISABLED if self._vault.current_version(row["id"]) else PENDING_IMPORT
            f.details["new_state"] = new_state
            self.conn.execute("UPDATE kms_keys SET state = ?, deletion_date = NULL WHERE id = ?",
                              (new_state, row["id"]))

        self._journal.run("cancel-deletion", work)
        return self._get(ref_)

    def rotate(self, ref_: str) -> dict:
        """Add a key version; new wraps use it, older versions still unwrap."""
        def work(f: Facts, dry: bool):
            row = self._rows.row(ref_)
            f.key_id = row["id"]
            self._check_rotatable(row)
            f.needs_kek = self._backends.for_key(row["id"]).needs_kek
            if dry:
                return
            f.key_version = self._backends.add_version(row["id"], self._now())
            f.details["new_version"] = f.key_version
            crashpoint("rotate:before-commit")

        self._journal.run("rotate", work, needs_kek=True)
        return self._get(ref_)

    # -- internals -----------------------------------------------------------------
    def _insert_key(self, f: Facts, *, alias, description, origin, rotation_period_days,
                    service: bool = False, provider: str = LOCAL) -> str:
        key_id = str(uuid.uuid4())
        t = iso(self._now())
        state = ENABLED if origin == ORIGIN_BLOCKCRYPT else PENDING_IMPORT
        self.conn.execute(
            "INSERT INTO kms_keys (id, alias, description, state, origin, service, created_at,"
            " rotation_period_days, last_rotated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, alias, description, state, origin, int(service), t,
             rotation_period_days, t if origin == ORIGIN_BLOCKCRYPT else None))
        f.key_id = key_id
        if provider != LOCAL:
            self.conn.execute("INSERT INTO kms_key_provider (key_id, provider) VALUES (?, ?)",
                              (key_id, provider))
        if origin == ORIGIN_BLOCKCRYPT:
            f.key_version = self._backends.add_version(key_id, self._now())
        return key_id

    def _check_dependants(self, f: Facts, row, force: bool, next_step: str) -> None:
        deps = self._rows.dependants(row["id"])
        if deps and not force:
            raise errors.KeyInUse(key_id=label(row), dependants=", ".join(deps),
                                  next_step=next_step)
        if deps:
            f.details.update(forced=True, dependants=deps)

    @staticmethod
    def _check_rotatable(row) -> None:
        if row["origin"] == "shared":        # adopted by `disk import` (see .adopt)
            raise errors.KeyStateError(
                key_id=label(row), state="a key shared from another host (origin shared)",
                detail="only the host that created it rotates it; import a disk wrapped by the "
                       "new version to use that version here")
        if row["origin"] == ORIGIN_EXTERNAL:
            raise errors.KeyStateError(
                key_id=label(row), state="an imported key (origin external)",
                detail="imported keys cannot be rotated; to change material, create a new key "
                       "and move the data with `blockcrypt disk copy SRC DST`")
        if row["state"] != ENABLED:
            raise state_error(row, "be rotated")
