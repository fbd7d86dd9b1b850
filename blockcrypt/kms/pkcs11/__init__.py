"""The ``pkcs11`` key provider: CMKs as non-extractable AES-256 keys inside a PKCS#11 token.

==============  ==============================================================
``config``      the provider's configuration (module, token label, PIN file)
                and reading the PIN file (mode 0600 or refused)
``token``       the process-wide, lock-serialised, logged-in session per token
``backend``     :class:`Pkcs11Backend`: new key versions, GCM wrap / unwrap and
                destruction inside the token
``imports``     its BYOK half: an RSA key pair in the token, C_UnwrapKey with
                RSA-OAEP into a non-extractable AES key
==============  ==============================================================

The catalog (:mod:`blockcrypt.kms.local`) keeps the keys' states and audit; this
package only touches the token.  python-pkcs11 is imported lazily, so a home
without a pkcs11 provider never loads it.
"""
from .config import PKCS11, Pkcs11Config

__all__ = ["PKCS11", "Pkcs11Config"]
