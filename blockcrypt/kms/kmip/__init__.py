"""The ``kmip`` key provider: CMKs held by a KMIP key manager that many hosts share.

==============  ==============================================================
``config``      the provider's configuration (server, CA, client certificate
                and key *paths*) and the check that the key file is private
``protocol``    the one module that speaks KMIP: requests pinned to KMIP 1.4,
                AES-GCM Encrypt / Decrypt with a client-chosen IV, the AAD and
                the tag (PyKMIP's high-level client drops both), and the
                server's refusals as :class:`~.protocol.KmipRefused`
``backend``     :class:`KmipBackend`: a key version is an AES-256 object made
                and activated on the server; data keys are wrapped and
                unwrapped by the server; destruction revokes and destroys
==============  ==============================================================

The catalog (:mod:`blockcrypt.kms.local`) keeps the keys' states and audit; this
package only talks to the server.  PyKMIP is imported lazily, so a home without
a kmip provider never loads it.
"""
from .config import KMIP, KmipConfig

__all__ = ["KMIP", "KmipConfig"]
