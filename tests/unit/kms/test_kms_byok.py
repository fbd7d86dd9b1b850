"""Bring your own key (blockcrypt/kms/byok.py and the store's import flow): refusals.

The end-to-end flow through the CLI is in tests/unit/cli/test_cli_keys.py.
"""
from __future__ import annotations

import base64
import os
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from blockcrypt import errors
from blockcrypt.crypto.secret import Secret
from blockcrypt.kms.local import KeyStore
from blockcrypt.storage.home import Home

from support.providers import PROVIDER_NAMES, provider_spec

PASS = b"byok test passphrase"


def oaep_sha256():
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def wrap_for(params: dict, material: bytes, pad=None) -> bytes:
    pub = serialization.load_pem_public_key(params["public_key_pem"].encode())
    return pub.encrypt(material, pad or oaep_sha256())


class Clock:
    def __init__(self):
        self.t = datetime(2031, 6, 1, tzinfo=timezone.utc)

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def ks(tmp_path, clock):
    h = Home(tmp_path / "home")
    KeyStore.init(h, Secret(PASS), now=clock)
    s = KeyStore.open(h, lambda: Secret(PASS), now=clock)
    yield s
    s.close()


def test_import_refusals(ks, clock):
    ks.create_key(alias="ext", origin="external")
    with pytest.raises(errors.ImportTokenError, match="get-import-params ext"):
        ks.import_material("ext", b"\0" * 512, "no-params-yet")
    old = ks.get_import_params("ext")
    assert old["wrapping_key_spec"] == "RSA_4096"
    assert old["expires_at"] == "2031-06-02T00:00:00Z"
    assert ks.get_key("ext")["import_expires_at"] == old["expires_at"]
    params = ks.get_import_params("ext")          # replaces the first wrapping key and token
    material = os.urandom(32)

    with pytest.raises(errors.ImportTokenError, match="does not match"):
        ks.import_material("ext", wrap_for(params, material), old["import_token"])
    with pytest.raises(errors.InvalidKeyMaterial, match="could not be unwrapped"):
        ks.import_material("ext", wrap_for(old, material), params["import_token"])
    with pytest.raises(errors.InvalidKeyMaterial, match="could not be unwrapped"):
        sha1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        ks.import_material("ext", wrap_for(params, material, sha1), params["import_token"])
    with pytest.raises(errors.InvalidKeyMaterial, match="32 bytes"):
        ks.import_material("ext", wrap_for(params, os.urandom(16)), params["import_token"])
    with pytest.raises(errors.InvalidKeyMaterial, match="512-byte"):
        ks.import_material("ext", b"short", params["import_token"])
    assert ks.get_key("ext")["state"] == "PendingImport"

    clock.t += timedelta(hours=24)
    with pytest.raises(errors.ImportTokenError, match="expired"):
        ks.import_material("ext", wrap_for(params, material), params["import_token"])
    clock.t -= timedelta(seconds=1)
    # base64 text of the wrapped material is accepted as well as the raw bytes
    wrapped_b64 = base64.b64encode(wrap_for(params, material))
    key = ks.import_material("ext", wrapped_b64, params["import_token"])
    assert (key["state"], key["current_version"], key["import_expires_at"]) == ("Enabled", 1, None)

    # Imported material is final: no second import, no rotation, no new parameters.
    with pytest.raises(errors.KeyStateError, match="imported already"):
        ks.import_material("ext", wrap_for(params, material), params["import_token"])
    with pytest.raises(errors.KeyStateError, match="cannot be rotated"):
        ks.rotate("ext")
    with pytest.raises(errors.KeyStateError, match="imported already"):
        ks.get_import_params("ext")
    refused = [r for r in ks.audit_records(key="ext") if r["result"] == "refused"]
    assert len(refused) == 10
    assert all(params["import_token"] not in str(r) for r in ks.audit_records())


def test_only_external_keys_take_material(ks):
    ks.create_key(alias="native")
    with pytest.raises(errors.KeyStateError, match="origin external"):
        ks.get_import_params("native")
    with pytest.raises(errors.KeyStateError, match="origin external"):
        ks.import_material("native", b"", "t")


def test_imported_material_wraps_data_keys(ks):
    ks.create_key(alias="ext", origin="external")
    params = ks.get_import_params("ext")
    material = os.urandom(32)
    ks.import_material("ext", wrap_for(params, material), params["import_token"])
    dk, blob = ks.generate_data_key("ext", {"disk": "a"})
    # The blob opens with the user's own material (header || context as associated data).
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from blockcrypt.kms import parse_wrapped
    p = parse_wrapped(blob)
    assert AESGCM(material).decrypt(p.nonce, p.ciphertext, p.header + b'{"disk":"a"}') == dk
    ks.disable("ext")
    ks.schedule_deletion("ext")
    assert ks.cancel_deletion("ext")["state"] == "Disabled"   # it has material now


