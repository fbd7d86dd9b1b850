"""The ``pkcs11`` key provider against a real SoftHSM2 token: what is particular to it.

The states, refusals, rotation and destruction that hold for every provider are
the parametrised tests of tests/unit/kms/test_kms_store.py; here: the token
objects' attributes, no passphrase needed, the PIN file rules, faults (wrong PIN,
module that is no PKCS#11 library, token missing, key object deleted behind
blockcrypt's back), the provider registry, audit records, threads and fork.
"""
from __future__ import annotations

import os
import sqlite3
import threading

import pytest

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms import envelope, parse_wrapped
from blockcrypt.kms.local import KeyStore
from blockcrypt.kms.pkcs11 import token
from blockcrypt.kms.pkcs11.config import Pkcs11Config
from blockcrypt.storage import catalog
from blockcrypt.storage.home import Home

from support.cli import run_cli
from support.softhsm import MODULE

PASS = b"pkcs11 test passphrase"
CTX = {"uid": "ab" * 16, "cipher": "aes-xts-plain64"}


@pytest.fixture
def home(tmp_path) -> Home:
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS))
    return h


@pytest.fixture
def ks(home, softhsm):
    """A store opened WITHOUT a passphrase source, with the provider ``hsm`` added."""
    with KeyStore.open(home, None, dependants=catalog.key_dependants) as s:
        s.add_provider("hsm", "pkcs11", **softhsm.provider_options())
        yield s


def on_token(softhsm, fn):
    cfg = Pkcs11Config(**softhsm.provider_options())
    return token.call("hsm", cfg, "test", fn)


def versions(ks, key_id) -> list[bytes]:
    return [bytes(r[0]) for r in ks.conn.execute(
        "SELECT material FROM kms_key_versions WHERE key_id = ? ORDER BY version", (key_id,))]


def test_token_keys_are_sensitive_non_extractable_and_encrypt_decrypt_only(ks, softhsm):
    from pkcs11 import Attribute
    k = ks.create_key(alias="hsm-key", provider="hsm")
    assert (k["provider"], k["state"], k["current_version"]) == ("hsm", "Enabled", 1)
    (cka_id,) = versions(ks, k["id"])
    assert len(cka_id) == 16

    def attrs(s, exc):
        (obj,) = list(s.get_objects({Attribute.ID: cka_id}))
        got = {a: obj[getattr(Attribute, a)] for a in (
            "TOKEN", "PRIVATE", "SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE",
            "NEVER_EXTRACTABLE", "LOCAL", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "VALUE_LEN",
            "LABEL")}
        with pytest.raises(exc.AttributeSensitive):
            obj[Attribute.VALUE]
        return got
    got = on_token(softhsm, attrs)
    assert got == {"TOKEN": True, "PRIVATE": True, "SENSITIVE": True, "EXTRACTABLE": False,
                   "ALWAYS_SENSITIVE": True, "NEVER_EXTRACTABLE": True, "LOCAL": True,
                   "ENCRYPT": True, "DECRYPT": True, "WRAP": False, "UNWRAP": False,
                   "VALUE_LEN": 32, "LABEL": f"blockcrypt:{k['id']}:v1"}


def test_pkcs11_keys_work_without_the_store_passphrase(ks):
    """The store was opened with no passphrase source: nothing here may ask for it."""
    ks.create_key(alias="k", provider="hsm")
    dk, blob = ks.generate_data_key("k", CTX)
    parsed = parse_wrapped(blob)
    assert parsed.algorithm == envelope.ALG_PKCS11_AES256GCM_DK64
    assert len(blob) == envelope.blob_size(len(parsed.key_id))      # same layout as local
    with dk, ks.decrypt_data_key(blob, CTX) as again:
        assert again == dk
    assert ks.rotate("k")["current_version"] == 2
    moved = ks.reencrypt_data_key(blob, CTX, {**CTX, "uid": "cd" * 16})
    assert parse_wrapped(moved).key_version == 2
    ks.disable("k")
    ks.enable("k")
    ks.check_usable("k")
    with pytest.raises(errors.PassphraseRequired):     # a local key still needs it
        ks.create_key(alias="local-key")


