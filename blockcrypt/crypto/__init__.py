"""Crypto primitives of the data path: :class:`.secret.Secret` for key memory
and the AES-256-XTS sector engines.  No I/O, no catalog, no key management
(envelope encryption of data keys is :mod:`blockcrypt.kms`).
"""
