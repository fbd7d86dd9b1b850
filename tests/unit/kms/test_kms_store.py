"""The key catalog (blockcrypt/kms/local/): states, refusals, rotation, deletion, passphrase.

Tests that take ``new_key`` (or ``provider_name``) run once per key provider: keys
whose material is in the local store, keys held by a real SoftHSM2 token over
PKCS#11 and keys held by a real PyKMIP server over KMIP, with the same assertions (the states and refusals are shared code).
"""
from __future__ import annotations

import functools
import sqlite3
from datetime import timedelta

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import kdf, parse_wrapped
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage import catalog
from blockcrypt.storage.home import Home

from support.clock import Clock
from support.providers import material_objects, provider_spec

PASS = b"correct horse battery staple"
CTX = {"uid": "aa" * 16, "cipher": "aes-xts-plain64", "sector_size": "4096"}


def source(passphrase: bytes = PASS):
    return lambda: Secret(passphrase)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_home(tmp_path, clock) -> Home:
    h = Home(tmp_path / "home")
    assert KeyStore.init(h, Secret(PASS), now=clock) is True
    return h


@pytest.fixture
def ks(store_home, clock):
    s = KeyStore.open(store_home, source(), now=clock, dependants=catalog.key_dependants)
    yield s
    s.close()


def key_maker(ks: KeyStore, provider_name: str, request) -> functools.partial:
    """``ks.create_key`` with the key's material in ``provider_name`` (added to the store
    on the session's SoftHSM2 token the first time)."""
    if provider_name != "local" and all(p["name"] != provider_name
                                        for p in ks.list_providers()):
        type_, options = provider_spec(request, provider_name)
        ks.add_provider(provider_name, type_, **options)
    return functools.partial(ks.create_key, provider=provider_name)


@pytest.fixture
def new_key(ks, provider_name, request):
    """Create a key in each provider in turn (the test runs once per provider)."""
    return key_maker(ks, provider_name, request)


def key_tables(home: Home) -> dict:
    conn = sqlite3.connect(home.db_path)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("kms_store", "kms_keys", "kms_key_versions", "kms_import")}
    finally:
        conn.close()


def last_record(ks: KeyStore) -> dict:
    return ks.audit_records()[-1]


def add_dependants(ks: KeyStore, key_id: str) -> None:
    ks.conn.execute("INSERT INTO disks (id, name, path, size_bytes, sector_size, encrypted, "
                    "cmk_id, created_at) VALUES ('d1', 'db', '/x', 4096, 4096, 1, ?, 'now')",
                    (key_id,))
    ks.conn.execute("INSERT INTO snapshots (id, name, disk_name, path, size_bytes, sector_size,"
                    " encrypted, cmk_id, created_at) VALUES ('s1', 'db-snap', 'db', '/y', 4096,"
                    " 4096, 1, ?, 'now')", (key_id,))


# -- the store itself -----------------------------------------------------------

def test_init_twice_changes_nothing(store_home, clock):
    before = key_tables(store_home)
    assert KeyStore.init(store_home, Secret(b"another passphrase"), now=clock) is False
    assert key_tables(store_home) == before