def test_a_blob_relabelled_as_local_or_moved_to_a_local_key_does_not_open(ks, home):
    a = ks.create_key(alias="a", provider="hsm")
    with KeyStore.open(home, lambda: Secret(PASS)) as local:
        b = local.create_key(alias="b")
    _, blob = ks.generate_data_key("a", CTX)
    as_local = blob[:5] + bytes([envelope.ALG_AES256GCM_DK64]) + blob[6:]
    other = blob.replace(a["id"].encode(), b["id"].encode())
    with KeyStore.open(home, lambda: Secret(PASS)) as s:
        for bad in (as_local, other, blob[:-1] + bytes([blob[-1] ^ 1])):
            with pytest.raises(errors.UnwrapError):
                s.decrypt_data_key(bad, CTX)
        with pytest.raises(errors.UnwrapError):
            s.decrypt_data_key(blob, {**CTX, "uid": "00" * 16})


def softhsm_pin(ks):
    return ks.get_provider("hsm")["config"]["pin_file"]


def test_audit_records_name_provider_key_version_and_context(ks):
    k = ks.create_key(alias="k", provider="hsm")
    _, blob = ks.generate_data_key("k", CTX)
    ks.rotate("k")
    ks.decrypt_data_key(blob, CTX).wipe()
    recs = ks.audit_records(key="k")
    assert [(r["operation"], r["key_version"], r["details"]["provider"]) for r in recs] == [
        ("create", 1, "hsm"), ("generate", 1, "hsm"), ("rotate", 2, "hsm"),
        ("decrypt", 1, "hsm")]
    assert recs[1]["context"] == CTX and recs[3]["context"] == CTX
    assert all(r["key_id"] == k["id"] for r in recs)
    add = [r for r in ks.audit_records() if r["operation"] == "provider-add"]
    assert add[0]["details"]["provider"] == "hsm" and add[0]["result"] == "success"
    assert add[0]["details"]["config"] == {"module": MODULE, "token_label": "bc-test",
                                           "pin_file": str(softhsm_pin(ks))}
    assert ks.verify_audit()["ok"] is True


def test_provider_faults_are_clear_and_change_nothing(home, softhsm, tmp_path):
    """Each run in a fresh process, as a user would (login state is per process)."""
    good = softhsm.provider_args("bad")

    def opt(name, value):
        argv = list(good)
        argv[argv.index(name) + 1] = str(value)
        return argv

    def refused(cls, argv, *fragments):
        cp = run_cli(*argv, home=home.path, check=False)
        msg = cp.stderr.decode()
        assert cp.returncode == cls.exit_code, (argv, cp.returncode, msg)
        assert msg.startswith("error: ") and "Traceback" not in msg
        for f in fragments:
            assert f in msg, msg
        with KeyStore.open(home, None) as ks:
            assert [p["name"] for p in ks.list_providers()] == ["local"]
            rec = ks.audit_records()[-1]
            assert (rec["operation"], rec["result"]) == ("provider-add", "refused")
        return msg

    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000-not-the-pin\n")
    wrong_pin.chmod(0o600)
    msg = refused(errors.PinIncorrect, opt("--pin-file", wrong_pin), "'bad'", str(wrong_pin))
    assert "0000" not in msg
    open_pin = tmp_path / "open-pin"
    open_pin.write_bytes(softhsm.pin_file.read_bytes())
    open_pin.chmod(0o644)
    refused(errors.PinFileError, opt("--pin-file", open_pin), str(open_pin),
            f"chmod 600 {open_pin}", "0644")
    refused(errors.PinFileError, opt("--pin-file", tmp_path / "absent"), "no such file")
    refused(errors.ProviderModuleError, opt("--module", "/bin/true"), "/bin/true",
            "not a usable PKCS#11 library", "libsofthsm2.so")
    refused(errors.ProviderModuleError, opt("--module", tmp_path / "nope.so"), "no such file")
    refused(errors.ProviderUnavailable, opt("--token-label", "no-such-token"),
            "no token labelled 'no-such-token'", "softhsm2-util --show-slots")
    refused(errors.InvalidInput, good[:-2], "--pin-file")
    refused(errors.InvalidInput, opt("--pin-file", "relative/pin"), "absolute path")
    run_cli(*softhsm.provider_args("hsm"), home=home.path)
    cp = run_cli(*softhsm.provider_args("hsm"), home=home.path, check=False)
    assert cp.returncode == errors.AlreadyExists.exit_code
    cp = run_cli(*softhsm.provider_args("local"), home=home.path, check=False)
    assert cp.returncode == errors.InvalidInput.exit_code and b"built-in" in cp.stderr


