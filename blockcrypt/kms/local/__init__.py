"""The ``local`` key provider: CMKs in the SQLite database of a blockcrypt home.

:class:`KeyStore` (:mod:`.store`) implements :class:`blockcrypt.kms.provider.KeyProvider`
and adds the local store's own commands (create and list keys, BYOK import, the
store passphrase, the audit queries).  The modules, one job each:

==================  ==============================================================
``store``           open / close, and the public methods, each handed to one of:
``lifecycle``       creating keys and the state machine (enable, disable, delete,
                    rotate)
``maintenance``     what the clock makes due: destroying expired keys, automatic
                    rotation
``datakeys``        generate / decrypt / re-encrypt data keys (envelope operations)
``imports``         bring your own key: import parameters and importing material
``passphrase``      creating the store and changing its passphrase
``journal``         one write transaction per operation, with its audit record
``vault``           the KEK and the CMK material sealed under it
``rows``            finding keys, describing them, the dependants seam
``rules``           states, origins, limits, validation, timestamps
``schema``          the DDL of the ``kms_*`` tables
==================  ==============================================================

Nothing here imports the disk catalog: a key's dependants come from the callable
the store is opened with.
"""
from .rows import Dependants, no_dependants
from .rules import (
    DESTROYED,
    DISABLED,
    ENABLED,
    ORIGINS,
    PENDING_DAYS_DEFAULT,
    PENDING_DAYS_MAX,
    PENDING_DAYS_MIN,
    PENDING_DELETION,
    PENDING_IMPORT,
    ROTATION_DAYS_MAX,
    ROTATION_DAYS_MIN,
    SERVICE_ALIAS,
    STATES,
)
from .store import KeyStore

__all__ = ["KeyStore", "Dependants", "no_dependants", "ENABLED", "DISABLED",
           "PENDING_DELETION", "PENDING_IMPORT", "DESTROYED", "STATES", "SERVICE_ALIAS",
           "ORIGINS", "PENDING_DAYS_DEFAULT", "PENDING_DAYS_MIN", "PENDING_DAYS_MAX",
           "ROTATION_DAYS_MIN", "ROTATION_DAYS_MAX"]
