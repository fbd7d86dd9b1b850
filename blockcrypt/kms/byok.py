"""Bring your own key: the import wrapping key and token, and unwrapping imported material.

The flow is the one AWS KMS / Alibaba Cloud KMS users know:

1. ``key create --origin external`` makes a key in state PendingImport (no material).
2. ``key get-import-params KEY`` makes a fresh RSA-4096 key pair: the public half
   (PEM, SubjectPublicKeyInfo) goes to the user, the private half is sealed under
   the store's KEK like CMK material; plus an import token valid for 24 hours.
   The store keeps only the token's SHA-256 (the token is a bearer credential for
   one import, not key material).  Asking again replaces both.
3. The user wraps 32 bytes of their own key material with RSAES-OAEP, SHA-256 as
   both the OAEP hash and the MGF1 hash (``RSAES_OAEP_SHA_256``), e.g. with
   ``openssl pkeyutl -encrypt -pubin -inkey wrapping-key.pem -pkeyopt
   rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt rsa_mgf1_md:sha256``.
4. ``key import KEY --material FILE --token TOKEN`` unwraps it inside the store and
   enables the key.  The wrapping key and token are then deleted: one import each.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from datetime import timedelta

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .. import errors
from ..crypto.secret import Secret
from .envelope import CMK_BYTES

WRAPPING_ALGORITHM = "RSAES_OAEP_SHA_256"
WRAPPING_KEY_SPEC = "RSA_4096"
OAEP_HASHES = ("sha256", "sha1")
"""OAEP hashes (also the MGF1 hash) an import may use; ``local`` takes only SHA-256, a
pkcs11 provider either (SoftHSM 2.6 supports only SHA-1; real HSMs SHA-256)."""
LOCAL_OAEP_HASHES = ("sha256",)


def wrapping_algorithm(oaep_hash: str) -> str:
    return {"sha256": "RSAES_OAEP_SHA_256", "sha1": "RSAES_OAEP_SHA_1"}[oaep_hash]


def check_oaep_hash(oaep_hash: str, allowed: tuple[str, ...], provider: str) -> None:
    if oaep_hash not in allowed:
        raise errors.InvalidInput(
            detail=f"key provider {provider!r} imports with OAEP hash "
                   f"{' or '.join(allowed)}, not {oaep_hash!r}")


RSA_BITS = 4096
WRAPPED_BYTES = RSA_BITS // 8
TOKEN_VALIDITY = timedelta(hours=24)


def oaep(oaep_hash: str = "sha256") -> padding.OAEP:
    h = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}[oaep_hash]
    return padding.OAEP(mgf=padding.MGF1(algorithm=h()), algorithm=h(), label=None)


def new_wrapping_key() -> tuple[Secret, str]:
    """(PKCS#8 DER private key as a Secret, public key PEM)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    # pyca returns immutable bytes here; we copy them into a Secret at once
    # (Python cannot wipe the intermediate copy: see docs/KEYS.md).
    der = Secret(key.private_bytes(serialization.Encoding.DER,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return der, pem.decode("ascii")


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


def decode_wrapped(data: bytes, wrapped_bytes: int = WRAPPED_BYTES) -> bytes:
    """Accept the raw RSA ciphertext (512 bytes for RSA-4096) or its base64 text."""
    if len(data) == wrapped_bytes:
        return data
    try:
        raw = base64.b64decode(b"".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != wrapped_bytes:
        raise errors.InvalidKeyMaterial(
            reason=f"the wrapped material must be the {wrapped_bytes}-byte RSA-OAEP "
                   f"ciphertext (raw or base64), got {len(data)} bytes")
    return raw


def unwrap_material(private_der: Secret, wrapped: bytes, oaep_hash: str = "sha256") -> Secret:
    """RSAES-OAEP-SHA-256 decrypt -> exactly 32 bytes of CMK material."""
    key = serialization.load_der_private_key(private_der.view(), password=None)
    try:
        plain = key.decrypt(decode_wrapped(wrapped), oaep(oaep_hash))
    except ValueError:
        raise errors.InvalidKeyMaterial(
            reason="the material could not be unwrapped; wrap it with RSAES-OAEP "
                   "(SHA-256, MGF1-SHA-256) under the public key from this key's latest "
                   "`blockcrypt key get-import-params`") from None
    material = Secret(plain)  # the bytes copy from pyca cannot be wiped (docs/KEYS.md)
    if len(material) != CMK_BYTES:
        n = len(material)
        material.wipe()
        raise errors.InvalidKeyMaterial(
            reason=f"imported key material must be {CMK_BYTES} bytes (AES-256), got {n}")
    return material
