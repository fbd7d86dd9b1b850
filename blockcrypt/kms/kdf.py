"""The key-encryption key (KEK): Argon2id over the store passphrase, and sealing under it.

Everything the key store keeps secret at rest (CMK material, BYOK wrapping private
keys) is sealed with AES-256-GCM under the KEK, with associated data naming what
the ciphertext is (store id, key id, version), so a sealed value copied to another
row fails authentication instead of decrypting as the wrong key.

The KEK exists only in memory (a :class:`~blockcrypt.crypto.secret.Secret`).  The
Argon2id parameters and salt are stored beside the ciphertexts (table
``kms_store``) so a store stays readable when the defaults change, and a
passphrase change re-derives with the current defaults.

Work factors: Argon2id t=3, p=4, m=256 MiB (above RFC 9106's second recommended
setting of 64 MiB) takes about 0.5 s on the 2-core development machines: slow
enough to make guessing expensive, fast enough for a CLI.  They are weakened only
when the test-only switch ``BLOCKCRYPT_TESTONLY_WEAK_KDF=1`` is set, and a store
created that way records ``test_only_weak: true`` in its parameters.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .. import errors
from ..crypto.secret import Secret

WEAK_KDF_ENV = "BLOCKCRYPT_TESTONLY_WEAK_KDF"

KEK_BYTES = 32            # AES-256
SALT_BYTES = 16           # RFC 9106 recommends 128 bits
NONCE_BYTES = 12          # AES-GCM's standard nonce; random (few seals per KEK)
TAG_BYTES = 16
ARGON2_VERSION = 0x13     # the only version pyca implements (Argon2 1.3)

PRODUCTION = {"iterations": 3, "lanes": 4, "memory_cost_kib": 256 * 1024}
TEST_ONLY_WEAK = {"iterations": 1, "lanes": 1, "memory_cost_kib": 8}  # Argon2's minimum


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters of one KEK, stored as JSON beside what it seals."""

    salt: bytes
    iterations: int
    lanes: int
    memory_cost_kib: int
    version: int = ARGON2_VERSION
    test_only_weak: bool = False

    def to_json(self) -> str:
        d = asdict(self)
        d["salt"] = self.salt.hex()
        d["algorithm"] = "argon2id"
        d["length"] = KEK_BYTES
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KdfParams":
        try:
            d = json.loads(text)
            if d.get("algorithm") != "argon2id" or d.get("length") != KEK_BYTES:
                raise ValueError(f"algorithm {d.get('algorithm')!r}")
            if d.get("version") != ARGON2_VERSION:
                raise ValueError(f"Argon2 version {d.get('version')!r}")
            return cls(salt=bytes.fromhex(d["salt"]), iterations=int(d["iterations"]),
                       lanes=int(d["lanes"]), memory_cost_kib=int(d["memory_cost_kib"]),
                       version=ARGON2_VERSION, test_only_weak=bool(d.get("test_only_weak")))
        except (ValueError, KeyError, TypeError) as e:
            raise errors.CryptoError(
                detail=f"the key store's KDF parameters are not supported ({e}); "
                       "upgrade blockcrypt") from None

    def public(self) -> dict:
        """The parameters without the salt (for audit records and display)."""
        return {"algorithm": "argon2id", "iterations": self.iterations, "lanes": self.lanes,
                "memory_cost_kib": self.memory_cost_kib, "test_only_weak": self.test_only_weak}


def new_params() -> KdfParams:
    """Fresh salt with the current default work factors (weak only under the test switch)."""
    weak = os.environ.get(WEAK_KDF_ENV) == "1"
    factors = TEST_ONLY_WEAK if weak else PRODUCTION
    return KdfParams(salt=os.urandom(SALT_BYTES), test_only_weak=weak, **factors)


def derive_kek(passphrase: Secret, params: KdfParams) -> Secret:
    """Argon2id(passphrase) -> 32-byte KEK, in a Secret.

    In a single-threaded process (every CLI command) the derivation runs in a
    forked child that hands back only the KEK through a pipe and exits: the
    library copies the passphrase into a parameter block that it frees without
    clearing (measured: the passphrase stayed in this process's heap after
    Argon2id, although our own buffer was wiped), and that copy dies with the
    child.  With other threads running (a fork could inherit a lock they hold)
    it runs here, and that copy may remain.
    """
    if threading.active_count() == 1 and hasattr(os, "fork"):
        return _derive_in_child(passphrase, params)
    return _derive_here(passphrase, params)


def _derive_here(passphrase: Secret, params: KdfParams) -> Secret:
    kek = Secret(KEK_BYTES)
    Argon2id(salt=params.salt, length=KEK_BYTES, iterations=params.iterations,
             lanes=params.lanes, memory_cost=params.memory_cost_kib,
             ).derive_into(passphrase.view(), kek.view())
    return kek


def _derive_in_child(passphrase: Secret, params: KdfParams) -> Secret:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: derive, write, exit
        code = 1
        try:
            os.close(r)
            kek = _derive_here(passphrase, params)
            os.write(w, kek.view())                # 32 bytes < PIPE_BUF: one write
            kek.wipe()
            code = 0
        finally:
            os._exit(code)                         # no atexit, no finalizers, no flush
    os.close(w)
    try:
        return Secret.read_exact_fd(r, KEK_BYTES)
    except EOFError:
        raise errors.CryptoError(detail="deriving the key-encryption key from the store "
                                        "passphrase failed (out of memory?)") from None
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def seal(kek: Secret, plaintext, associated_data: bytes) -> bytes:
    """nonce || AES-256-GCM(kek, plaintext, associated_data)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(kek.view()).encrypt(nonce, plaintext, associated_data)


def unseal(kek: Secret, sealed: bytes, associated_data: bytes) -> Secret:
    """Inverse of :func:`seal`, into a Secret; raises InvalidTag if anything differs."""
    n = len(sealed) - NONCE_BYTES - TAG_BYTES
    if n < 0:
        raise InvalidTag()
    out = Secret(n)
    try:
        AESGCM(kek.view()).decrypt_into(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:],
                                        associated_data, out.view())
    except BaseException:
        out.wipe()  # never hand back (or leave behind) unauthenticated plaintext
        raise
    return out
