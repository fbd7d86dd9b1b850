"""Key management: the key-provider seam, envelope encryption of data keys, the audit trail.

See docs/KEYS.md for the model and the commands.  The rest of blockcrypt talks to
a :class:`~blockcrypt.kms.provider.KeyProvider` and never sees CMK material; today's
one provider is ``local`` (:class:`blockcrypt.kms.local.KeyStore`).

- :mod:`.provider`: the seam every provider implements;
- :mod:`.local`: the local provider (SQLite key store of a home);
- :mod:`.envelope`: the wrapped data-key blob and wrap / unwrap under a CMK version;
- :mod:`.kdf`: the store passphrase's KEK (Argon2id) and sealing under it;
- :mod:`.byok`: the cryptography of importing your own key material;
- :mod:`.audit`: the hash-chained audit trail;
- :mod:`.schema`: registers the tables with the shared database (imported by it).
"""
from .envelope import WrappedKey, parse_wrapped
from .local import (
    DESTROYED,
    DISABLED,
    ENABLED,
    PENDING_DELETION,
    PENDING_IMPORT,
    SERVICE_ALIAS,
    KeyStore,
)
from .provider import KeyProvider

__all__ = ["KeyProvider", "KeyStore", "WrappedKey", "parse_wrapped", "ENABLED", "DISABLED",
           "PENDING_DELETION", "PENDING_IMPORT", "DESTROYED", "SERVICE_ALIAS"]