def test_the_pin_is_in_no_file_of_the_home(ks, home, softhsm):
    ks.create_key(alias="k", provider="hsm")
    pin = softhsm.pin_file.read_bytes().strip()
    for p in home.path.rglob("*"):
        if p.is_file():
            assert pin not in p.read_bytes(), p


def test_key_object_deleted_behind_blockcrypts_back(ks, softhsm):
    from pkcs11 import Attribute
    k = ks.create_key(alias="k", provider="hsm")
    _, blob = ks.generate_data_key("k", CTX)
    (cka_id,) = versions(ks, k["id"])
    on_token(softhsm, lambda s, exc: [o.destroy() for o in s.get_objects({Attribute.ID: cka_id})])
    for call in (lambda: ks.decrypt_data_key(blob, CTX), lambda: ks.generate_data_key("k", CTX)):
        with pytest.raises(errors.TokenObjectMissing) as ei:
            call()
        assert "'hsm'" in ei.value.message and k["id"] in ei.value.message
        assert "version 1" in ei.value.message
    assert ks.audit_records()[-1]["result"] == "refused"
    assert ks.get_key("k")["state"] == "Enabled"      # the catalog is unchanged


def test_remove_is_refused_while_keys_use_the_provider(ks, home, softhsm):
    ks.create_key(alias="db-key", provider="hsm")
    ks.create_key(alias="web-key", provider="hsm")
    with pytest.raises(errors.StateError) as ei:
        ks.remove_provider("hsm")
    assert "db-key" in ei.value.message and "web-key" in ei.value.message
    assert [p["name"] for p in ks.list_providers()] == ["local", "hsm"]
    assert [k["alias"] for k in ks.get_provider("hsm")["keys"]] == ["db-key", "web-key"]
    with pytest.raises(errors.ProviderNotFound):
        ks.remove_provider("nope")
    with pytest.raises(errors.ProviderNotFound):
        ks.create_key(alias="x", provider="nope")


def test_remove_after_the_keys_are_destroyed(home, softhsm):
    from datetime import datetime, timedelta, timezone
    t = [datetime(2030, 1, 1, tzinfo=timezone.utc)]
    with KeyStore.open(home, None, now=lambda: t[0]) as ks:
        ks.add_provider("hsm2", "pkcs11", **softhsm.provider_options())
        ks.create_key(alias="gone", provider="hsm2")
        ks.schedule_deletion("gone", pending_days=7)
    t[0] += timedelta(days=7)
    with KeyStore.open(home, None, now=lambda: t[0]) as ks:
        assert ks.get_provider("hsm2")["keys"][0]["state"] == "Destroyed"
        assert ks.remove_provider("hsm2")["name"] == "hsm2"
        assert [p["name"] for p in ks.list_providers()] == ["local"]


def test_concurrent_threads_share_the_token_safely(ks):
    """SoftHSM corrupts its heap on unlocked concurrent calls (KMS.md); the lock holds."""
    ks.create_key(alias="k", provider="hsm")
    home = ks.home
    failures: list[BaseException] = []

    def worker():
        try:
            with KeyStore.open(home, None) as mine:
                for _ in range(25):
                    dk, blob = mine.generate_data_key("k", CTX)
                    with dk, mine.decrypt_data_key(blob, CTX) as again:
                        assert again == dk
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)
    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_a_forked_child_logs_in_again(ks):
    ks.create_key(alias="k", provider="hsm")
    dk, blob = ks.generate_data_key("k", CTX)       # the parent has a logged-in session
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            with KeyStore.open(ks.home, None) as child, child.decrypt_data_key(blob, CTX) as d:
                code = 0 if d == dk else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with ks.decrypt_data_key(blob, CTX) as again:     # and the parent's still works
        assert again == dk


