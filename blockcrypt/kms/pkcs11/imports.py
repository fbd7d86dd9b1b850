"""Bring your own key into a PKCS#11 token (the import half of :class:`.backend.Pkcs11Backend`).

``key get-import-params`` generates an RSA-3072 key pair inside the token (the
private half sensitive, non-extractable, usable only to unwrap) and hands out the
public half as PEM; ``key import`` calls C_UnwrapKey with CKM_RSA_PKCS_OAEP, whose
hash (and MGF1 hash) is a parameter chosen at get-import-params time (SHA-256 by
default; SoftHSM 2.6 supports only SHA-1), straight into a non-extractable AES-256
token key: the material never exists outside the token after the user wrapped
it.  The key check value (:func:`blockcrypt.kms.backend.check_value`) is computed
inside the token with CKM_AES_GCM.  The catalog keeps, for the private half, a
JSON reference ``{"cka_id": ..., "oaep_hash": ...}`` (no secret).
"""
from __future__ import annotations

import json
import os

from ... import errors
from .. import byok, envelope
from ..backend import KCV_AAD, KCV_NONCE
from . import token
from .config import CKA_ID_BYTES, GCM_TAG_BITS

RSA_IMPORT_BITS = 3072
"""The token's import wrapping key (RSA_3072: generated in the token in about a second)."""


class Pkcs11Import:
    """The BYOK methods of :class:`.backend.Pkcs11Backend` (see the module doc); uses its
    ``name`` and ``_call``."""

    def prepare_import_key(self, oaep_hash: str):
        byok.check_oaep_hash(oaep_hash, byok.OAEP_HASHES, self.name)
        return None

    def new_import_key(self, key_id: str, oaep_hash: str, prepared) -> dict:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from pkcs11 import Attribute, KeyType
        cka_id = os.urandom(CKA_ID_BYTES)

        def gen(s, exc):
            try:
                pub, _priv = s.generate_keypair(
                    KeyType.RSA, RSA_IMPORT_BITS, id=cka_id, store=True,
                    label=f"blockcrypt:{key_id}:import",
                    public_template={Attribute.WRAP: True, Attribute.ENCRYPT: True,
                                     Attribute.VERIFY: False},
                    private_template={Attribute.UNWRAP: True, Attribute.DECRYPT: False,
                                      Attribute.SIGN: False, Attribute.SENSITIVE: True,
                                      Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True})
            except exc.PKCS11Error as e:
                if token.is_gone(e):
                    raise
                raise errors.TokenOperationFailed(provider=self.name,
                                                  operation="generating an RSA import key",
                                                  reason=type(e).__name__) from None
            return (int.from_bytes(pub[Attribute.MODULUS], "big"),
                    int.from_bytes(pub[Attribute.PUBLIC_EXPONENT], "big"))
        n, e = self._call("import key generation", gen)
        pem = rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        ref = json.dumps({"cka_id": cka_id.hex(), "oaep_hash": oaep_hash}).encode()
        return {"ref": ref, "pem": pem.decode("ascii"), "spec": f"RSA_{RSA_IMPORT_BITS}",
                "algorithm": byok.wrapping_algorithm(oaep_hash)}

    def import_material(self, key_id: str, version: int, private_ref: bytes,
                        wrapped: bytes) -> tuple[bytes, bytes]:
        from pkcs11 import MGF, Attribute, GCMParams, KeyType, Mechanism, MechanismFlag, ObjectClass
        info = json.loads(bytes(private_ref))
        wrapped = byok.decode_wrapped(wrapped, RSA_IMPORT_BITS // 8)
        digest, mgf = {"sha1": (Mechanism.SHA_1, MGF.SHA1),
                       "sha256": (Mechanism.SHA256, MGF.SHA256)}[info["oaep_hash"]]
        new_id = os.urandom(CKA_ID_BYTES)

        def unwrap(s, exc):
            try:
                priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.RSA,
                                 id=bytes.fromhex(info["cka_id"]))
            except exc.NoSuchKey:
                raise errors.ImportTokenError(
                    key_id=key_id, detail="its import wrapping key is gone from the token; run "
                                          "`blockcrypt key get-import-params` again") from None
            try:
                key = priv.unwrap_key(
                    ObjectClass.SECRET_KEY, KeyType.AES, wrapped, id=new_id, store=True,
                    label=f"blockcrypt:{key_id}:v{version}", mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=(digest, mgf, None),
                    capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.WRAP: False, Attribute.UNWRAP: False})
            except (exc.ArgumentsBad, exc.MechanismInvalid, exc.MechanismParamInvalid):
                raise errors.TokenOperationFailed(
                    provider=self.name, operation=f"RSA-OAEP with {info['oaep_hash']}",
                    reason="the token does not support it (SoftHSM 2.6 supports only SHA-1); "
                           "run `blockcrypt key get-import-params KEY --oaep-hash sha1` and "
                           "wrap the material again") from None
            except exc.PKCS11Error as e:
                if token.is_gone(e):
                    raise
                raise errors.InvalidKeyMaterial(
                    reason="the material could not be unwrapped; wrap it with "
                           f"{byok.wrapping_algorithm(info['oaep_hash'])} under the public key "
                           "from this key's latest `blockcrypt key get-import-params`") from None
            n = key[Attribute.VALUE_LEN]
            # SoftHSM 2.6 reports 0 (unknown) for unwrapped keys: then the length cannot
            # be checked here (docs/KEYS.md); a token that reports it is held to 32.
            if n and n != envelope.CMK_BYTES:
                key.destroy()
                raise errors.InvalidKeyMaterial(
                    reason=f"imported key material must be {envelope.CMK_BYTES} bytes "
                           f"(AES-256), got {n}")
            return key.encrypt(b"", mechanism=Mechanism.AES_GCM,
                               mechanism_param=GCMParams(KCV_NONCE, KCV_AAD, GCM_TAG_BITS))
        kcv = self._call("key import", unwrap)
        return new_id, kcv

    def destroy_import_key(self, private_ref: bytes) -> None:
        from pkcs11 import Attribute
        cka_id = bytes.fromhex(json.loads(bytes(private_ref))["cka_id"])

        def kill(s, exc):
            for obj in list(s.get_objects({Attribute.ID: cka_id})):
                obj.destroy()
        self._call("import key destruction", kill)

