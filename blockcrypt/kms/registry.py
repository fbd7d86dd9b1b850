"""The provider types blockcrypt knows, and making a key backend from a catalog row.

``local`` is built in (one per home, no configuration, cannot be added or
removed).  ``pkcs11`` and ``kmip`` providers are added by name with their
configuration (:mod:`blockcrypt.kms.pkcs11.config`, :mod:`blockcrypt.kms.kmip.config`).
A new provider type registers here: how its options are validated and how a backend is made from its stored JSON.
"""
from __future__ import annotations

import re

from .. import errors
from .backend import LOCAL, KeyBackend
from .kmip.config import KMIP, KmipConfig
from .pkcs11.config import PKCS11, Pkcs11Config

TYPES = (PKCS11, KMIP)
"""Provider types that ``provider add`` takes (``local`` is built in)."""

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise errors.InvalidName(what="key provider", name=name,
                                 reason="not a valid provider name")
    if name == LOCAL:
        raise errors.InvalidInput(
            detail="the provider name 'local' is the built-in key store's; choose another name")
    return name


def validated_config(name: str, type_: str, options: dict) -> str:
    """The JSON configuration of a new provider (InvalidInput naming a bad option)."""
    if type_ == KMIP:
        return KmipConfig.validated(name, options.get("host"), options.get("port"),
                                    options.get("ca"), options.get("cert"),
                                    options.get("key")).to_json()
    if type_ != PKCS11:
        raise errors.InvalidInput(
            detail=f"provider type {type_!r} is not one of {', '.join(TYPES)}")
    return Pkcs11Config.validated(name, options.get("module"), options.get("token_label"),
                                  options.get("pin_file")).to_json()


def make_backend(name: str, type_: str, config: str) -> KeyBackend:
    if type_ == PKCS11:
        from .pkcs11.backend import Pkcs11Backend
        return Pkcs11Backend(name, Pkcs11Config.from_json(config))
    if type_ == KMIP:
        from .kmip.backend import KmipBackend
        return KmipBackend(name, KmipConfig.from_json(config))
    raise errors.StateError(
        detail=f"key provider {name!r} has type {type_!r}, which this blockcrypt does not "
               "know; upgrade blockcrypt")