def test_passphrase_change_leaves_token_keys_alone(home, softhsm):
    with KeyStore.open(home, lambda: Secret(PASS)) as ks:
        ks.add_provider("hsm", "pkcs11", **softhsm.provider_options())
        k = ks.create_key(alias="k", provider="hsm")
        ks.create_key(alias="l")
        _, blob = ks.generate_data_key("k", CTX)
        before = versions(ks, k["id"])
        ks.change_passphrase(Secret(b"a new passphrase"))
        assert versions(ks, k["id"]) == before
    with KeyStore.open(home, None) as ks:
        ks.decrypt_data_key(blob, CTX).wipe()
    conn = sqlite3.connect(home.db_path)
    assert conn.execute("SELECT COUNT(*) FROM kms_key_versions").fetchone()[0] == 2


def _oaep(h):
    from cryptography.hazmat.primitives.asymmetric import padding
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def test_byok_into_the_token_keeps_material_and_wrapping_key_inside(ks, softhsm):
    from cryptography.hazmat.primitives import hashes, serialization
    from pkcs11 import Attribute, ObjectClass
    ks.create_key(alias="ext", origin="external", provider="hsm")
    params = ks.get_import_params("ext", oaep_hash="sha1")
    ref = ks.conn.execute("SELECT private_key FROM kms_import").fetchone()[0]
    cka_id = bytes.fromhex(__import__("json").loads(ref)["cka_id"])

    def rsa_private(s, exc):
        (priv,) = list(s.get_objects({Attribute.ID: cka_id,
                                      Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        return {a: priv[getattr(Attribute, a)] for a in ("SENSITIVE", "EXTRACTABLE", "UNWRAP",
                                                         "DECRYPT", "SIGN", "TOKEN")}
    assert on_token(softhsm, rsa_private) == {"SENSITIVE": True, "EXTRACTABLE": False,
                                              "UNWRAP": True, "DECRYPT": False, "SIGN": False,
                                              "TOKEN": True}
    pub = serialization.load_pem_public_key(params["public_key_pem"].encode())
    material = os.urandom(32)
    # SoftHSM refuses OAEP with SHA-256: a clear error that names the way out.
    sha256 = ks.get_import_params("ext", oaep_hash="sha256")
    pub256 = serialization.load_pem_public_key(sha256["public_key_pem"].encode())
    with pytest.raises(errors.TokenOperationFailed, match="--oaep-hash sha1"):
        ks.import_material("ext", pub256.encrypt(material, _oaep(hashes.SHA256)),
                           sha256["import_token"])
    params = ks.get_import_params("ext", oaep_hash="sha1")
    pub = serialization.load_pem_public_key(params["public_key_pem"].encode())
    ks.import_material("ext", pub.encrypt(material, _oaep(hashes.SHA1)), params["import_token"])
    (aes_id,) = versions(ks, ks.get_key("ext")["id"])

    def state(s, exc):
        (k,) = list(s.get_objects({Attribute.ID: aes_id}))
        rsa_left = [o for i in (cka_id,) for o in s.get_objects({Attribute.ID: i})]
        return ({a: k[getattr(Attribute, a)] for a in ("SENSITIVE", "EXTRACTABLE", "ENCRYPT",
                                                       "DECRYPT", "WRAP", "UNWRAP")},
                len(rsa_left))
    attrs, rsa_left = on_token(softhsm, state)
    assert attrs == {"SENSITIVE": True, "EXTRACTABLE": False, "ENCRYPT": True,
                     "DECRYPT": True, "WRAP": False, "UNWRAP": False}
    assert rsa_left == 0              # the wrapping key pairs are destroyed after the import
    with pytest.raises(errors.InvalidInput, match="sha256"):
        with KeyStore.open(ks.home, lambda: Secret(PASS)) as local:
            local.create_key(alias="lext", origin="external")
            local.get_import_params("lext", oaep_hash="sha1")