# -- BYOK in every provider: expiry, deletion and re-import of the same material ----------

def oaep_for(provider_name: str):
    """SoftHSM 2.6 unwraps RSA-OAEP with SHA-1 only; the local store takes SHA-256."""
    h = hashes.SHA1 if provider_name != "local" else hashes.SHA256
    return ("sha1" if provider_name != "local" else "sha256",
            padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))


def test_byok_expiry_deletion_and_reimport_in_each_provider(ks, clock, provider_name, request):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from blockcrypt.kms import parse_wrapped
    if provider_name != "local":
        type_, options = provider_spec(request, provider_name)
        ks.add_provider(provider_name, type_, **options)
    if provider_name == PROVIDER_NAMES["kmip"]:
        # A KMIP key manager makes its keys itself: no import through the host.
        with pytest.raises(errors.InvalidInput, match="does not take imported material"):
            ks.create_key(alias="ext", origin="external", provider=provider_name)
        assert [k["alias"] for k in ks.list_keys()] == []
        return
    ks.create_key(alias="ext", origin="external", provider=provider_name)
    name, pad = oaep_for(provider_name)
    params = ks.get_import_params("ext", oaep_hash=name)
    assert params["wrapping_algorithm"] == f"RSAES_OAEP_SHA_{name[3:]}"
    assert params["wrapping_key_spec"] == ("RSA_4096" if provider_name == "local"
                                           else "RSA_3072")
    material = os.urandom(32)
    with pytest.raises(errors.InvalidInput, match="not in the future"):
        ks.import_material("ext", wrap_for(params, material, pad), params["import_token"],
                           material_expires_at=clock.t)
    key = ks.import_material("ext", wrap_for(params, material, pad), params["import_token"],
                             material_expires_at=clock.t + timedelta(days=10))
    assert (key["state"], key["material_expires_at"]) == ("Enabled", "2031-06-11T00:00:00Z")
    assert key["provider"] == provider_name
    ctx = {"disk": "a"}
    dk, blob = ks.generate_data_key("ext", ctx)
    p = parse_wrapped(blob)       # the provider's key is the user's material, in either case
    assert AESGCM(material).decrypt(p.nonce, p.ciphertext, p.header + b'{"disk":"a"}') == dk

    # The material expires: PendingImport, nothing unwraps (the check happens at open).
    clock.t += timedelta(days=10)
    with KeyStore.open(ks.home, lambda: Secret(PASS), now=clock) as later:
        gone = later.get_key("ext")
        assert (gone["state"], gone["current_version"], gone["material_expires_at"]) == (
            "PendingImport", None, None)
        with pytest.raises(errors.KeyStateError, match="PendingImport"):
            later.decrypt_data_key(blob, ctx)
        assert [r["operation"] for r in later.audit_records(key="ext")][-2:] == [
            "expire-material", "decrypt"]
        # Other material is refused; the same material brings the key (and its blobs) back.
        params = later.get_import_params("ext", oaep_hash=name)
        with pytest.raises(errors.InvalidKeyMaterial, match="not the material"):
            later.import_material("ext", wrap_for(params, os.urandom(32), pad),
                                  params["import_token"])
        assert later.get_key("ext")["state"] == "PendingImport"
        back = later.import_material("ext", wrap_for(params, material, pad),
                                     params["import_token"])
        assert (back["state"], back["current_version"], back["material_expires_at"]) == (
            "Enabled", 1, None)
        with later.decrypt_data_key(blob, ctx) as again:
            assert again == dk
        # Deleting the material now, then importing it again, likewise.
        assert later.delete_imported_material("ext")["state"] == "PendingImport"
        with pytest.raises(errors.KeyStateError, match="PendingImport"):
            later.decrypt_data_key(blob, ctx)
        with pytest.raises(errors.KeyStateError, match="no material now"):
            later.delete_imported_material("ext")
        params = later.get_import_params("ext", oaep_hash=name)
        later.import_material("ext", wrap_for(params, material, pad), params["import_token"])
        with later.decrypt_data_key(blob, ctx) as again:
            assert again == dk
        later.create_key(alias="native", provider=provider_name)
        with pytest.raises(errors.KeyStateError, match="only imported material"):
            later.delete_imported_material("native")
        ops = [r["operation"] for r in later.audit_records(key="ext")
               if r["result"] == "success"]
        assert ops.count("import") == 3 and "delete-imported-material" in ops