def test_open_without_a_store_says_to_run_init(tmp_path):
    with pytest.raises(errors.StoreNotFound, match="blockcrypt init"):
        KeyStore.open(Home(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_a_database_without_a_key_store_is_not_a_store(tmp_path):
    from blockcrypt.storage import db
    h = Home(tmp_path / "h")
    h.create_dirs()
    db.connect(h.db_path, create=True).close()  # e.g. made by the catalog alone
    with pytest.raises(errors.StoreNotFound):
        KeyStore.open(h)


def test_a_store_from_a_newer_blockcrypt_is_refused(store_home):
    conn = sqlite3.connect(store_home.db_path)
    conn.execute("UPDATE kms_store SET format_version = 2")
    conn.commit()
    conn.close()
    with pytest.raises(errors.StateError, match="upgrade blockcrypt"):
        KeyStore.open(store_home)


def test_stored_kdf_parameters_are_recorded_and_weak_only_under_the_test_switch(store_home,
                                                                               monkeypatch):
    conn = sqlite3.connect(store_home.db_path)
    params = kdf.KdfParams.from_json(conn.execute("SELECT kdf FROM kms_store").fetchone()[0])
    conn.close()
    assert params.test_only_weak is True  # conftest sets the test-only switch
    assert len(params.salt) == kdf.SALT_BYTES
    monkeypatch.delenv(kdf.WEAK_KDF_ENV)
    strong = kdf.new_params()
    assert not strong.test_only_weak
    assert strong.memory_cost_kib >= 64 * 1024 and strong.iterations >= 3


# -- creating keys ----------------------------------------------------------------

def test_create_key_states_and_versions(ks):
    k = ks.create_key(alias="db-key", description="database disks")
    assert (k["state"], k["origin"], k["current_version"]) == ("Enabled", "blockcrypt", 1)
    assert [v["version"] for v in k["versions"]] == [1]
    assert ks.get_key("db-key") == ks.get_key(k["id"]) == k
    ext = ks.create_key(origin="external")
    assert (ext["state"], ext["versions"], ext["current_version"]) == ("PendingImport", [], None)
    assert [x["id"] for x in ks.list_keys()] == [k["id"], ext["id"]]
    rec = last_record(ks)
    assert (rec["operation"], rec["key_id"], rec["result"]) == ("create", ext["id"], "success")


@pytest.mark.parametrize("kwargs, error", [
    ({"alias": ""}, errors.InvalidInput),
    ({"alias": "a" * 65}, errors.InvalidInput),
    ({"alias": ".hidden"}, errors.InvalidInput),
    ({"alias": "/abs"}, errors.InvalidInput),
    ({"alias": "with space"}, errors.InvalidInput),
    ({"alias": "nul\0"}, errors.InvalidInput),
    ({"alias": "alias/db"}, errors.InvalidInput),
    ({"alias": "blockcrypt/default"}, errors.InvalidInput),
    ({"alias": "BlockCrypt/mine"}, errors.InvalidInput),
    ({"alias": "123e4567-e89b-42d3-a456-426614174000"}, errors.InvalidInput),
    ({"description": "two\nlines"}, errors.InvalidInput),
    ({"description": "x" * 257}, errors.InvalidInput),
    ({"origin": "aws"}, errors.InvalidInput),
    ({"rotation_period_days": 89}, errors.InvalidInput),
    ({"rotation_period_days": 2561}, errors.InvalidInput),
    ({"rotation_period_days": True}, errors.InvalidInput),
    ({"origin": "external", "rotation_period_days": 90}, errors.InvalidInput),
])
def test_create_key_refusals_are_audited_and_change_nothing(ks, store_home, kwargs, error):
    before = key_tables(store_home)
    with pytest.raises(error):
        ks.create_key(**kwargs)
    assert key_tables(store_home) == before
    rec = last_record(ks)
    assert (rec["operation"], rec["result"]) == ("create", "refused")
    assert rec["error"].startswith(error.__name__)


def test_aliases_are_unique_and_allow_slashes(ks):
    ks.create_key(alias="team/db_1.v2")
    with pytest.raises(errors.AlreadyExists, match="team/db_1.v2"):
        ks.create_key(alias="team/db_1.v2")
    assert len(ks.list_keys()) == 1


def test_unknown_keys_are_not_found_everywhere(ks):
    for op in (ks.get_key, ks.enable, ks.disable, ks.schedule_deletion, ks.cancel_deletion,
               ks.rotate, ks.get_import_params, ks.check_usable):
        with pytest.raises(errors.KeyNotFound, match="nope"):
            op("nope")
    with pytest.raises(errors.KeyNotFound):
        ks.generate_data_key("nope", CTX)
    with pytest.raises(errors.KeyNotFound):
        ks.import_material("nope", b"", "token")


# -- state transitions ----------------------------------------------------------------

def test_every_transition_of_a_generated_key(ks, new_key, clock):
    k = new_key(alias="k")
    dk, blob = ks.generate_data_key("k", CTX)
    assert ks.disable("k")["state"] == "Disabled"
    assert ks.disable("k")["state"] == "Disabled"            # idempotent
    assert ks.enable("k")["state"] == "Enabled"
    assert ks.enable("k")["state"] == "Enabled"              # idempotent
    for from_state in ("Enabled", "Disabled"):
        if from_state == "Disabled":
            ks.disable("k")
        pending = ks.schedule_deletion("k", pending_days=7)
        assert pending["state"] == "PendingDeletion"
        assert pending["deletion_date"] == (clock() + timedelta(days=7)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        # Cancelling brings the key back Disabled, whatever it was before (as in KMS).
        back = ks.cancel_deletion("k")
        assert (back["state"], back["deletion_date"]) == ("Disabled", None)
        ks.enable("k")
    with ks.decrypt_data_key(blob, CTX) as again:
        assert again == dk
    assert [r["operation"] for r in ks.audit_records(key=k["id"])] == [
        "create", "generate", "disable", "disable", "enable", "enable",
        "schedule-deletion", "cancel-deletion", "enable", "disable",
        "schedule-deletion", "cancel-deletion", "enable", "decrypt"]


def test_pending_import_key_transitions(ks):
    ks.create_key(alias="ext", origin="external")
    assert ks.schedule_deletion("ext")["state"] == "PendingDeletion"
    assert ks.cancel_deletion("ext")["state"] == "PendingImport"   # no material: back to import


def _assert_state_error(call, *fragments):
    with pytest.raises(errors.KeyStateError) as ei:
        call()
    for f in fragments:
        assert f in ei.value.message, ei.value.message
    return ei.value


def test_disabled_and_pending_deletion_keys_wrap_and_unwrap_nothing(ks, new_key):
    new_key(alias="k")
    dk, blob = ks.generate_data_key("k", CTX)
    ks.disable("k")
    _assert_state_error(lambda: ks.generate_data_key("k", CTX), "Disabled",
                        "blockcrypt key enable k")
    _assert_state_error(lambda: ks.decrypt_data_key(blob, CTX), "Disabled")
    _assert_state_error(lambda: ks.reencrypt_data_key(blob, CTX, CTX), "Disabled")
    _assert_state_error(lambda: ks.rotate("k"), "Disabled")
    _assert_state_error(lambda: ks.check_usable("k"), "Disabled")
    _assert_state_error(lambda: ks.cancel_deletion("k"), "not scheduled for deletion")
    ks.schedule_deletion("k", pending_days=30)
    for call in (lambda: ks.generate_data_key("k", CTX), lambda: ks.decrypt_data_key(blob, CTX),
                 lambda: ks.rotate("k"), lambda: ks.check_usable("k"),
                 lambda: ks.enable("k")):
        _assert_state_error(call, "PendingDeletion", "blockcrypt key cancel-deletion k")
    _assert_state_error(lambda: ks.disable("k"), "PendingDeletion", "cancel-deletion")
    _assert_state_error(lambda: ks.schedule_deletion("k"), "already scheduled")
    refused = [r for r in ks.audit_records() if r["result"] == "refused"]
    assert len(refused) == 13
    assert {r["operation"] for r in refused} == {
        "generate", "decrypt", "reencrypt", "rotate", "check-usable", "cancel-deletion",
        "enable", "disable", "schedule-deletion"}


def test_pending_import_keys_refuse_use(ks):
    ks.create_key(alias="ext", origin="external")
    for call in (lambda: ks.generate_data_key("ext", CTX), lambda: ks.enable("ext"),
                 lambda: ks.disable("ext"), lambda: ks.check_usable("ext")):
        _assert_state_error(call, "PendingImport", "get-import-params ext")
    _assert_state_error(lambda: ks.rotate("ext"), "imported keys cannot be rotated")


@pytest.mark.parametrize("days", [0, 6, 31, -1, "7", None])
def test_pending_days_must_be_7_to_30(ks, days):
    ks.create_key(alias="k")
    with pytest.raises(errors.InvalidInput, match="7..30"):
        ks.schedule_deletion("k", pending_days=days)
    assert ks.get_key("k")["state"] == "Enabled"


def test_dependants_block_disable_and_deletion_unless_forced(ks, new_key):
    k = new_key(alias="k")
    add_dependants(ks, k["id"])
    assert ks.get_key("k")["dependants"] == ["disk db", "snapshot db-snap"]
    for call in (lambda: ks.disable("k"), lambda: ks.schedule_deletion("k")):
        with pytest.raises(errors.KeyInUse) as ei:
            call()
        assert "disk db, snapshot db-snap" in ei.value.message
        assert "--force" in ei.value.message
    assert ks.get_key("k")["state"] == "Enabled"
    assert ks.disable("k", force=True)["state"] == "Disabled"
    assert last_record(ks)["details"]["dependants"] == ["disk db", "snapshot db-snap"]
    assert ks.schedule_deletion("k", force=True)["state"] == "PendingDeletion"


def test_the_service_key(ks):
    svc = ks.default_key()
    assert (svc["alias"], svc["service"], svc["state"]) == ("blockcrypt/default", True, "Enabled")
    assert ks.default_key()["id"] == svc["id"]
    assert [r["operation"] for r in ks.audit_records(key=svc["id"])] == ["create"]
    for call, action in ((lambda: ks.disable(svc["id"], force=True), "disabled"),
                         (lambda: ks.schedule_deletion("blockcrypt/default", force=True),
                          "scheduled for deletion"),
                         (lambda: ks.get_import_params(svc["id"]), "imported into"),
                         (lambda: ks.import_material(svc["id"], b"x", "t"), "imported into")):
        with pytest.raises(errors.ServiceKeyProtected, match=action):
            call()
    assert ks.get_key(svc["id"])["state"] == "Enabled"
    assert ks.rotate("blockcrypt/default")["current_version"] == 2  # rotation is allowed
    dk, blob = ks.generate_data_key("blockcrypt/default", CTX)
    assert parse_wrapped(blob).key_id == svc["id"]


# -- envelope operations -----------------------------------------------------------------

def test_data_keys_round_trip_and_are_bound_to_the_context(ks, new_key):
    new_key(alias="k")
    dk, blob = ks.generate_data_key("k", CTX)
    assert len(dk) == 64 and dk.view()[:32] != dk.view()[32:]
    assert "redacted" in repr(dk)
    dk2, blob2 = ks.generate_data_key("k", CTX)
    assert dk != dk2 and blob != blob2
    with ks.decrypt_data_key(blob, CTX) as got:
        assert got == dk
    with pytest.raises(errors.UnwrapError):
        ks.decrypt_data_key(blob, {**CTX, "uid": "bb" * 16})
    rec = last_record(ks)
    assert (rec["operation"], rec["result"], rec["context"]) == (
        "decrypt", "refused", {**CTX, "uid": "bb" * 16})
    with pytest.raises(errors.BlobFormatError):
        ks.decrypt_data_key(blob[:-1], CTX)


def test_tampered_blob_fields_are_refused(ks, new_key):
    a = new_key(alias="a")
    b = new_key(alias="b")
    ks.rotate("a")
    dk, blob = ks.generate_data_key("a", CTX)          # version 2 of a
    at = 7 + len(a["id"])                              # the key version field (envelope.py)
    assert parse_wrapped(blob).key_version == int.from_bytes(blob[at:at + 4], "big") == 2

    def version(n: int) -> bytes:
        return blob[:at] + n.to_bytes(4, "big") + blob[at + 4:]
    # Point the blob at version 1 of the same key, or at another key (same id length).
    v1 = version(1)
    other = blob.replace(a["id"].encode(), b["id"].encode())
    for bad in (v1, other, blob[:-1] + bytes([blob[-1] ^ 1])):
        with pytest.raises(errors.UnwrapError):
            ks.decrypt_data_key(bad, CTX)
    no_such_version = version(9)
    with pytest.raises(errors.UnwrapError, match="no such version"):
        ks.decrypt_data_key(no_such_version, CTX)
    with pytest.raises(errors.KeyNotFound):
        ks.decrypt_data_key(blob.replace(a["id"].encode(), b"0" * 36), CTX)


def test_rotation_keeps_old_versions_unwrapping(ks, new_key):
    new_key(alias="k")
    wrapped = []
    for expected_version in (1, 2, 3):
        dk, blob = ks.generate_data_key("k", CTX)
        assert parse_wrapped(blob).key_version == expected_version
        wrapped.append((dk, blob))
        if expected_version < 3:
            assert ks.rotate("k")["current_version"] == expected_version + 1
    key = ks.get_key("k")
    assert [v["version"] for v in key["versions"]] == [1, 2, 3]
    for dk, blob in wrapped:
        with ks.decrypt_data_key(blob, CTX) as got:
            assert got == dk
    # Re-encrypting moves an old blob to the newest version and a new context.
    new_ctx = {**CTX, "uid": "cc" * 16}
    moved = ks.reencrypt_data_key(wrapped[0][1], CTX, new_ctx)
    assert parse_wrapped(moved).key_version == 3
    with ks.decrypt_data_key(moved, new_ctx) as got:
        assert got == wrapped[0][0]
    with pytest.raises(errors.UnwrapError):
        ks.decrypt_data_key(moved, CTX)
    with pytest.raises(errors.UnwrapError):
        ks.reencrypt_data_key(wrapped[0][1], new_ctx, CTX)   # wrong old context


def test_automatic_rotation_after_the_period(store_home, clock, provider_name, request):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        create = key_maker(ks, provider_name, request)
        create(alias="auto", rotation_period_days=90)
        create(alias="off", rotation_period_days=90)
        ks.disable("off")
        create(alias="manual")
    clock.advance(days=89, hours=23)
    with KeyStore.open(store_home, source(), now=clock) as ks:
        assert parse_wrapped(ks.generate_data_key("auto", CTX)[1]).key_version == 1
    clock.advance(days=300)   # several periods: one rotation, not three
    with KeyStore.open(store_home, source(), now=clock) as ks:
        assert parse_wrapped(ks.generate_data_key("auto", CTX)[1]).key_version == 2
        assert ks.get_key("off")["current_version"] == 1          # disabled: not rotated
        assert ks.get_key("manual")["current_version"] == 1
        auto = ks.get_key("auto")
        assert auto["next_rotation_at"] == (clock() + timedelta(days=90)).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        rotations = [r for r in ks.audit_records(key="auto") if r["operation"] == "rotate"]
        assert len(rotations) == 1 and rotations[0]["details"]["automatic"] is True


def test_automatic_rotation_waits_for_the_passphrase(store_home, clock):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        ks.create_key(alias="auto", rotation_period_days=90)
    clock.advance(days=91)
    with KeyStore.open(store_home, None, now=clock) as ks:   # e.g. `key list`: no passphrase
        assert ks.get_key("auto")["current_version"] == 1
    with KeyStore.open(store_home, source(), now=clock) as ks:
        ks.generate_data_key("auto", CTX)
        assert ks.get_key("auto")["current_version"] == 2


# -- deletion window -----------------------------------------------------------------------

def test_material_is_destroyed_only_after_the_window(store_home, clock, provider_name,
                                                      request):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        k = key_maker(ks, provider_name, request)(alias="doomed")
        ks.rotate("doomed")
        dk, blob = ks.generate_data_key("doomed", CTX)
        ks.schedule_deletion("doomed", pending_days=7)
    sealed = [r[0] for r in sqlite3.connect(store_home.db_path).execute(
        "SELECT material FROM kms_key_versions WHERE key_id = ?", (k["id"],))]
    assert len(sealed) == 2
    if provider_name != "local":      # the material is two objects in the provider until then
        assert [material_objects(request, provider_name, ref) for ref in sealed] == [1, 1]
    clock.advance(days=6, hours=23, minutes=59)
    with KeyStore.open(store_home, source(), now=clock) as ks:
        assert ks.get_key(k["id"])["state"] == "PendingDeletion"
    clock.advance(minutes=1)
    with KeyStore.open(store_home, source(), now=clock) as ks:
        gone = ks.get_key(k["id"])
        assert (gone["state"], gone["alias"], gone["current_version"]) == ("Destroyed", None, None)
        assert all(v["destroyed"] for v in gone["versions"])
        for call in (lambda: ks.decrypt_data_key(blob, CTX), lambda: ks.enable(k["id"]),
                     lambda: ks.cancel_deletion(k["id"]), lambda: ks.rotate(k["id"]),
                     lambda: ks.schedule_deletion(k["id"])):
            _assert_state_error(call, "Destroyed", "cannot be recovered")
        destroy = [r for r in ks.audit_records(key=k["id"]) if r["operation"] == "destroy"]
        assert len(destroy) == 1 and destroy[0]["details"]["alias"] == "doomed"
        ks.create_key(alias="doomed")    # the alias was freed with the key
    rows = sqlite3.connect(store_home.db_path).execute(
        "SELECT material FROM kms_key_versions WHERE key_id = ?", (k["id"],)).fetchall()
    assert rows == [(None,), (None,)]
    # Erased, not just unlinked: the sealed material is in neither the database nor its WAL.
    files = b"".join(p.read_bytes() for p in store_home.path.iterdir()
                     if p.name.startswith("blockcrypt.db"))
    for s in sealed:
        # A KMIP uid is a short public name ("23") that may occur anywhere in the file;
        # its rows are NULL (above) and the server's objects are gone (below).
        assert s not in files or provider_name == "kms"
    if provider_name != "local":      # destroying the key destroyed the provider's objects
        assert [material_objects(request, provider_name, ref) for ref in sealed] == [0, 0]



# -- passphrase --------------------------------------------------------------------------

def test_wrong_passphrase_changes_nothing(store_home, clock):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        ks.create_key(alias="k")
        dk, blob = ks.generate_data_key("k", CTX)
    before = key_tables(store_home)
    with KeyStore.open(store_home, source(b"wrong"), now=clock) as ks:
        with pytest.raises(errors.WrongPassphrase, match="nothing was changed"):
            ks.decrypt_data_key(blob, CTX)
        with pytest.raises(errors.WrongPassphrase):
            ks.create_key(alias="new")
        with pytest.raises(errors.WrongPassphrase):
            ks.change_passphrase(Secret(b"evil"))
        assert [r["result"] for r in ks.audit_records()[-3:]] == ["refused"] * 3
    assert key_tables(store_home) == before


def test_passphrase_is_asked_only_when_material_is_needed(store_home, clock):
    asked = []

    def counting():
        asked.append(1)
        return Secret(PASS)

    with KeyStore.open(store_home, counting, now=clock) as ks:
        k = ks.create_key(alias="k")
        assert len(asked) == 1
    with KeyStore.open(store_home, None, now=clock) as ks:
        ks.list_keys()
        ks.get_key("k")
        ks.disable("k")
        ks.enable("k")
        ks.schedule_deletion("k")
        ks.cancel_deletion("k")
        ks.enable("k")
        ks.create_key(origin="external")
        ks.verify_audit()
        with pytest.raises(errors.PassphraseRequired):
            ks.generate_data_key(k["id"], CTX)


def test_passphrase_change_reencrypts_everything(store_home, clock):
    import os

    from cryptography.hazmat.primitives import serialization

    from blockcrypt.kms import byok

    with KeyStore.open(store_home, source(), now=clock) as ks:
        ks.create_key(alias="a")
        ks.rotate("a")
        ks.create_key(alias="ext", origin="external")
        params = ks.get_import_params("ext")
        ks.default_key()
        blobs = [ks.generate_data_key(ref, CTX) for ref in ("a", "blockcrypt/default")]
        ks.change_passphrase(Secret(b"new passphrase"))
        dk, blob = ks.generate_data_key("a", CTX)    # the same instance keeps working
    with KeyStore.open(store_home, source(), now=clock) as ks:
        with pytest.raises(errors.WrongPassphrase):
            ks.decrypt_data_key(blobs[0][1], CTX)
    with KeyStore.open(store_home, source(b"new passphrase"), now=clock) as ks:
        for key_dk, key_blob in blobs + [(dk, blob)]:
            with ks.decrypt_data_key(key_blob, CTX) as got:
                assert got == key_dk
        # The import wrapping key was re-sealed too: the pending import still works.
        pub = serialization.load_pem_public_key(params["public_key_pem"].encode())
        ks.import_material("ext", pub.encrypt(os.urandom(32), byok.oaep()),
                           params["import_token"])
        assert ks.get_key("ext")["state"] == "Enabled"
        assert ks.verify_audit()["ok"]


def test_passphrase_change_is_atomic(store_home, clock, monkeypatch):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        for alias in ("a", "b", "c"):
            ks.create_key(alias=alias)
        blobs = [ks.generate_data_key(a, CTX) for a in ("a", "b", "c")]
    before = key_tables(store_home)
    real_seal, calls = kdf.seal, []

    def failing_seal(*args):
        calls.append(1)
        if len(calls) == 3:     # two versions re-sealed under the new KEK, then a failure
            raise OSError("simulated crash")
        return real_seal(*args)

    monkeypatch.setattr(kdf, "seal", failing_seal)
    with KeyStore.open(store_home, source(), now=clock) as ks:
        with pytest.raises(OSError):
            ks.change_passphrase(Secret(b"new"))
    monkeypatch.setattr(kdf, "seal", real_seal)
    assert key_tables(store_home) == before
    with KeyStore.open(store_home, source(b"new"), now=clock) as ks:
        with pytest.raises(errors.WrongPassphrase):
            ks.decrypt_data_key(blobs[0][1], CTX)
    with KeyStore.open(store_home, source(), now=clock) as ks:
        for dk, blob in blobs:
            with ks.decrypt_data_key(blob, CTX) as got:
                assert got == dk


def test_a_concurrent_passphrase_change_is_detected(store_home, clock):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        ks.create_key(alias="k")
    first = KeyStore.open(store_home, source(), now=clock)
    first.generate_data_key("k", CTX)                 # unlocked with the old passphrase
    with KeyStore.open(store_home, source(), now=clock) as other:
        other.change_passphrase(Secret(b"changed"))
    with pytest.raises(errors.PassphraseError, match="changed by another command"):
        first.generate_data_key("k", CTX)
    first.close()


def test_altered_material_is_detected(store_home, clock):
    with KeyStore.open(store_home, source(), now=clock) as ks:
        a, b = ks.create_key(alias="a"), ks.create_key(alias="b")
    conn = sqlite3.connect(store_home.db_path)
    # Copy b's sealed material onto a's row: the associated data names the key, so it fails.
    conn.execute("UPDATE kms_key_versions SET material = (SELECT material FROM kms_key_versions"
                 " WHERE key_id = ?) WHERE key_id = ?", (b["id"], a["id"]))
    conn.commit()
    conn.close()
    with KeyStore.open(store_home, source(), now=clock) as ks:
        with pytest.raises(errors.CryptoError, match="altered"):
            ks.generate_data_key("a", CTX)
        ks.generate_data_key("b", CTX)
