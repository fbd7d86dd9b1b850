"""Key versions of a ``pkcs11`` provider: AES-256 token objects, used for GCM in the token.

Each key version is one secret-key object generated inside the token: CKA_TOKEN
(persistent), CKA_PRIVATE, CKA_SENSITIVE, not CKA_EXTRACTABLE, usable only for
CKA_ENCRYPT / CKA_DECRYPT.  Its CKA_ID is 16 random bytes that the catalog keeps
(``kms_key_versions.material``); its CKA_LABEL ``blockcrypt:<key id>:v<version>``
tells a token's administrator what it is.  Rotation makes a new object; older
objects keep decrypting.

A data key is wrapped with CKM_AES_GCM inside the token (random 12-byte IV,
16-byte tag) with the blob header and the canonical encryption context as AAD:
the blob has exactly the layout of a local one (:mod:`blockcrypt.kms.envelope`)
with algorithm id 2.  Any refusal of C_Decrypt (SoftHSM reports a tag mismatch as
CKR_GENERAL_ERROR) is the same UnwrapError the local provider raises.

python-pkcs11 takes and returns ``bytes``: the DK passes through one unwipeable
copy each way (docs/KEYS.md, "What stays in memory").
"""
from __future__ import annotations

import os

from ... import errors
from ...crypto.secret import Secret
from .. import envelope
from ..backend import KeyBackend
from . import token
from .config import CKA_ID_BYTES, GCM_TAG_BITS, PKCS11, Pkcs11Config
from .imports import Pkcs11Import


class Pkcs11Backend(Pkcs11Import, KeyBackend):
    """The token operations of one pkcs11 provider."""

    type = PKCS11
    algorithm = envelope.ALG_PKCS11_AES256GCM_DK64
    needs_kek = False

    def __init__(self, name: str, config: Pkcs11Config):
        super().__init__(name)
        self.config = config

    def _call(self, what: str, fn):
        return token.call(self.name, self.config, what, fn)

    def _key(self, s, exc, key_id: str, version: int, ref: bytes):
        from pkcs11 import KeyType, ObjectClass
        try:
            return s.get_key(object_class=ObjectClass.SECRET_KEY, key_type=KeyType.AES,
                             id=bytes(ref))
        except exc.NoSuchKey:
            raise errors.TokenObjectMissing(key_id=key_id, version=version,
                                            provider=self.name) from None

    def check(self) -> None:
        self._call("login", lambda s, exc: None)

    def new_material(self, key_id: str, version: int) -> bytes:
        from pkcs11 import Attribute, KeyType, MechanismFlag
        cka_id = os.urandom(CKA_ID_BYTES)

        def gen(s, exc):
            try:
                s.generate_key(
                    KeyType.AES, 256, label=f"blockcrypt:{key_id}:v{version}", id=cka_id,
                    store=True, capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                    template={Attribute.TOKEN: True, Attribute.PRIVATE: True,
                              Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                              Attribute.WRAP: False, Attribute.UNWRAP: False})
            except exc.PKCS11Error as e:
                if token.is_gone(e):
                    raise
                raise errors.TokenOperationFailed(provider=self.name,
                                                  operation="generating an AES-256 key",
                                                  reason=type(e).__name__) from None
        self._call("key generation", gen)
        return cka_id

    def wrap(self, key_id: str, version: int, ref: bytes, dk: Secret, context: dict) -> bytes:
        from pkcs11 import GCMParams, Mechanism
        header, nonce, aad = envelope.seal_parts(key_id, version, context, self.algorithm)

        def enc(s, exc):
            key = self._key(s, exc, key_id, version, ref)
            try:
                return key.encrypt(dk.view().tobytes(), mechanism=Mechanism.AES_GCM,
                                   mechanism_param=GCMParams(nonce, aad, GCM_TAG_BITS))
            except exc.PKCS11Error as e:
                if token.is_gone(e):
                    raise
                raise errors.TokenOperationFailed(provider=self.name,
                                                  operation="wrapping a data key",
                                                  reason=type(e).__name__) from None
        return header + nonce + self._call("wrap", enc)

    def unwrap(self, parsed: envelope.WrappedKey, ref: bytes, context: dict) -> Secret:
        from pkcs11 import GCMParams, Mechanism
        if parsed.algorithm != self.algorithm:
            raise envelope.unwrap_failed(parsed)
        aad = parsed.header + envelope.canonical_context(context)

        def dec(s, exc):
            key = self._key(s, exc, parsed.key_id, parsed.key_version, ref)
            try:
                return key.decrypt(parsed.ciphertext, mechanism=Mechanism.AES_GCM,
                                   mechanism_param=GCMParams(parsed.nonce, aad, GCM_TAG_BITS))
            except exc.PKCS11Error as e:
                if token.is_gone(e):
                    raise
                raise envelope.unwrap_failed(parsed) from None
        plain = self._call("unwrap", dec)
        dk = Secret(plain)
        if len(dk) != len(parsed.ciphertext) - GCM_TAG_BITS // 8:
            dk.wipe()
            raise envelope.unwrap_failed(parsed)
        return dk

    def destroy(self, key_id: str, refs: list[tuple[int, bytes]]) -> None:
        """Destroy the versions' token objects; one already gone is not an error."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        def kill(s, exc):
            for _version, ref in refs:
                for obj in list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                               Attribute.KEY_TYPE: KeyType.AES,
                                               Attribute.ID: bytes(ref)})):
                    obj.destroy()
        self._call("key destruction", kill)

