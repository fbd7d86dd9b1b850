"""The local key management service: CMKs, envelope encryption of data keys, audit trail.

See docs/KEYS.md for the model and the commands.  The rest of blockcrypt uses
:class:`KeyStore` (``blockcrypt.kms.store``) and never sees CMK material.
"""
from .envelope import WrappedKey, parse_wrapped
from .store import (
                    DESTROYED,
                    DISABLED,
                    ENABLED,
                    PENDING_DELETION,
                    PENDING_IMPORT,
                    SERVICE_ALIAS,
                    KeyStore,
)

__all__ = ["KeyStore", "WrappedKey", "parse_wrapped", "ENABLED", "DISABLED",
           "PENDING_DELETION", "PENDING_IMPORT", "DESTROYED", "SERVICE_ALIAS"]
